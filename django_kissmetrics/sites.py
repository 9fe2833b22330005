"""Which Kissmetrics site a request belongs to: ``SITES``, else ``API_KEY``.

``SITES`` maps a host (``shop.example.com``) or a domain and its subdomains
(``.example.com``) to an API key, or names a function ``request -> key | None``. The
key found for a request goes with everything about it: the server commands (each
:class:`~django_kissmetrics.commands.Command` carries it), the tag's ``_kmk`` and the
library's script URLs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpRequest
from django.utils.module_loading import import_string

from .conf import Settings
from .identity import per_host

logger = logging.getLogger(__name__)

__all__ = ["key_for_host", "key_for_request"]

#: (X-Forwarded-Host, Host) headers that passed ``request.get_host()`` -> the key.
_keys: dict[tuple[str | None, str], str | None] = {}
#: Dotted paths whose failure was logged: once per process, not once per request.
_logged: set[str] = set()


@receiver(setting_changed, dispatch_uid="django_kissmetrics.sites")
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting in ("KISSMETRICS", "ALLOWED_HOSTS", "USE_X_FORWARDED_HOST", "DEBUG"):
        _keys.clear()
        _logged.clear()


def key_for_host(host: str, sites: Mapping[str, str | None], default: str | None) -> str | None:
    """The key of ``host`` (port allowed): its exact entry, else the longest ``.domain`` one.

    ``.example.com`` covers ``example.com`` and every subdomain of it. A host in no entry
    gets ``default`` (``API_KEY``); an entry whose key is ``None`` keeps its hosts out.
    """
    host = host.lower().rstrip(".")
    if host.startswith("["):  # An IPv6 literal: [::1]:8000.
        host = host[: host.find("]") + 1]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in sites:
        return sites[host]
    name = host
    while True:
        dotted = "." + name
        if dotted in sites:
            return sites[dotted]
        dot = name.find(".")
        if dot < 0:
            return default
        name = name[dot + 1 :]


@functools.cache
def _function(path: str) -> Callable[[HttpRequest], Any]:
    func: Callable[[HttpRequest], Any] = import_string(path)
    return func


def key_for_request(request: HttpRequest, conf: Settings) -> str | None:
    """The API key for ``request``; ``None``: this request's site is not tracked. Never raises.

    A ``SITES`` function that fails is logged at ERROR once per process and its requests
    are not tracked: sending them under another site's key would mix two sites' numbers.
    """
    sites = conf.SITES
    if sites is None:
        return conf.API_KEY
    if isinstance(sites, str):
        try:
            key = _function(sites)(request)
        except Exception:
            if sites not in _logged:
                _logged.add(sites)
                logger.exception("Kissmetrics: SITES %r failed; not tracking its requests", sites)
            return None
        return key if isinstance(key, str) and key else None
    return per_host(request, _keys, lambda host: key_for_host(host, sites, conf.API_KEY))
