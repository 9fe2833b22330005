"""``KissmetricsPanel``: what a request sent to Kissmetrics, in django-debug-toolbar.

Add ``"django_kissmetrics.panels.KissmetricsPanel"`` to ``DEBUG_TOOLBAR_PANELS``. This
module imports the toolbar and nothing else imports this module: a site without the
toolbar never loads it, and its request path is unchanged.

The panel watches through the toolbar's own hook, ``enable_instrumentation``: the first
time it runs, it wraps the few places where a command changes hands (the request's
buffer handed over at the response, a delivery to the backend, a wait on a transaction
commit, the page's browser commands). The wrappers record only while a toolbar request
is running in their context; elsewhere they pass straight through.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

from debug_toolbar.panels import Panel
from django.db import DEFAULT_DB_ALIAS, connections
from django.http import HttpRequest, HttpResponseBase
from django.utils.module_loading import import_string

from . import shaping
from . import tracker as tracker_module
from .backends import get_backend
from .commands import Command
from .conf import get_settings
from .middleware import _is_bot
from .sites import key_for_host
from .templatetags import kissmetrics as tag_module
from .tracker import RequestTracker, Tracker

__all__ = ["KissmetricsPanel", "consent_state", "site_state", "track_state"]

SENT = "sent"
DEFERRED = "deferred to the response"
WAITING = "waiting on a transaction commit"
ROLLED_BACK = "not sent: its transaction rolled back"
DROPPED = "dropped by BEFORE_SEND"

#: How the current person was worked out (RequestTracker.identity_source()).
SOURCES = {
    "identify": "km.identify() in this request",
    "user": "the logged-in user, through IDENTITY",
    "session": "km.identify() earlier in this session",
    "cookie": "km_ai from the browser",
    "new": "a new anonymous id (km_ai is set on this response)",
}


class _Recording:
    """What one toolbar request saw, command by command."""

    def __init__(self) -> None:
        self.commands: list[dict[str, Any]] = []
        self._seen: dict[int, dict[str, Any]] = {}
        #: Commands waiting on a commit: (entry, the callback, the database alias).
        self.waiting: list[tuple[dict[str, Any], Callable[[], None], str]] = []
        #: The list close() returned, which the middleware then hands to the backend.
        self.handed_over: list[Command] | None = None
        #: What {% kissmetrics_js %} emitted, in order; None: the tag did not render.
        self.pushes: list[list[Any]] | None = None
        #: Commands BEFORE_SEND dropped.
        self.dropped = 0

    def see(self, command: Command, state: str) -> dict[str, Any]:
        # Keyed by identity: the same Command object travels from the call to the
        # backend, and it is kept alive here, so its id() is not reused.
        entry = self._seen.get(id(command))
        if entry is None:
            entry = self._seen[id(command)] = _describe(command)
            entry["after_commit"] = False
            self.commands.append(entry)
        entry["state"] = state
        return entry


_recording: ContextVar[_Recording | None] = ContextVar("kissmetrics_panel", default=None)


def _describe(command: Command) -> dict[str, Any]:
    when = dt.datetime.fromtimestamp(command.timestamp, dt.timezone.utc)
    return {
        "kind": command.kind,
        "person": command.person,
        # The second identity of an alias is its "event" column.
        "name": command.name,
        "properties": dict(command.properties),
        "timestamp": command.timestamp if command.kind != "alias" else None,
        "api_key": command.api_key or "",
        "time": when.strftime("%Y-%m-%d %H:%M:%S UTC") if command.kind != "alias" else "",
    }


class _ObservedTransaction:
    """``django.db.transaction`` as ``tracker.py`` sees it, with ``on_commit`` watched."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def on_commit(self, func: Callable[[], Any], using: str | None = None, **kwargs: Any) -> None:
        recording = _recording.get()
        command = getattr(func, "args", (None,))[:1]
        if recording is not None and command and isinstance(command[0], Command):
            entry = recording.see(command[0], WAITING)

            add = func

            def committed() -> None:
                entry["after_commit"] = True
                # Committed: _add() sends it now, or buffers it and close() says so.
                entry["state"] = SENT
                add()

            recording.waiting.append((entry, committed, using or DEFAULT_DB_ALIAS))
            func = committed
        self._module.on_commit(func, using, **kwargs)


