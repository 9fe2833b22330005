"""Signal handlers: login, signup, logout and identity changes join or part identities."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_logged_out
from django.db.models.signals import post_init, post_save

from .conf import DEFAULTS, get_settings
from .person import identity_for
from .tracker import RequestTracker, _current, current_tracker

logger = logging.getLogger(__name__)

__all__ = ["connect"]


def _tracker(request: Any) -> RequestTracker | None:
    tracker = getattr(request, "km", None) if request is not None else _current.get()
    return tracker if isinstance(tracker, RequestTracker) else None


def _safely(action: Callable[[], None]) -> None:
    # Analytics must never break a login, a signup or a save.
    try:
        action()
    except Exception:
        logger.exception("Kissmetrics: a signal handler failed")


def on_login(sender: Any, request: Any = None, user: Any = None, **kwargs: Any) -> None:
    """Alias the anonymous id to the user, identify, record ``LOGIN_EVENT``.

    A user created earlier in the same request (without allauth) signs up first: the
    visitor became the user they just created.
    """
    tracker = _tracker(request)
    if tracker is not None and user is not None:
        _safely(lambda: _logged_in(tracker, user))


def _logged_in(tracker: RequestTracker, user: Any) -> None:
    if _created_here(tracker, user):
        tracker.signup(user)
    tracker.login(user)


def on_logout(sender: Any, request: Any = None, **kwargs: Any) -> None:
    """Forget the named person; the browser runs ``clearIdentity``, ``km_ai`` is renewed."""
    tracker = _tracker(request)
    if tracker is not None:
        _safely(tracker.logout)


def on_signup(sender: Any, request: Any = None, user: Any = None, **kwargs: Any) -> None:
    """django-allauth's ``user_signed_up``: alias, identify, record ``SIGNUP_EVENT``."""
    tracker = _tracker(request)
    if tracker is not None and user is not None:
        _safely(lambda: tracker.signup(user))


def on_user_created(sender: Any, instance: Any, created: bool = False, **kwargs: Any) -> None:
    """Note a user created in a visitor's request: a signup if they log in as it (``on_login``).

    A user created for someone else (an invitation, a staff tool, a guest checkout) is
    not the visitor: no alias, no identify, no event under the visitor.
    """
    if not created or kwargs.get("raw"):
        return
    tracker = _current.get()
    if tracker is not None and tracker.active:
        tracker.created_users = {*tracker.created_users, instance.pk}


def _created_here(tracker: RequestTracker, user: Any) -> bool:
    # Connected for the user model only: its primary key names the user.
    return getattr(user, "pk", None) in tracker.created_users


def _custom_identity() -> bool:
    # With the default identity (the primary key) an identity never changes.
    return bool(DEFAULTS["IDENTITY"] != get_settings().IDENTITY)


def remember_identity(sender: Any, instance: Any, **kwargs: Any) -> None:
    """Note a loaded user's identity, to see later whether a save changed it."""
    if instance.pk is not None and _custom_identity():
        try:
            instance._km_identity = identity_for(instance)
        except Exception:
            instance._km_identity = None


def on_identity_change(sender: Any, instance: Any, created: bool = False, **kwargs: Any) -> None:
    """Alias the old identity to the new one when a save changes it."""
    if created or kwargs.get("raw") or not _custom_identity():
        return
    old = getattr(instance, "_km_identity", None)

    def alias() -> None:
        new = identity_for(instance)
        if old and new and old != new:
            current_tracker().alias(old, new)
        instance._km_identity = new

    _safely(alias)


def connect(*, allauth: bool) -> None:
    """Connect the handlers (``AppConfig.ready``); with allauth, its signup signal."""
    user_model = get_user_model()
    user_logged_in.connect(on_login, dispatch_uid="django_kissmetrics.login")
    user_logged_out.connect(on_logout, dispatch_uid="django_kissmetrics.logout")
    post_init.connect(remember_identity, sender=user_model, dispatch_uid="django_kissmetrics.init")
    post_save.connect(
        on_identity_change, sender=user_model, dispatch_uid="django_kissmetrics.identity"
    )
    if allauth:
        from allauth.account.signals import user_signed_up

        user_signed_up.connect(on_signup, dispatch_uid="django_kissmetrics.signup")
    else:
        post_save.connect(
            on_user_created, sender=user_model, dispatch_uid="django_kissmetrics.signup"
        )
