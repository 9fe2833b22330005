"""Who the current person is: a named identity, the logged-in user, or the anonymous id.

Worked out without a database query for an anonymous visitor, and with none beyond what
authentication already does for a logged-in one.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from django.utils import timezone
from django.utils.functional import SimpleLazyObject, empty
from django.utils.module_loading import import_string

from . import commands as cmd
from .conf import get_settings

if TYPE_CHECKING:
    from django.http import HttpRequest

logger = logging.getLogger(__name__)

__all__ = ["SESSION_IDENTITY", "CurrentPerson", "identity_for", "joined_at", "stored_session"]

#: The session key holding an identity given to ``km.identify()``.
SESSION_IDENTITY = "_km_identity"


def joined_at(user: Any) -> dt.datetime | None:
    """When ``user`` was created (``date_joined``), or ``None`` if the model has no such time.

    A naive time (``USE_TZ = False``) is in ``TIME_ZONE``, as Django stores it and as
    ``kissmetrics_backfill`` reads it.
    """
    when = getattr(user, "date_joined", None)
    if not isinstance(when, dt.datetime):
        return None
    if timezone.is_naive(when):
        when = timezone.make_aware(when, timezone.get_default_timezone())
    return when


@functools.cache
def _identity_function(path: str) -> Callable[[Any], str]:
    func: Callable[[Any], str] = import_string(path)
    return func


def stored_session(request: HttpRequest) -> Any:
    """The request's session if it can hold anything, else ``None`` (and it stays unread).

    A request without a session cookie has an empty session unless this request wrote
    to it. Reading it anyway would mark it accessed, and ``SessionMiddleware`` would then
    add ``Vary: Cookie`` to a response that an anonymous visitor's cache could share.
    """
    session = getattr(request, "session", None)
    if session is None or (session.session_key is None and not session.modified):
        return None
    return session


# AuthenticationMiddleware's lazy user is made by a lambda defined in this module.
_AUTH_MIDDLEWARE = "django.contrib.auth.middleware"


def _lazy_session_user(user: Any) -> bool:
    """Whether ``user`` is ``AuthenticationMiddleware``'s lazy user, not yet loaded.

    That user is read from the session; with no stored session it can only be
    ``AnonymousUser``, and loading it to find out costs more than the rest of a
    tracked call. Any other user object (set by another middleware, or already
    loaded) is asked.
    """
    if type(user) is not SimpleLazyObject:
        return False
    state = object.__getattribute__(user, "__dict__")
    return (
        state.get("_wrapped") is empty
        and getattr(state.get("_setupfunc"), "__module__", "") == _AUTH_MIDDLEWARE
    )


def identity_for(user: Any) -> str:
    """The named identity of ``user`` (the ``IDENTITY`` setting)."""
    return str(_identity_function(get_settings().IDENTITY)(user))


class CurrentPerson:
    """The current-person half of a request's tracker (``RequestTracker`` inherits it)."""

    request: HttpRequest
    active: bool
    anonymous_id: str | None
    new_anonymous_id: bool
    _identity: str | None = None
    _user_identity: tuple[Any, str | None] | None = None

    @property
    def identity(self) -> str | None:
        """The current person: identified id, the user's identity, or the anonymous id."""
        if not self.active:
            return None
        if self._identity is not None:
            return self._identity
        request = self.request
        session = stored_session(request)
        user = getattr(request, "user", None)
        if (
            user is not None
            and (session is not None or not _lazy_session_user(user))
            and user.is_authenticated
        ):
            cached = self._user_identity
            if cached is None or cached[0] is not user:
                cached = self._user_identity = (user, self._named_identity(user))
            if cached[1] is not None:
                return cached[1]
        if session is not None:
            named = session.get(SESSION_IDENTITY)
            if isinstance(named, str) and named:
                return cmd._identity(named)
        return self.anonymous_id

    def identity_source(self) -> str | None:
        """How :attr:`identity` was worked out, for tools that show it (the toolbar panel).

        ``"identify"`` (``km.identify()`` in this request), ``"user"`` (the logged-in
        user, through ``IDENTITY``), ``"session"`` (``km.identify()`` earlier in the
        session), ``"cookie"`` (``km_ai`` from the browser), ``"new"`` (a new anonymous
        id, set on this response), or ``None`` (not tracked).
        """
        person = self.identity
        if person is None:
            return None
        if self._identity is not None:
            return "identify"
        if person != self.anonymous_id:
            cached = self._user_identity
            user = getattr(self.request, "user", None)
            by_user = cached is not None and cached[0] is user and cached[1] == person
            return "user" if by_user else "session"
        return "new" if self.new_anonymous_id else "cookie"

    @staticmethod
    def _named_identity(user: Any) -> str | None:
        try:
            return cmd._identity(identity_for(user))
        except Exception:
            # A broken IDENTITY function must not turn the visitor's page into a 500:
            # the request is tracked under the anonymous id, and the error logged.
            logger.exception("Kissmetrics: IDENTITY failed for user %r", getattr(user, "pk", None))
            return None

    def is_visitor(self, identity: str) -> bool:
        """Whether ``identity`` names this visitor: their ``km_ai``, their identity from
        ``km.identify()`` in the session, or the logged-in user's identity.

        Used while the visitor has not agreed to analytics (``CONSENT``), when the
        tracker is not active: a call naming the visitor themself is tracking them.
        """
        request = self.request
        raw = request.COOKIES.get(get_settings().COOKIE_NAME)
        if raw and len(raw) <= 1024 and unquote(raw) == identity:
            return True
        try:
            named = cmd._identity(identity)
        except (TypeError, ValueError):
            return False  # Not an identity at all: the call itself will say so.
        session = stored_session(request)
        if session is not None and session.get(SESSION_IDENTITY) == named:
            return True
        user = getattr(request, "user", None)
        return bool(
            user is not None
            and (session is not None or not _lazy_session_user(user))
            and user.is_authenticated
            and self._named_identity(user) == named
        )

    @property
    def named(self) -> bool:
        """Whether the current person has a named identity (not the anonymous id)."""
        return self.active and self.identity not in (None, self.anonymous_id)