_installed = False
_install_lock = threading.Lock()


def _install() -> None:
    """Wrap the hand-over points, once per process (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
        close = RequestTracker.close
        send = Tracker._send
        page_commands = tag_module.page_commands
        dropped = shaping.dropped

        @functools.wraps(close)
        def observed_close(self: RequestTracker) -> list[Command]:
            commands = close(self)
            recording = _recording.get()
            if recording is not None:
                recording.handed_over = commands
                for command in commands:
                    recording.see(command, DEFERRED)
            return commands

        @functools.wraps(send)
        def observed_send(self: Tracker, commands: list[Command]) -> None:
            recording = _recording.get()
            if recording is not None and commands is not recording.handed_over:
                for command in commands:
                    recording.see(command, SENT)
            send(self, commands)

        @functools.wraps(page_commands)
        def observed_page_commands(tracker: RequestTracker) -> list[list[Any]]:
            emitted = page_commands(tracker)
            recording = _recording.get()
            if recording is not None:
                recording.pushes = [*(recording.pushes or []), *emitted]
            return emitted

        @functools.wraps(dropped)
        def observed_dropped(command: Command, hook: str) -> None:
            recording = _recording.get()
            if recording is not None:
                recording.see(command, DROPPED)
                recording.dropped += 1
            dropped(command, hook)

        shaping.dropped = observed_dropped
        RequestTracker.close = observed_close  # type: ignore[method-assign]
        Tracker._send = observed_send  # type: ignore[method-assign]
        tag_module.page_commands = observed_page_commands
        # Only tracker.py's view of the module: every other on_commit() is untouched.
        module = vars(tracker_module)
        module["transaction"] = _ObservedTransaction(module["transaction"])


def _still_waiting(callback: Callable[[], None], alias: str) -> bool:
    # Django keeps a transaction's callbacks as (savepoint ids, callback, robust) until
    # it commits; a rollback drops them. Not public API: tests/test_panel.py's commit
    # tests fail the day it changes.
    pending = getattr(connections[alias], "run_on_commit", [])
    return any(item[1] is callback for item in pending)


def consent_state(request: HttpRequest) -> str:
    """The consent gate's answer for ``request``, in words.

    The gate is the ``CONSENT`` setting (a dotted path of ``request -> bool``); while it
    is ``None`` there is no gate.
    """
    path = get_settings().CONSENT
    if not path:
        return "no consent gate"
    try:
        given = import_string(path)(request)
    except Exception as exc:
        return f"{path} raised {type(exc).__name__}: {exc}"
    return f"given ({path})" if given else f"not given ({path})"


def track_state(request: HttpRequest) -> str:
    """The ``TRACK`` function's answer for ``request``, in words."""
    path = get_settings().TRACK
    if not path:
        return "no TRACK function"
    try:
        answer = import_string(path)(request)
    except Exception as exc:
        return f"{path} raised {type(exc).__name__}: {exc} (not tracked)"
    return f"tracked ({path})" if answer else f"kept out ({path})"


def site_state(request: HttpRequest, tracker: RequestTracker | None) -> str:
    """Which site (API key) this request belongs to, and why."""
    conf = get_settings()
    key = tracker.api_key if tracker is not None else None
    if conf.SITES is None:
        return f"{key or 'none'} (API_KEY)"
    if isinstance(conf.SITES, str):
        return f"{key or 'none'} (SITES: {conf.SITES})"
    try:
        host = request.get_host()
    except Exception:
        host = "a host ALLOWED_HOSTS refuses"
    if key is None:
        return f"none: {host} is in no SITES entry and there is no API_KEY"
    matched = key_for_host(host, conf.SITES, None) is not None
    source = "SITES" if matched else "API_KEY, the default"
    return f"{key} ({source}, host {host})"


