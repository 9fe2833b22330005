"""The tracking-API protocol over HTTP: one GET per command, on aiohttp.

Usable on its own, without Django. Kissmetrics has no batch endpoint, so a batch is as fast
as the calls it keeps in flight: each process runs one asyncio event loop (in a daemon
thread of its own, started on first use and anew after ``fork``) with one aiohttp session
per tracking server, whose keep-alive connections every client of the process shares.
A batch is sent by a fixed number of coroutines that each take the next command until
none is left; a single call (``record``, ``set``, ``alias``) is one coroutine run on that
loop while the calling thread waits, so the synchronous API is the same from any thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
import urllib.request
import warnings
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import aiohttp
from yarl import URL

from .commands import Command, make_alias, make_record, make_set, nameless_properties
from .exceptions import TrackingError

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_TRACKING_URL",
    "USER_AGENT",
    "KissmetricsClient",
    "close",
]

DEFAULT_TRACKING_URL = "https://trk.kissmetrics.io"
#: Sent with every call, so that a tracking server's logs name the client.
USER_AGENT = "django-kissmetrics-sdk/0.1.0 (+https://pypi.org/project/django-kissmetrics-sdk/)"
#: The most calls a process has in flight to one tracking server, and so the most
#: keep-alive connections it holds there, unless a client is given another number.
#: Chosen from ``benchmarks/delivery.py``: enough for one process to keep a core busy
#: against a tracker 50 ms away, few enough to be a polite number of sockets.
DEFAULT_CONCURRENCY = 256

_T = TypeVar("_T")
# What a failed call raises: aiohttp's errors, its timeouts, and the socket's own.
_NETWORK_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class _Engine:
    """This process's event loop, in a daemon thread, and its sessions (one per tracker)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.sessions: dict[tuple[str, int], aiohttp.ClientSession] = {}
        self._inline = threading.Lock()
        self.thread: threading.Thread | None = threading.Thread(
            target=self._run, name="kissmetrics-delivery", daemon=True
        )
        try:
            self.thread.start()
        except RuntimeError:
            # Python 3.12.0 to 3.12.2 start no thread in an exit hook (CPython gh-113964):
            # a flush at exit then runs the loop in the calling thread instead.
            self.thread = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the loop and wait for its result in the calling thread."""
        if self.thread is None:
            with self._inline:
                return self.loop.run_until_complete(coroutine)
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError("KissmetricsClient's blocking API called on its own loop")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            # The caller gave up (a Celery soft time limit, KeyboardInterrupt): so do the
            # calls still in flight, rather than run on unobserved.
            future.cancel()
            raise

    def session(self, base_url: str, connections: int) -> aiohttp.ClientSession:
        """The session for ``base_url`` (on the loop's thread only: no lock needed)."""
        session = self.sessions.get((base_url, connections))
        if session is None or session.closed:
            session = self.sessions[base_url, connections] = _new_session(connections)
        return session

    async def close(self) -> None:
        """Close every session (their connections); the loop stays usable."""
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            await session.close()


def _new_session(connections: int) -> aiohttp.ClientSession:
    # Proxies are read from the environment when a client is made (_proxy_for), not by
    # aiohttp on every call: trust_env looks them up, and netrc, in a helper thread per call.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections),
        headers={"User-Agent": USER_AGENT},
        # The answer is a 43-byte GIF: no compression to negotiate, no content types.
        skip_auto_headers=("Accept", "Accept-Encoding"),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        # TLS: aiohttp's default, a verifying context with the system's certificates.
    )


_lock = threading.Lock()
_engine: _Engine | None = None
#: Engines inherited through ``fork``: their loop thread does not exist in the child and
#: their sockets are the parent's, so they are kept, never used nor closed.
_inherited: list[_Engine] = []


def _get_engine() -> _Engine:
    global _engine
    engine = _engine
    if engine is None:
        with _lock:
            engine = _engine
            if engine is None:
                engine = _engine = _Engine()
    return engine


def _after_fork() -> None:
    global _engine, _lock
    if _engine is not None:
        _inherited.append(_engine)
    _engine = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def close() -> None:
    """Close this process's connections to every tracking server (reopened on next use)."""
    engine = _engine
    if engine is not None and (engine.thread is None or engine.thread.is_alive()):
        engine.run(engine.close())


