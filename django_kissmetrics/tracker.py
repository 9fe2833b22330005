"""The ``km`` object: record, set, identify and alias, bound to the current request.

Inside a request (the middleware is installed) ``km`` is ``request.km``: calls about the
current person are buffered and leave as one delivery when the response does. Outside a
request (a Celery task, a management command, a shell) every call names its person with
``identity=`` and is sent at once, or at the end of a ``with km.batch():`` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.dispatch import receiver
from django.utils.functional import SimpleLazyObject, empty
from django.utils.module_loading import import_string

from . import commands as cmd
from .backends import get_backend
from .commands import Command
from .conf import get_settings
from .identity import new_anonymous_id

if TYPE_CHECKING:
    import datetime as dt

    from django.http import HttpRequest

logger = logging.getLogger(__name__)

__all__ = ["BrowserCommands", "RequestTracker", "Tracker", "current_tracker", "km"]

SESSION_IDENTITY = "_km_identity"
SESSION_BROWSER = "_km_browser"
SESSION_ALIASED = "_km_aliased"

_current: ContextVar[RequestTracker | None] = ContextVar("kissmetrics_tracker", default=None)
_batch: ContextVar[list[Command] | None] = ContextVar("kissmetrics_batch", default=None)


#: This thread's default database connection, once looked up, with the generation below.
_thread = threading.local()
#: Changes when DATABASES does (in tests): every thread then looks its connection up again.
_generation = 0


@receiver(setting_changed, dispatch_uid="django_kissmetrics.tracker")
def _forget_connections(*, setting: str, **kwargs: Any) -> None:
    global _generation
    if setting == "DATABASES":
        _generation += 1


def _in_transaction() -> bool:
    """Inside a real ``atomic()`` block (not one a TestCase wraps each test in)."""
    # A thread keeps its connection object for its whole life (Django's connections
    # are per thread), but looking it up goes through asgiref's Local and costs as
    # much as the rest of a km.record() call: look it up once per thread. Code in an
    # event loop has a connection per task, so it always asks.
    try:
        if _running_loop() is not None:
            conn = connections[DEFAULT_DB_ALIAS]
        else:
            cached = getattr(_thread, "connection", None)
            if cached is None or cached[0] != _generation:
                cached = _thread.connection = (_generation, connections[DEFAULT_DB_ALIAS])
            conn = cached[1]
    except Exception:
        return False
    return conn.in_atomic_block and any(
        not getattr(block, "_from_testcase", False) for block in conn.atomic_blocks
    )


# asyncio's own non-raising check (in its __all__): get_running_loop() raises when
# there is no loop, which is the common case here and costs an exception each time.
_running_loop = asyncio._get_running_loop


def _in_event_loop() -> bool:
    return _running_loop() is not None


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


class BrowserCommands:
    """Commands for the Kissmetrics JavaScript library, emitted by ``{% kissmetrics_js %}``.

    Use them for events that should carry the library's automatic page properties.
    Values keep their JSON types (numbers stay numbers). Queued in a request that
    ends without rendering the tag (a redirect), they wait in the session for the
    next page that does, and are emitted once.
    """

    def __init__(self, tracker: RequestTracker) -> None:
        self._tracker = tracker

    def record(self, event: str, properties: Mapping[str, Any] | None = None) -> None:
        """``_kmq.push(["record", event, properties])``."""
        self._tracker.push_browser(
            ["record", cmd._event_name(event), _browser_properties(properties)]
        )

    def set(self, properties: Mapping[str, Any]) -> None:
        """``_kmq.push(["set", properties])``."""
        self._tracker.push_browser(["set", _browser_properties(properties)])


def _browser_properties(properties: Mapping[str, Any] | None) -> dict[str, Any]:
    if properties is None:
        return {}
    if not isinstance(properties, Mapping):
        raise TypeError(f"Kissmetrics properties must be a dict, not {type(properties).__name__}")
    return {
        cmd._truncate(cmd._clean_text(str(k)), cmd.MAX_NAME_LENGTH, "property name"): v
        for k, v in properties.items()
        if v is not None
    }


class Tracker:
    """A tracker for code that runs outside a request: every call needs ``identity=``."""

    def record(
        self,
        event: str,
        properties: Mapping[str, Any] | None = None,
        *,
        identity: str | None = None,
        timestamp: dt.datetime | float | None = None,
    ) -> None:
        """Record ``event`` with ``properties`` for ``identity`` (default: the current person)."""
        person = self._person(identity)
        if person is None:
            return
        if person is _DEFERRED:
            when = cmd.to_timestamp(timestamp)
            cmd._event_name(event)  # A developer mistake raises now, not at the response.
            self._defer(lambda p: cmd.make_record(p, event, properties, when))
            return
        self._emit(cmd.make_record(person, event, properties, timestamp))

    def set(
        self,
        properties: Mapping[str, Any],
        *,
        identity: str | None = None,
        timestamp: dt.datetime | float | None = None,
    ) -> None:
        """Set ``properties`` on ``identity`` (default: the current person)."""
        person = self._person(identity)
        if person is None:
            return
        if person is _DEFERRED:
            when = cmd.to_timestamp(timestamp)
            self._defer(lambda p: cmd.make_set(p, properties, when))
            return
        self._emit(cmd.make_set(person, properties, timestamp))

    def alias(self, identity_a: str, identity_b: str) -> None:
        """Tie two identities into one person (irreversible; order does not matter)."""
        if self._allowed(explicit=True):
            self._emit(cmd.make_alias(identity_a, identity_b))

    def identify(self, identity: str) -> None:
        """Only meaningful inside a request; outside one, use :meth:`alias`."""
        raise ValueError(
            "km.identify() needs a request (install KissmetricsMiddleware); outside a "
            "request use km.alias(old_identity, new_identity)"
        )

    @property
    def identity(self) -> str | None:
        """The current person: ``None`` outside a request."""
        return None

    @property
    def js(self) -> BrowserCommands:
        """Browser-side commands: only inside a request that renders a page."""
        raise ValueError("km.js needs a request (install KissmetricsMiddleware)")

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group every call in the block into one delivery (one Celery message)."""
        if _batch.get() is not None:
            yield  # Nested: the outer block delivers.
            return
        buffer: list[Command] = []
        token = _batch.set(buffer)
        try:
            yield
        finally:
            _batch.reset(token)
            self._send(buffer)

    def _allowed(self, *, explicit: bool) -> bool:
        return get_settings().enabled

    def _person(self, identity: str | None) -> Any:
        if identity is None:
            raise ValueError(
                "Kissmetrics: no current person here (not inside a request with "
                "KissmetricsMiddleware); pass identity=..."
            )
        return identity if self._allowed(explicit=True) else None

    def _defer(self, make: Callable[[str], Command]) -> None:
        raise NotImplementedError

    def _emit(self, command: Command) -> None:
        if _in_transaction():
            # Only what the database keeps is tracked: nothing for a rolled-back signup.
            transaction.on_commit(functools.partial(self._add, command))
        else:
            self._add(command)

    def _add(self, command: Command) -> None:
        buffer = _batch.get()
        if buffer is not None:
            buffer.append(command)
        else:
            self._send([command])

    def _send(self, commands: list[Command]) -> None:
        for command in commands:
            if command.kind == "set" and not command.properties:
                # A set whose properties were all dropped (None values) has nothing to send.
                commands = [c for c in commands if c.kind != "set" or c.properties]
                if not commands:
                    return
                break
        try:
            get_backend().send(commands)
        except Exception as exc:
            from .delivery import give_up

            give_up(commands, exc, "backend raised")