def _visitor(request: HttpRequest, tracker: RequestTracker | None) -> dict[str, Any]:
    """Why this visitor is, or is not, tracked."""
    conf = get_settings()
    meta = request.META
    dnt, gpc = meta.get("HTTP_DNT"), meta.get("HTTP_SEC_GPC")
    path = request.path_info
    excluded = next((p for p in conf.EXCLUDE_PATHS if path.startswith(p)), None)
    agent = meta.get("HTTP_USER_AGENT", "")
    bots = conf.IGNORE_USER_AGENTS
    return {
        "tracked": bool(tracker is not None and tracker.active),
        "middleware": tracker is not None,
        "enabled": conf.enabled,
        "backend": conf.BACKEND,
        "honor_dnt": conf.HONOR_DNT,
        "dnt": dnt or "",
        "gpc": gpc or "",
        "opted_out": conf.HONOR_DNT and "1" in (dnt, gpc),
        "excluded": excluded or "",
        "bot": bool(bots is not None and _is_bot(agent, bots)),
        "user_agent": agent,
        "consent": consent_state(request),
        "site": site_state(request, tracker),
        "track": track_state(request),
    }


def _person(tracker: RequestTracker | None) -> dict[str, Any]:
    if tracker is None or not tracker.active:
        return {"identity": None, "source": "not tracked", "anonymous_id": None}
    source = tracker.identity_source()
    return {
        "identity": tracker.identity,
        "source": SOURCES.get(source or "", source or ""),
        "anonymous_id": tracker.anonymous_id,
    }


class KissmetricsPanel(Panel):
    """The request's Kissmetrics commands, browser pushes, person and tracking state."""

    title = "Kissmetrics"
    template = "django_kissmetrics/panel.html"
    is_async = True

    _token: Token[_Recording | None] | None = None

    def enable_instrumentation(self) -> None:
        """Start recording what this request hands over."""
        _install()
        self._recording = _Recording()
        self._token = _recording.set(self._recording)

    def disable_instrumentation(self) -> None:
        """Stop recording (the wrappers stay, passing through)."""
        if self._token is not None:
            _recording.reset(self._token)
            self._token = None

    @property
    def nav_subtitle(self) -> str:
        """``N server, M browser``."""
        stats = self.get_stats()  # type: ignore[no-untyped-call]
        if not stats:
            return ""
        dropped = stats.get("dropped", 0)
        text = f"{len(stats['commands']) - dropped} server, {len(stats['pushes'])} browser"
        return f"{text}, {dropped} dropped" if dropped else text

    def generate_stats(self, request: HttpRequest, response: HttpResponseBase) -> None:
        """Turn what was recorded into the panel's (JSON-safe) stats."""
        recording: _Recording = getattr(self, "_recording", None) or _Recording()
        tracker = getattr(request, "km", None)
        if not isinstance(tracker, RequestTracker):
            tracker = None
        for entry, callback, alias in recording.waiting:
            if entry["state"] == WAITING and not _still_waiting(callback, alias):
                entry["state"] = ROLLED_BACK
        pushes, pushes_state = _pushes(recording, tracker)
        self.record_stats(  # type: ignore[no-untyped-call]
            {
                "commands": recording.commands,
                "pushes": pushes,
                "pushes_state": pushes_state,
                "triggers": [tag_module.js_value(c) for c in (tracker.triggers if tracker else ())],
                "acquired": _acquired(tracker),
                "person": _person(tracker),
                "visitor": _visitor(request, tracker),
                "backend_class": type(get_backend()).__name__,
                "dropped": recording.dropped,
            }
        )


def _acquired(tracker: RequestTracker | None) -> list[dict[str, Any]]:
    """The acquisition events (``AUTO_EVENTS``) the middleware recorded on this request."""
    if tracker is None:
        return []
    return [
        {"event": name, "kind": "record" if name else "set", "properties": dict(properties)}
        for name, properties in tracker.acquired
    ]


def _pushes(recording: _Recording, tracker: RequestTracker | None) -> tuple[list[str], str]:
    """The ``_kmq.push`` commands as JSON, and where they went."""
    if recording.pushes is not None:
        return [tag_module.js_value(c) for c in recording.pushes], "emitted on this page"
    commands = tracker.browser if tracker is not None else []
    if not commands:
        return [], ""
    # No page rendered the tag (a redirect): the middleware keeps them in the session.
    where = (
        "kept in the session for the next page that renders {% kissmetrics_js %}"
        if getattr(tracker, "request", None) is not None
        and getattr(tracker.request, "session", None) is not None  # type: ignore[union-attr]
        else "dropped: no page rendered {% kissmetrics_js %} and there is no session"
    )
    return [tag_module.js_value(c) for c in commands], where