def __getattr__(name: str) -> Any:
    # POOL_SIZE bounded the threads of the client before it ran on an event loop.
    if name == "POOL_SIZE":
        warnings.warn(
            "django_kissmetrics.client.POOL_SIZE is deprecated: the calls in flight are "
            "KISSMETRICS['DELIVERY_CONCURRENCY'] (client.DEFAULT_CONCURRENCY)",
            DeprecationWarning,
            stacklevel=2,
        )
        return DEFAULT_CONCURRENCY
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _proxy_for(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy that ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` give for ``url``."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.netloc):
        return None, None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy:
        return None, None
    if "://" not in proxy:
        proxy = f"http://{proxy}"
    address = URL(proxy)
    auth = aiohttp.BasicAuth.from_url(address)
    return address.with_user(None), auth


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

    Clients are cheap: the connections belong to the process, one pool per tracking
    server (and ``concurrency``), shared by every client and key that sends there.
    ``concurrency`` is the most calls the process has in flight to ``url`` through
    such clients, and the most connections it opens there.
    """

    def __init__(
        self,
        key: str,
        *,
        url: str = DEFAULT_TRACKING_URL,
        timeout: float = 5.0,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        if not key:
            raise ValueError("KissmetricsClient needs an API key")
        if concurrency < 1:
            raise ValueError("KissmetricsClient needs a concurrency of at least 1")
        self.key = key
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.concurrency = concurrency
        # Per call: connecting, and then each wait for the answer's bytes. A wait for a
        # free connection (other batches of the process hold them all) is not a fault.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=timeout, sock_read=timeout
        )
        self._proxy, self._proxy_auth = _proxy_for(self.url)

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
        params = command.params(self.key)
        if not dated:
            params = [(k, v) for k, v in params if k not in ("_t", "_d")]
        return f"{self.url}{command.path}?{urlencode(params)}"

    def send(self, command: Command, *, dated: bool = True) -> int:
        """Send one command; return the server's (2xx) status. ``dated=False``: no ``_t``."""
        return _get_engine().run(self._send_one(command, dated))

    async def _send_one(self, command: Command, dated: bool) -> int:
        session = _get_engine().session(self.url, self.concurrency)
        return await self._call(session, command, dated)

    async def _call(self, session: aiohttp.ClientSession, command: Command, dated: bool) -> int:
        # encoded=True: urlencode has quoted the query already; yarl would parse it again.
        target = URL(self.url_for(command, dated=dated), encoded=True)
        failure: str | None = None
        try:
            async with session.get(
                target,
                allow_redirects=False,
                timeout=self._timeout,
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
            ) as response:
                # The body is a 1x1 GIF: read it so the connection goes back to the pool.
                await response.read()
                status, retry_after = response.status, response.headers.get("Retry-After")
        except _NETWORK_ERRORS as exc:
            failure = _described(exc)
        if failure is not None:
            # Raised out here, with neither cause nor context: their text (and so any
            # traceback) may hold the URL, with _k and the person's identity and properties.
            raise TrackingError(failure)
        if not 200 <= status < 300:
            raise TrackingError(
                f"tracking server answered {status}",
                status=status,
                retry_after=_retry_after(retry_after),
            )
        return status

    def send_many(
        self, commands: Iterable[Command], *, concurrency: int | None = None
    ) -> list[tuple[Command, TrackingError]]:
        """Send every command, up to ``concurrency`` (at most the client's) at once.

        Returns the commands that failed, with their errors, in the order of ``commands``.
        ``commands`` may be any iterable, read as the calls go: a batch of any size holds
        at most ``concurrency`` calls, coroutines and connections at a time.
        """
        return _get_engine().run(self._send_all(commands, concurrency))

    async def _send_all(
        self, commands: Iterable[Command], concurrency: int | None
    ) -> list[tuple[Command, TrackingError]]:
        workers = min(concurrency or self.concurrency, self.concurrency)
        if isinstance(commands, Sequence):
            workers = min(workers, len(commands))
        if workers < 1:
            return []
        session = _get_engine().session(self.url, self.concurrency)
        pending: Iterator[tuple[int, Command]] = enumerate(commands)
        failed: list[tuple[int, Command, TrackingError]] = []

        async def work() -> None:
            # Each worker takes the next unsent command until none is left: a fixed
            # number of coroutines, whatever the size of the batch.
            for index, command in pending:
                try:
                    await self._call(session, command, True)
                except TrackingError as exc:
                    failed.append((index, command, exc))

        await asyncio.gather(*(work() for _ in range(workers)))
        failed.sort(key=lambda f: f[0])
        return [(command, error) for _, command, error in failed]


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
