"""Consent: whether a visitor agreed to analytics (``CONSENT``); the django-cookie-consent adapter.

``CONSENT`` names a function ``request -> bool``. The middleware asks it once per request;
until it answers true the visitor gets no cookie, nothing is sent about them, and the
tag renders the loader in an inert form that a consent manager switches on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpRequest
from django.utils.module_loading import import_string

from .conf import get_settings

logger = logging.getLogger(__name__)

__all__ = ["agreed", "django_cookie_consent"]

#: Dotted paths whose failure was logged: once per process, not once per request.
_logged: set[str] = set()


@receiver(setting_changed, dispatch_uid="django_kissmetrics.consent")
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "KISSMETRICS":
        _logged.clear()  # A new configuration: its failure is worth a line of its own.


@functools.cache
def _gate(path: str) -> Callable[[HttpRequest], Any]:
    gate: Callable[[HttpRequest], Any] = import_string(path)
    return gate


def agreed(request: HttpRequest, path: str) -> bool:
    """Whether ``CONSENT`` (the function at ``path``) says this visitor agreed; never raises.

    A function that cannot be imported or raises counts as "not agreed": tracking
    someone who may not have agreed is the one mistake a consent gate must not make.
    """
    try:
        return bool(_gate(path)(request))
    except Exception:
        if path not in _logged:
            _logged.add(path)
            logger.exception(
                "Kissmetrics: CONSENT %r failed; visitors count as not agreed "
                "(logged once per process)",
                path,
            )
        return False


@functools.cache
def _cookie_consent() -> tuple[Callable[[HttpRequest], dict[str, str]], Any, str]:
    # Imported on first use: the package does not depend on django-cookie-consent.
    from cookie_consent.conf import settings as cookie_settings
    from cookie_consent.util import get_cookie_dict_from_request, get_cookie_value_from_request

    return (
        get_cookie_dict_from_request,
        get_cookie_value_from_request,
        str(getattr(cookie_settings, "COOKIE_CONSENT_DECLINE", "-1")),
    )


def django_cookie_consent(request: HttpRequest) -> bool:
    """``CONSENT`` for django-cookie-consent: the ``CONSENT_COOKIE_GROUP`` group is accepted.

    A visitor without the consent cookie, or who declined the group, costs no query and
    no cache lookup. For one who accepted it, django-cookie-consent's own rule decides
    (the acceptance must be newer than the group's cookies), read from its cache.
    """
    read_cookie, group_accepted, declined = _cookie_consent()
    group = get_settings().CONSENT_COOKIE_GROUP
    version = read_cookie(request).get(group)
    if version is None or version == declined:
        return False
    return group_accepted(request, group) is True
