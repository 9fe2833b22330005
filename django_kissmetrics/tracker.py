"""The ``km`` object: record, set, identify and alias, bound to the current request.

Inside a request (the middleware is installed) ``km`` is ``request.km``: calls about the
current person are buffered and leave as one delivery when the response does. Outside a
request (a Celery task, a management command, a shell) every call names its person with
``identity=`` and is sent at once, or at the end of a ``with km.batch():`` block.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from django.db import transaction

from . import commands as cmd
from . import shaping
from .backends import get_backend
from .browser import BrowserCommands
from .commands import Command
from .conf import get_settings
from .identity import new_anonymous_id
from .person import SESSION_IDENTITY, CurrentPerson, identity_for, joined_at
from .transactions import in_event_loop, in_transaction, running_loop

if TYPE_CHECKING:
    import datetime as dt

    from django.http import HttpRequest

logger = logging.getLogger(__name__)

__all__ = ["BrowserCommands", "RequestTracker", "Tracker", "current_tracker", "km"]

SESSION_ALIASED = "_km_aliased"

_current: ContextVar[RequestTracker | None] = ContextVar("kissmetrics_tracker", default=None)
_batch: ContextVar[list[Command] | None] = ContextVar("kissmetrics_batch", default=None)
#: The ``api_key`` of the innermost ``km.batch(api_key=...)`` block.
_batch_key: ContextVar[str | None] = ContextVar("kissmetrics_batch_key", default=None)


class Tracker:
    """A tracker for code that runs outside a request: every call needs ``identity=``.

    Each command goes to the site ``api_key=`` names (or the enclosing
    ``km.batch(api_key=...)``'s), else ``API_KEY``.
    """

    @property
    def api_key(self) -> str | None:
        """The key of commands that name none: ``API_KEY`` outside a request."""
        return get_settings().API_KEY

    def record(
        self,
        event: str | Mapping[str, Any] | None,
        properties: Mapping[str, Any] | None = None,
        *,
        identity: str | None = None,
        timestamp: dt.datetime | float | None = None,
        api_key: str | None = None,
    ) -> None:
        """Record ``event`` with ``properties`` for ``identity`` (default: the current person).

        Without an event name (``None``, ``""``, or the properties alone) it is :meth:`set`.
        """
        nameless = cmd.nameless_properties(event, properties)
        if nameless is not None:
            self.set(nameless, identity=identity, timestamp=timestamp, api_key=api_key)
            return
        person = self._person(identity)
        if person is None:
            return
        key = self._key(api_key)
        if person is _DEFERRED:
            when = cmd.to_timestamp(timestamp)
            cmd._event_name(event)  # A developer mistake raises now, not at the response.
            self._defer(lambda p: cmd.make_record(p, event, properties, when, key), identity)
            return
        self._emit(cmd.make_record(person, event, properties, timestamp, key))

    def set(
        self,
        properties: Mapping[str, Any],
        *,
        identity: str | None = None,
        timestamp: dt.datetime | float | None = None,
        api_key: str | None = None,
    ) -> None:
        """Set ``properties`` on ``identity`` (default: the current person)."""
        person = self._person(identity)
        if person is None:
            return
        key = self._key(api_key)
        if person is _DEFERRED:
            when = cmd.to_timestamp(timestamp)
            self._defer(lambda p: cmd.make_set(p, properties, when, key), identity)
            return
        self._emit(cmd.make_set(person, properties, timestamp, key))

    def alias(self, identity_a: str, identity_b: str, *, api_key: str | None = None) -> None:
        """Tie two identities into one person (irreversible; order does not matter)."""
        if self._allowed(explicit=True):
            self._emit(cmd.make_alias(identity_a, identity_b, self._key(api_key)))

    def _key(self, api_key: str | None) -> str:
        key = api_key or _batch_key.get() or self.api_key or get_settings().API_KEY
        if key is None:
            raise ValueError(
                "Kissmetrics: no API key for this command: KISSMETRICS has SITES but no "
                "API_KEY, and no site is named here; pass api_key=..."
            )
        return key

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
    def batch(self, api_key: str | None = None) -> Iterator[None]:
        """Group every call in the block into one delivery (one Celery message).

        ``api_key``: the site of the block's commands that name none themselves.
        """
        key_token = _batch_key.set(api_key) if api_key else None
        try:
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
        finally:
            if key_token is not None:
                _batch_key.reset(key_token)

    def _allowed(self, *, explicit: bool) -> bool:
        return get_settings().enabled

    def _person(self, identity: str | None) -> Any:
        if identity is None:
            raise ValueError(
                "Kissmetrics: no current person here (not inside a request with "
                "KissmetricsMiddleware); pass identity=..."
            )
        return identity if self._allowed(explicit=True) else None

    def _defer(self, make: Callable[[str], Command | None], identity: str | None) -> None:
        raise NotImplementedError

    def _shape(self, command: Command) -> Command | None:
        conf = get_settings()
        return shaping.shape(command, conf) if conf.shaping else command

    def _emit(self, command: Command) -> None:
        shaped = self._shape(command)
        if shaped is None:
            return
        command = shaped
        if in_transaction():
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


class RequestTracker(CurrentPerson, Tracker):
    """The tracker of one request (``request.km``); made by the middleware.

    ``active`` is false for a visitor who is not tracked (no API key, Do Not Track,
    an excluded path, a bot); calls about the current person then do nothing.
    """

    # Class-level defaults: a request that changes none of them pays for no assignment.
    #: The anonymous id must be (re)written to the browser.
    new_anonymous_id = False
    logged_out = False
    browser_rendered = False
    #: ``CONSENT`` was asked about this request.
    gated = False
    #: The visitor has not agreed to analytics (``CONSENT``): the tag renders the inert loader.
    awaiting_consent = False
    #: Not agreed, yet the browser holds Kissmetrics cookies: the response deletes them.
    withdrawn = False
    #: A ``km_ai`` that is not an anonymous id but may be this person's named identity,
    #: which the JavaScript library writes there once it has identified them: kept (no
    #: new cookie, no alias) only when it is the logged-in person's own.
    claimed_id: str | None = None
    _closed = False
    #: Triggers declared on this request (``km.js.track_*`` and the template tags).
    triggers: tuple[list[Any], ...] | list[list[Any]] = ()
    #: The acquisition events the middleware records on this request (``AUTO_EVENTS``):
    #: (event name, properties), or (``None``, properties) to set.
    acquired: tuple[()] | list[tuple[str | None, dict[str, str]]] = ()
    #: When they happened (the request's start), in Unix seconds.
    acquired_at: int = 0
    #: The visit cookie to write on the response, if it changed.
    visit_cookie: str | None = None
    _aliased: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset()
    _signed_up: frozenset[str] | set[str] = frozenset()
    #: Primary keys of the users created in this request: one the visitor logs in as is
    #: their signup.
    created_users: frozenset[Any] | set[Any] = frozenset()
    #: GLOBAL_PROPERTIES for this request, worked out on first use.
    _globals: Mapping[str, str] | None = None
    #: This request's site (``SITES`` or ``API_KEY``): the key of its commands and tag.
    api_key: str | None = None

    def __init__(
        self,
        request: HttpRequest,
        *,
        active: bool = True,
        allow_explicit: bool = True,
        anonymous_id: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.request = request
        if api_key is not None:
            self.api_key = api_key
        self.active = active
        self.allow_explicit = allow_explicit
        self.anonymous_id = anonymous_id
        self.browser: list[list[Any]] = []
        self._buffer: list[Command] = []
        self._deferred: list[tuple[str | None, Callable[[str], Command | None]]] = []
        if active and anonymous_id is None:
            self.anonymous_id = new_anonymous_id()
            self.new_anonymous_id = True

    @property
    def js(self) -> BrowserCommands:
        """Commands for the JavaScript library on the next page this visitor sees."""
        return BrowserCommands(self)

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
        """A user logged in: alias, identify, and record ``LOGIN_EVENT``.

        Not for the login that follows a signup in the same request, unless
        ``LOGIN_EVENT_ON_SIGNUP``.
        """
        if not self.active:
            return
        named = identity_for(user)
        self.identify(named)
        conf = get_settings()
        # The login that completes a signup is part of it, not a returning user.
        after_signup = named in self._signed_up and not conf.LOGIN_EVENT_ON_SIGNUP
        if conf.LOGIN_EVENT and not after_signup:
            self.record(conf.LOGIN_EVENT)

    def signup(self, user: Any) -> None:
        """A user signed up: alias, identify, and record ``SIGNUP_EVENT`` once.

        The event carries the user's ``date_joined`` (where the model has it) as its
        time, so a later ``kissmetrics_backfill signups`` sends the very same record.
        """
        if not self.active:
            return
        named = identity_for(user)
        self.identify(named)
        event = get_settings().SIGNUP_EVENT
        if event and named not in self._signed_up:
            self._signed_up = {*self._signed_up, named}
            # At the user's creation, as kissmetrics_backfill sends it: the same record.
            self.record(event, timestamp=joined_at(user))

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
        event: str | Mapping[str, Any] | None,
        properties: Mapping[str, Any] | None = None,
        *,
        identity: str | None = None,
        timestamp: dt.datetime | float | None = None,
        api_key: str | None = None,
    ) -> None:
        """Record ``event`` with ``properties`` for ``identity`` (default: the current person).

        Without an event name (``None``, ``""``, or the properties alone) it is :meth:`set`.
        """
        if (
            type(event) is not str
            or not event
            or identity is not None
            or api_key is not None
            or not self.active
            or running_loop() is not None
        ):
            super().record(
                event, properties, identity=identity, timestamp=timestamp, api_key=api_key
            )
            return
        # The common call, about the current person in a sync view, in a straight line:
        # it runs on every tracked request.
        command = cmd._record(
            self.identity,  # type: ignore[arg-type]
            event,
            properties,
            timestamp,
            _batch_key.get() or self.api_key,
        )
        if get_settings().shaping:
            shaped = self._shape(command)
            if shaped is None:
                return
            command = shaped
        if in_transaction():
            transaction.on_commit(functools.partial(self._add, command))
        elif self._closed:
            self._send([command])
        else:
            self._buffer.append(command)

    def push_browser(self, command: list[Any]) -> None:
        """Queue a raw ``_kmq.push`` command for the page."""
        if self.active:
            self.browser.append(command)

    def add_commands(self, commands: list[Command]) -> None:
        """Commands the middleware itself makes about this request (``AUTO_EVENTS``).

        Shaped like every other call (``BEFORE_SEND``, ``GLOBAL_PROPERTIES``).
        """
        if get_settings().shaping:
            commands = [c for c in map(self._shape, commands) if c is not None]
        if self._closed:
            self._send(commands)
        else:
            self._buffer.extend(commands)

    def note_trigger(self, command: list[Any]) -> None:
        """Remember a trigger declared on this request (the toolbar panel lists them)."""
        self.triggers = [*self.triggers, command]

    def close(self) -> list[Command]:
        """End the request: return its commands; later ones are sent on their own."""
        if self._deferred:
            for identity, make in self._deferred:
                person = self.identity if identity is None else self._explicit(identity)
                if person:
                    try:
                        command = make(person)
                    except (TypeError, ValueError):
                        logger.exception("Kissmetrics: dropped a malformed command")
                        continue
                    if command is not None:
                        command = self._shape(command)
                    if command is not None:
                        self._buffer.append(command)
            self._deferred.clear()
        self._closed = True
        commands, self._buffer = self._buffer, []
        return commands

    @property
    def has_deferred(self) -> bool:
        """Calls made from async code whose person is resolved at the response."""
        return bool(self._deferred)

    def _shape(self, command: Command) -> Command | None:
        conf = get_settings()
        if not conf.shaping:
            return command
        if self._globals is None and conf.GLOBAL_PROPERTIES is not None:
            # Once per request: a function of the request gives the same answer each time.
            self._globals = shaping.global_properties(conf, self.request)
        return shaping.shape(command, conf, self.request, self._globals)

    def _alias_once(self, named: str) -> None:
        anonymous = self.anonymous_id
        if (
            not anonymous
            or anonymous == named
            or named == self.claimed_id  # The browser already holds it as km_ai.
            or (anonymous, named) in self._aliased
        ):
            return
        self._aliased = {*self._aliased, (anonymous, named)}
        # Remembered in the session too: logging in again the next day is not a new join.
        session = getattr(self.request, "session", None)
        pair = [anonymous, named]
        if session is not None:
            if session.get(SESSION_ALIASED) == pair:
                return
            session[SESSION_ALIASED] = pair
        self._emit(cmd.make_alias(anonymous, named, self._key(None)))

    def _allowed(self, *, explicit: bool) -> bool:
        # Both flags are false when tracking is off: start() decided with the settings.
        return self.allow_explicit if explicit else self.active

    def _person(self, identity: str | None) -> Any:
        if identity is not None:
            if self.awaiting_consent and self.allow_explicit and in_event_loop():
                return _DEFERRED  # Whether it names the visitor may need the database.
            return self._explicit(identity)
        if not self.active:
            return None
        if self._identity is None and in_event_loop():
            # Working out the user may query the database, which async code must not
            # do here: the middleware resolves the person when the response leaves.
            return _DEFERRED
        return self.identity

    def _defer(self, make: Callable[[str], Command | None], identity: str | None) -> None:
        self._deferred.append((identity, make))

    def _explicit(self, identity: str) -> str | None:
        """``identity`` if a call naming it may go: not when it names this visitor, who
        has not agreed (``CONSENT``), and never under Do Not Track."""
        if not self.allow_explicit:
            return None
        if self.awaiting_consent and self.is_visitor(identity):
            return None
        return identity

    def alias(self, identity_a: str, identity_b: str, *, api_key: str | None = None) -> None:
        """Tie two identities into one person (irreversible; order does not matter).

        While the visitor has not agreed (``CONSENT``), an alias naming them is dropped.
        """
        if not self.awaiting_consent:
            super().alias(identity_a, identity_b, api_key=api_key)
            return
        key = self._key(api_key)
        if self.allow_explicit and in_event_loop():
            self._defer(
                lambda a: (
                    cmd.make_alias(a, identity_b, key) if self._explicit(identity_b) else None
                ),
                identity_a,
            )
        elif self._explicit(identity_a) and self._explicit(identity_b):
            self._emit(cmd.make_alias(identity_a, identity_b, key))

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
        event: str | Mapping[str, Any] | None,
        properties: Mapping[str, Any] | None = None,
        *,
        identity: str | None = None,
        timestamp: dt.datetime | float | None = None,
        api_key: str | None = None,
    ) -> None:
        """Record ``event``; without a name, set ``properties`` (see :meth:`Tracker.record`).

        ``api_key`` names its site.
        """
        tracker = _current.get() or _detached
        if api_key is None:
            tracker.record(event, properties, identity=identity, timestamp=timestamp)
        else:
            tracker.record(
                event, properties, identity=identity, timestamp=timestamp, api_key=api_key
            )

    def set(
        self,
        properties: Mapping[str, Any],
        *,
        identity: str | None = None,
        timestamp: dt.datetime | float | None = None,
        api_key: str | None = None,
    ) -> None:
        """Set person properties (see :meth:`Tracker.set`); ``api_key`` names their site."""
        current_tracker().set(properties, identity=identity, timestamp=timestamp, api_key=api_key)

    def identify(self, identity: str) -> None:
        """The current person becomes ``identity`` (inside a request only)."""
        current_tracker().identify(identity)

    def alias(self, identity_a: str, identity_b: str, *, api_key: str | None = None) -> None:
        """Tie two identities into one person; ``api_key`` names the site."""
        current_tracker().alias(identity_a, identity_b, api_key=api_key)

    def batch(self, api_key: str | None = None) -> contextlib.AbstractContextManager[None]:
        """Group the calls in a ``with`` block into one delivery; ``api_key``: their site."""
        return current_tracker().batch(api_key)

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
