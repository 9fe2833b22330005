"""The tracking-API protocol over HTTP: one synchronous GET per command.

Usable on its own, without Django. Speed comes from one pooled keep-alive
``requests.Session`` per process and, for a batch, a few calls in flight at once.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies, select_proxy

from .commands import Command, make_alias, make_record, make_set, nameless_properties
from .exceptions import TrackingError

__all__ = ["DEFAULT_TRACKING_URL", "USER_AGENT", "KissmetricsClient"]

DEFAULT_TRACKING_URL = "https://trk.kissmetrics.io"
#: Sent with every call, so that a tracking server's logs name the client.
USER_AGENT = "django-kissmetrics-sdk/0.1.0 (+https://pypi.org/project/django-kissmetrics-sdk/)"
#: Keep-alive connections kept per process and tracking server; also the most calls a
#: process has in flight for batches (``send_many``).
POOL_SIZE = 16
#: ``send_many`` brings in helper threads once its calls take longer than this on average
#: (seconds). Faster answers come from a tracker nearby (a relay, a stand-in on loopback):
#: a call then costs about as much CPU as it waits, and more threads would only contend
#: for the interpreter lock. Over the internet the first call (a connection, a round
#: trip of tens of milliseconds) starts them.
OVERLAP_AFTER = 0.001

_lock = threading.Lock()
_transports: dict[str, _Transport] = {}
_executor: ThreadPoolExecutor | None = None


def _after_fork() -> None:
    # Sockets and threads do not survive fork(): a child must open its own.
    global _executor, _lock
    _transports.clear()
    _executor = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


class _Response:
    """What the client needs of an answer: the status and ``Retry-After``."""

    __slots__ = ("retry_after", "status")

    def __init__(self, status: int, retry_after: str | None) -> None:
        self.status = status
        self.retry_after = retry_after


class _Transport:
    """This process's ``requests.Session`` for one tracking server, and its connection pool.

    ``requests`` spends more per call than the call itself costs on a fast network
    (preparing and merging the request, cookie jars, hooks, a ``Response`` object):
    nearly half of a loopback round trip. So the session is configured once (adapter,
    pool size, ``User-Agent``, proxies from the environment, TLS verification with
    requests' CA bundle) and, unless a proxy is in the way, each call goes straight to
    the urllib3 connection pool that the session's adapter owns, exactly as
    ``HTTPAdapter.send`` would, minus the per-call bookkeeping.
    """

    def __init__(self, base_url: str) -> None:
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=POOL_SIZE)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = USER_AGENT
        # Proxy settings are read from the environment once, here, rather than on
        # every call: the per-call lookup costs more than the request itself.
        session.proxies.update(get_environ_proxies(base_url))
        session.trust_env = False
        self.session = session
        # Only what the tracker needs: HTTP/1.1 keeps the connection alive by default and
        # the answer is a 43-byte GIF, so no Accept, Accept-Encoding or Connection header.
        self.headers = {"User-Agent": USER_AGENT}
        # Typed loosely: urllib3 1.x ships no types and its stubs leave these untyped.
        self.pool: Any = None
        if not select_proxy(base_url, session.proxies):
            self.pool = _pool_of(adapter, base_url)

    def get(self, url: str, target: str, timeout: urllib3.Timeout) -> _Response:
        """GET ``url`` (``target`` is its path and query), read the body, free the connection."""
        if self.pool is None:
            response = self.session.get(
                url, timeout=(timeout.connect_timeout, timeout.read_timeout)
            )
            # The body is a 1x1 GIF: read it so the connection goes back to the pool.
            response.content  # noqa: B018
            return _Response(response.status_code, response.headers.get("Retry-After"))
        # retries=False: a failure surfaces as itself; the caller decides about retrying
        # (a Celery retry that keeps the command's time). The body is read (preloaded),
        # which puts the connection back in the pool.
        answer = self.pool.urlopen(
            "GET",
            target,
            headers=self.headers,
            retries=False,
            redirect=False,
            assert_same_host=False,
            timeout=timeout,
        )
        return _Response(answer.status, answer.headers.get("Retry-After"))


def _pool_of(adapter: Any, base_url: str) -> Any:
    """The adapter's pool for ``base_url``, with the TLS settings ``HTTPAdapter.send`` applies."""
    get_pool = getattr(adapter, "get_connection_with_tls_context", None)
    if get_pool is not None:
        pool = get_pool(requests.Request("GET", base_url).prepare(), verify=True)
    else:  # requests < 2.32.2
        pool = adapter.get_connection(base_url)
    adapter.cert_verify(pool, base_url, True, None)
    return pool


def _transport(base_url: str) -> _Transport:
    transport = _transports.get(base_url)
    if transport is None:
        with _lock:
            transport = _transports.get(base_url)
            if transport is None:
                transport = _transports[base_url] = _Transport(base_url)
    return transport


def _session(base_url: str) -> requests.Session:
    """This process's session for ``base_url``."""
    return _transport(base_url).session


def _helpers() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _lock:
            if _executor is None:
                # One fewer than the pool: the calling thread sends too, so a batch never
                # holds more connections than the pool keeps.
                _executor = ThreadPoolExecutor(
                    max_workers=POOL_SIZE - 1, thread_name_prefix="kissmetrics"
                )
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
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        # A tracking URL may have a path prefix: the pool wants the path from the root.
        self._prefix = _path_of(self.url)

    def record(
        self,
        person: str,
        event: str | Mapping[str, Any] | None,
        properties: Mapping[str, Any] | None = None,
        timestamp: dt.datetime | float | None = None,
    ) -> None:
        """Record ``event`` for ``person``; ``timestamp`` back-dates it.

        Without an event name (``None``, ``""``, or the properties alone) it is :meth:`set`.
        """
        nameless = nameless_properties(event, properties)
        if nameless is not None:
            self.set(person, nameless, timestamp)
            return
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
        return f"{self.url}{self._target(command, dated)}"

    def _target(self, command: Command, dated: bool = True) -> str:
        params = command.params(self.key)
        if not dated:
            params = [(k, v) for k, v in params if k not in ("_t", "_d")]
        return f"{command.path}?{urlencode(params)}"

    def send(self, command: Command, *, dated: bool = True) -> int:
        """Send one command; return the server's (2xx) status. ``dated=False``: no ``_t``."""
        target = self._target(command, dated)
        failure: str | None = None
        try:
            response = _transport(self.url).get(
                f"{self.url}{target}", f"{self._prefix}{target}", self._timeout
            )
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            failure = _described(exc)
        if failure is not None:
            # Raised out here, with neither cause nor context: their text (and so any
            # traceback) holds the URL, with _k and the person's identity and properties.
            raise TrackingError(failure)
        if not 200 <= response.status < 300:
            raise TrackingError(
                f"tracking server answered {response.status}",
                status=response.status,
                retry_after=_retry_after(response.retry_after),
            )
        return response.status

    def send_many(
        self, commands: Sequence[Command], *, concurrency: int = 8
    ) -> list[tuple[Command, TrackingError]]:
        """Send every command, up to ``concurrency`` (at most :data:`POOL_SIZE`) at once.

        Returns the commands that failed, with their errors, in the order of ``commands``.

        The calling thread starts alone and brings in helper threads once calls take
        longer than :data:`OVERLAP_AFTER` on average (always so against the real tracker,
        over the internet).
        """
        workers = min(concurrency, len(commands), POOL_SIZE)
        if workers <= 1:
            return [f for f in map(self._try, commands) if f is not None]
        # Each thread takes the next unsent command until none is left: one hand-over
        # per thread rather than one per command, and never more than ``concurrency``
        # calls in flight. The helper threads are shared by the process, which bounds
        # the connections it opens however many batches run in it at once.
        pending = iter(enumerate(commands))
        take = threading.Lock()
        failed: list[tuple[int, Command, TrackingError]] = []

        def send_next() -> bool:
            with take:
                item = next(pending, None)
            if item is None:
                return False
            index, command = item
            failure = self._try(command)
            if failure is not None:
                failed.append((index, *failure))
            return True

        def work() -> None:
            while send_next():
                pass

        started = time.monotonic()
        sent = 0
        while send_next():
            sent += 1
            if time.monotonic() - started > OVERLAP_AFTER * sent:
                helpers = [_helpers().submit(work) for _ in range(workers - 1)]
                work()
                for helper in helpers:
                    # A helper still queued behind other batches' work has nothing left
                    # to send: drop it rather than wait for its turn.
                    if not helper.cancel():
                        helper.result()
                break
        failed.sort(key=lambda f: f[0])
        return [(command, error) for _, command, error in failed]

    def _try(self, command: Command) -> tuple[Command, TrackingError] | None:
        try:
            self.send(command)
        except TrackingError as exc:
            return command, exc
        return None


def _described(exc: BaseException) -> str:
    """A connection error as its type and, when the system gave one, its reason.

    Never the exception's own text: requests and urllib3 put the full URL in it.
    """
    names = [type(exc).__name__]
    reason = None
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen and len(names) < 6:
        seen.add(id(cause))
        if cause is not exc and type(cause).__name__ not in names:
            names.append(type(cause).__name__)
        if isinstance(cause, OSError) and cause.strerror and reason is None:
            reason = cause.strerror  # "Connection refused": the system's words, no URL.
        # urllib3 keeps the error inside as reason or original_error, requests as an
        # argument; Python as the cause or the context.
        inner = [getattr(cause, "reason", None), getattr(cause, "original_error", None)]
        inner += [*cause.args, cause.__cause__, cause.__context__]
        cause = next((e for e in inner if isinstance(e, BaseException)), None)
    text = f"connection failed: {' < '.join(names)}"
    return f"{text} ({reason})" if reason else text


def _path_of(url: str) -> str:
    # "https://host/prefix" -> "/prefix"; "https://host" -> "".
    rest = url.split("://", 1)[-1]
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else ""
