"""The tracking-API protocol over HTTP: one synchronous GET per command.

Usable on its own, without Django. Speed comes from one pooled keep-alive
``requests.Session`` per process and, for a batch, a few calls in flight at once.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies

from .commands import Command, make_alias, make_record, make_set
from .exceptions import TrackingError

__all__ = ["DEFAULT_TRACKING_URL", "USER_AGENT", "KissmetricsClient"]

DEFAULT_TRACKING_URL = "https://trk.kissmetrics.io"
#: Sent with every call, so that a tracking server's logs name the client.
USER_AGENT = "django-kissmetrics/0.1.0 (+https://pypi.org/project/django-kissmetrics/)"
POOL_SIZE = 16

_lock = threading.Lock()
_sessions: dict[str, requests.Session] = {}
_executor: ThreadPoolExecutor | None = None


def _after_fork() -> None:
    # Sockets and threads do not survive fork(): a child must open its own.
    global _executor, _lock
    _sessions.clear()
    _executor = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _session(base_url: str) -> requests.Session:
    session = _sessions.get(base_url)
    if session is None:
        with _lock:
            session = _sessions.get(base_url)
            if session is None:
                session = requests.Session()
                adapter = HTTPAdapter(pool_connections=1, pool_maxsize=POOL_SIZE)
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                session.headers["User-Agent"] = USER_AGENT
                # Proxy settings are read from the environment once, here, rather than on
                # every call: the per-call lookup costs more than the request itself.
                session.proxies.update(get_environ_proxies(base_url))
                session.trust_env = False
                _sessions[base_url] = session
    return session


def _pool(size: int) -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="kissmetrics")
    return _executor


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # An HTTP-date: rare from a tracker, and the backoff covers it.


class KissmetricsClient:
    """A client for the Kissmetrics tracking API.

    Each method makes one HTTP GET and returns once the server has answered 2xx;
    anything else raises :class:`~django_kissmetrics.exceptions.TrackingError`.
    """

    def __init__(self, key: str, *, url: str = DEFAULT_TRACKING_URL, timeout: float = 5.0) -> None:
        if not key:
            raise ValueError("KissmetricsClient needs an API key")
        self.key = key
        self.url = url.rstrip("/")
        self.timeout = timeout

    def record(
        self,
        person: str,
        event: str,
        properties: Mapping[str, Any] | None = None,
        timestamp: dt.datetime | float | None = None,
    ) -> None:
        """Record ``event`` for ``person``; ``timestamp`` back-dates it."""
        self.send(make_record(person, event, properties, timestamp), dated=timestamp is not None)

    def set(
        self,
        person: str,
        properties: Mapping[str, Any],
        timestamp: dt.datetime | float | None = None,
    ) -> None:
        """Set ``properties`` on ``person``; ``timestamp`` back-dates them."""
        self.send(make_set(person, properties, timestamp), dated=timestamp is not None)

    def alias(self, person: str, identity: str) -> None:
        """Tie ``person`` and ``identity`` into one person (irreversible)."""
        self.send(make_alias(person, identity))

    def url_for(self, command: Command, *, dated: bool = True) -> str:
        """The full URL that sends ``command``."""
        params = command.params(self.key)
        if not dated:
            params = [(k, v) for k, v in params if k not in ("_t", "_d")]
        return f"{self.url}{command.path}?{urlencode(params)}"

    def send(self, command: Command, *, dated: bool = True) -> None:
        """Send one command. ``dated=False`` leaves the time to the server."""
        url = self.url_for(command, dated=dated)
        try:
            response = _session(self.url).get(url, timeout=self.timeout)
        except requests.RequestException as exc:
            raise TrackingError(f"{type(exc).__name__}: {exc}") from exc
        # The body is a 1x1 GIF: read it so the connection goes back to the pool.
        response.content  # noqa: B018
        if not 200 <= response.status_code < 300:
            raise TrackingError(
                f"tracking server answered {response.status_code}",
                status=response.status_code,
                retry_after=_retry_after(response.headers.get("Retry-After")),
            )

    def send_many(
        self, commands: Sequence[Command], *, concurrency: int = 8
    ) -> list[tuple[Command, TrackingError]]:
        """Send every command, up to ``concurrency`` at once; return those that failed."""
        if concurrency <= 1 or len(commands) <= 1:
            return [f for f in map(self._try, commands) if f is not None]
        # A shared pool bounds the connections a worker process opens, however many
        # batches run in it at once.
        pool = _pool(min(concurrency, POOL_SIZE))
        return [f for f in pool.map(self._try, commands) if f is not None]

    def _try(self, command: Command) -> tuple[Command, TrackingError] | None:
        try:
            self.send(command)
        except TrackingError as exc:
            return command, exc
        return None


def failed_commands(failures: Iterable[tuple[Command, TrackingError]]) -> list[Command]:
    """The commands of a :meth:`KissmetricsClient.send_many` result."""
    return [command for command, _ in failures]