_DEFERRED: Any = object()


class RequestTracker(Tracker):
    """The tracker of one request (``request.km``); made by the middleware.

    ``active`` is false for a visitor who is not tracked (no API key, Do Not Track,
    an excluded path, a bot); calls about the current person then do nothing.
    """

    # Class-level defaults: a request that changes none of them pays for no assignment.
    #: The anonymous id must be (re)written to the browser.
    new_anonymous_id = False
    logged_out = False
    browser_rendered = False
    _closed = False
    _identity: str | None = None
    _user_identity: tuple[Any, str | None] | None = None
    _aliased: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset()
    _signed_up: frozenset[str] | set[str] = frozenset()

    def __init__(
        self,
        request: HttpRequest,
        *,
        active: bool = True,
        allow_explicit: bool = True,
        anonymous_id: str | None = None,
    ) -> None:
        self.request = request
        self.active = active
        self.allow_explicit = allow_explicit
        self.anonymous_id = anonymous_id
        self.browser: list[list[Any]] = []
        self._buffer: list[Command] = []
        self._deferred: list[Callable[[str], Command]] = []
        if active and anonymous_id is None:
            self.anonymous_id = new_anonymous_id()
            self.new_anonymous_id = True

    @property
    def js(self) -> BrowserCommands:
        """Commands for the JavaScript library on the next page this visitor sees."""
        return BrowserCommands(self)

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

    @property
    def named(self) -> bool:
        """Whether the current person has a named identity (not the anonymous id)."""
        return self.active and self.identity not in (None, self.anonymous_id)

    def identify(self, identity: str) -> None:
        """The current person becomes ``identity`` for this request and the session.

        The anonymous id is aliased to it, once.
        """
        if not self.active:
            return
        named = cmd._identity(identity)
        self._alias_once(named)
        self._identity = named
        session = getattr(self.request, "session", None)
        if session is not None:
            session[SESSION_IDENTITY] = named

    def login(self, user: Any) -> None:
        """A user logged in: alias, identify, and record ``LOGIN_EVENT``."""
        if not self.active:
            return
        self.identify(identity_for(user))
        event = get_settings().LOGIN_EVENT
        if event:
            self.record(event)

    def signup(self, user: Any) -> None:
        """A user signed up: alias, identify, and record ``SIGNUP_EVENT`` once."""
        if not self.active:
            return
        named = identity_for(user)
        self.identify(named)
        event = get_settings().SIGNUP_EVENT
        if event and named not in self._signed_up:
            self._signed_up = {*self._signed_up, named}
            self.record(event)

    def logout(self) -> None:
        """Forget the named person; the browser gets a fresh anonymous id."""
        if not self.active:
            return
        self._identity = None
        self.logged_out = True
        self.anonymous_id = new_anonymous_id()
        self.new_anonymous_id = True
        self.browser = [c for c in self.browser if c[0] != "identify"]
        self.browser.insert(0, ["clearIdentity"])

    def record(
        self,
        event: str,
        properties: Mapping[str, Any] | None = None,
        *,
        identity: str | None = None,
        timestamp: dt.datetime | float | None = None,
    ) -> None:
        """Record ``event`` with ``properties`` for ``identity`` (default: the current person)."""
        if identity is not None or not self.active or _running_loop() is not None:
            super().record(event, properties, identity=identity, timestamp=timestamp)
            return
        # The common call, about the current person in a sync view, in a straight line:
        # it runs on every tracked request.
        command = cmd._record(self.identity, event, properties, timestamp)  # type: ignore[arg-type]
        if _in_transaction():
            transaction.on_commit(functools.partial(self._add, command))
        elif self._closed:
            self._send([command])
        else:
            self._buffer.append(command)

    def push_browser(self, command: list[Any]) -> None:
        """Queue a raw ``_kmq.push`` command for the page."""
        if self.active:
            self.browser.append(command)

    def close(self) -> list[Command]:
        """End the request: return its commands; later ones are sent on their own."""
        if self._deferred:
            for make in self._deferred:
                person = self.identity
                if person:
                    try:
                        self._buffer.append(make(person))
                    except (TypeError, ValueError):
                        logger.exception("Kissmetrics: dropped a malformed command")
            self._deferred.clear()
        self._closed = True
        commands, self._buffer = self._buffer, []
        return commands

    @property
    def has_deferred(self) -> bool:
        """Calls made from async code whose person is resolved at the response."""
        return bool(self._deferred)

    def _alias_once(self, named: str) -> None:
        anonymous = self.anonymous_id
        if not anonymous or anonymous == named or (anonymous, named) in self._aliased:
            return
        self._aliased = {*self._aliased, (anonymous, named)}
        # Remembered in the session too: logging in again the next day is not a new join.
        session = getattr(self.request, "session", None)
        pair = [anonymous, named]
        if session is not None:
            if session.get(SESSION_ALIASED) == pair:
                return
            session[SESSION_ALIASED] = pair
        self._emit(cmd.make_alias(anonymous, named))

    def _allowed(self, *, explicit: bool) -> bool:
        # Both flags are false when tracking is off: start() decided with the settings.
        return self.allow_explicit if explicit else self.active

    def _person(self, identity: str | None) -> Any:
        if identity is not None:
            return identity if self.allow_explicit else None
        if not self.active:
            return None
        if self._identity is None and _in_event_loop():
            # Working out the user may query the database, which async code must not
            # do here: the middleware resolves the person when the response leaves.
            return _DEFERRED
        return self.identity

    def _defer(self, make: Callable[[str], Command]) -> None:
        self._deferred.append(make)

    def _add(self, command: Command) -> None:
        if self._closed:
            self._send([command])  # An on_commit that fired after the response.
        else:
            self._buffer.append(command)


def current_tracker() -> Tracker:
    """The tracker of the current request, or the detached one outside requests."""
    return _current.get() or _detached


_detached = Tracker()


class _Km:
    """``km``: the current request's tracker, or a detached one outside requests."""

    def record(
        self,
        event: str,
        properties: Mapping[str, Any] | None = None,
        *,
        identity: str | None = None,
        timestamp: dt.datetime | float | None = None,
    ) -> None:
        """Record ``event`` (see :meth:`Tracker.record`)."""
        (_current.get() or _detached).record(
            event, properties, identity=identity, timestamp=timestamp
        )

    def set(
        self,
        properties: Mapping[str, Any],
        *,
        identity: str | None = None,
        timestamp: dt.datetime | float | None = None,
    ) -> None:
        """Set person properties (see :meth:`Tracker.set`)."""
        current_tracker().set(properties, identity=identity, timestamp=timestamp)

    def identify(self, identity: str) -> None:
        """The current person becomes ``identity`` (inside a request only)."""
        current_tracker().identify(identity)

    def alias(self, identity_a: str, identity_b: str) -> None:
        """Tie two identities into one person."""
        current_tracker().alias(identity_a, identity_b)

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Group the calls in a ``with`` block into one delivery."""
        return current_tracker().batch()

    @property
    def js(self) -> BrowserCommands:
        """Browser-side commands for the current request's page."""
        return current_tracker().js

    @property
    def identity(self) -> str | None:
        """The current person, or ``None`` outside a request."""
        return current_tracker().identity

    def __repr__(self) -> str:
        return f"<km {current_tracker()!r}>"


#: The public entry point: ``from django_kissmetrics import km``.
km = _Km()
