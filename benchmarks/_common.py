"""Helpers shared by the benchmarks: the machine, stand-in trackers in their own process, Django.

A stand-in tracker runs in a child process so that serving requests does not compete for
the interpreter lock with the code being measured; on a two-core machine that is the
difference between measuring the client and measuring the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Run as `python benchmarks/x.py` from a checkout: import the package under test.
    sys.path.insert(0, str(ROOT))

# The tracking API's answer to everything it accepts: a 1x1 transparent GIF.
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: image/gif\r\nContent-Length: "
    + str(len(GIF)).encode()
    + b"\r\n\r\n"
    + GIF
)
# What the peers' batch APIs answer to a batch they accept (posthog, segment).
_JSON_RESPONSE = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"status": 1}'
)


def machine() -> str:
    """One line naming the machine, so that figures are read against it."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: nproc={os.cpu_count()}, python {platform.python_version()} "
        f"({platform.python_implementation()}), {platform.system()} {platform.machine()}, "
        f"load average {load}"
    )


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return float(statistics.median(values))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])
            for i, c in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def interleave(
    contenders: dict[str, Callable[[], float]], rounds: int, *, warmup: bool = True
) -> dict[str, list[float]]:
    """Run each contender once per round, rotating the order; return each one's results.

    The machine is shared and noisy: interleaving spreads a slow spell over every
    contender instead of landing on one of them.
    """
    names = list(contenders)
    if warmup:
        for name in names:
            contenders[name]()
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(contenders[name]())
    return results


# --- Stand-in trackers in a child process ----------------------------------------------


class _FastProtocol(asyncio.Protocol):
    """Answers every request on a keep-alive connection with the GIF, and counts them.

    Lean on purpose: the throughput benchmark measures clients, so the server should cost
    as little as possible per request.
    """

    def __init__(self, counter: list[int], delay: float = 0.0) -> None:
        self.counter = counter
        self.delay = delay
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answers = 0
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            # GET requests only: no body follows the headers.
            self.buffer = self.buffer[end + 4 :]
            answers += 1
        if answers and self.transport is not None:
            self.counter[0] += answers
            if self.delay:
                # A tracker far away: the answer leaves ``delay`` seconds later, and the
                # loop serves every other connection meanwhile.
                asyncio.get_running_loop().call_later(self.delay, self._answer, answers)
            else:
                self.transport.write(_RESPONSE * answers)

    def _answer(self, answers: int) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_RESPONSE * answers)


class _BatchProtocol(_FastProtocol):
    """Reads whole requests, bodies included, and counts the events in them.

    For the peers, which POST batches of JSON (gzipped or not) where the tracking API takes
    one GET per command: an event is one occurrence of ``marker`` in a request's first line
    or its body, so every client is counted by what arrived, whatever its wire format.
    """

    def __init__(self, counter: list[int], marker: bytes) -> None:
        super().__init__(counter)
        self.marker = marker

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            first, *headers = self.buffer[:end].split(b"\r\n")
            fields = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in headers)
            }
            if b"transfer-encoding" in fields:
                # Not read here: fail loudly (the count then misses) rather than misparse.
                if self.transport is not None:
                    self.transport.close()
                self.buffer = b""
                return
            length = int(fields.get(b"content-length", b"0"))
            if len(self.buffer) < end + 4 + length:
                return  # The rest of the body is still on its way.
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            if b"gzip" in fields.get(b"content-encoding", b""):
                body = gzip.decompress(body)
            self.counter[0] += first.count(self.marker) + body.count(self.marker)
            if self.transport is not None:
                self.transport.write(_JSON_RESPONSE)


class _RecordingProtocol(_FastProtocol):
    """The lean server, noting each event's ``seq`` and ``_t`` (for end-to-end counts)."""

    def __init__(self, counter: list[int], delay: float, seen: dict[str, Any]) -> None:
        super().__init__(counter, delay)
        self.seen = seen

    def data_received(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\r\n\r\n")
        for request in lines[:-1]:
            target = request.split(b" ", 2)[1].decode("latin-1")
            params = dict(parse_qsl(urlsplit(target).query))
            seq = params.get("seq")
            if seq is not None:
                counts = self.seen["counts"]
                counts[seq] = counts.get(seq, 0) + 1
                if params.get("_d") == "1" and params.get("_t", "").isdigit():
                    self.seen["stamps"][seq] = int(params["_t"])
                self.seen["last"] = time.time()
        super().data_received(data)


def _serve_recording(conn: Connection, delay: float) -> None:
    counter = [0]
    seen: dict[str, Any] = {"counts": {}, "stamps": {}, "last": None}
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(
            lambda: _RecordingProtocol(counter, delay, seen), "127.0.0.1", 0, backlog=4096
        )
    )
    port = server.sockets[0].getsockname()[1]
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def report() -> dict[str, Any]:
        # Read in the loop's thread: the dicts change there.
        async def copy() -> dict[str, Any]:
            return {
                "counts": dict(seen["counts"]),
                "stamps": dict(seen["stamps"]),
                "last": seen["last"],
            }

        return asyncio.run_coroutine_threadsafe(copy(), loop).result()

    def reset() -> None:
        counter[0] = 0
        seen.update(counts={}, stamps={}, last=None)

    _control(conn, port, report, reset)


def _serve_fast(conn: Connection, marker: bytes | None = None, delay: float = 0.0) -> None:
    counter = [0]
    loop = asyncio.new_event_loop()

    def protocol() -> asyncio.Protocol:
        if marker is None:
            return _FastProtocol(counter, delay)
        return _BatchProtocol(counter, marker)

    server = loop.run_until_complete(loop.create_server(protocol, "127.0.0.1", 0, backlog=4096))
    port = server.sockets[0].getsockname()[1]
    threading.Thread(target=loop.run_forever, daemon=True).start()
    _control(conn, port, lambda: counter[0], lambda: counter.__setitem__(0, 0))


def _serve_stand_in(conn: Connection, delay: float) -> None:
    import socketserver

    from django_kissmetrics.testing import StandInTracker

    # The stand-in writes the status and headers, then the body, in two writes. With
    # Nagle's algorithm on, the body waits for the client's delayed ACK of the headers
    # (40 ms on Linux) and every answer takes delay + 40 ms. A real tracker answers in
    # one segment; TCP_NODELAY (this child process only) makes the stand-in do the same.
    socketserver.StreamRequestHandler.disable_nagle_algorithm = True

    tracker = StandInTracker().start()
    tracker.delay = delay

    def reset() -> None:
        tracker.reset()
        tracker.delay = delay

    _control(conn, tracker.port, lambda: len(tracker.hits), reset)


def _control(
    conn: Connection, port: int, hits: Callable[[], Any], reset: Callable[[], None]
) -> None:
    conn.send(port)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message == "hits":
            conn.send(hits())
        elif message == "reset":
            reset()
            conn.send(None)
        else:
            conn.send(None)
            return


class TrackerProcess:
    """A stand-in tracker in a child process; ``hits()`` counts the requests it answered.

    ``kind="fast"``: a lean asyncio server, for throughput; with ``delay`` it holds each
    answer that long while serving every other connection (thousands of answers a
    second at any delay). ``kind="stand-in"``: the
    package's threaded :class:`~django_kissmetrics.testing.StandInTracker`, which holds
    every answer ``delay`` seconds, for latency. ``kind="batch"``: the lean server reading
    request bodies too, for the peers' batch APIs; ``hits()`` then counts the events in
    them (each occurrence of ``marker``). ``kind="recording"``: the lean server with
    ``delay``, noting each event's ``seq`` property and ``_t``; :meth:`seen` reads them.
    """

    def __init__(self, kind: str = "fast", delay: float = 0.0, marker: bytes = b"") -> None:
        self.kind = kind
        self.delay = delay
        self.marker = marker
        self.port = 0
        self._conn: Connection | None = None
        self._process: Any = None

    @property
    def host(self) -> str:
        """``host:port``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The ``TRACKING_URL`` that points here."""
        return f"http://{self.host}"

    def start(self) -> TrackerProcess:
        """Start the child and wait until it listens."""
        # spawn, not fork: the child must not inherit this process's threads and sockets.
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        if self.kind == "fast":
            target: Callable[..., None] = _serve_fast
            args: tuple[Any, ...] = (child, None, self.delay)
        elif self.kind == "recording":
            target, args = _serve_recording, (child, self.delay)
        elif self.kind == "batch":
            if not self.marker:
                raise ValueError('kind="batch" counts a marker: give a non-empty one')
            target, args = _serve_fast, (child, self.marker)
        else:
            target, args = _serve_stand_in, (child, self.delay)
        self._process = context.Process(target=target, args=args, daemon=True)
        self._process.start()
        self._conn = parent
        if not parent.poll(30):
            raise RuntimeError("the stand-in tracker did not start")
        self.port = int(parent.recv())
        return self

    def _ask(self, message: str) -> Any:
        assert self._conn is not None
        self._conn.send(message)
        return self._conn.recv()

    def hits(self) -> int:
        """Requests answered since the last :meth:`reset`."""
        return int(self._ask("hits"))

    def seen(self) -> dict[str, Any]:
        """``kind="recording"``: ``counts`` (seq -> hits), ``stamps`` (seq -> ``_t``) and
        ``last`` (the time of the last hit)."""
        result: dict[str, Any] = self._ask("hits")
        return result

    def reset(self) -> None:
        """Forget the hits."""
        self._ask("reset")

    def stop(self) -> None:
        """End the child."""
        if self._conn is not None:
            with contextlib.suppress(BrokenPipeError, EOFError):
                self._ask("stop")
            self._conn = None
        if self._process is not None:
            self._process.join(5)
            if self._process.is_alive():
                self._process.terminate()
            self._process = None

    def __enter__(self) -> TrackerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Django -------------------------------------------------------------------------


def setup_django(**overrides: Any) -> None:
    """Configure Django with a minimal site (sqlite in memory) plus ``overrides``."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    options: dict[str, Any] = {
        "SECRET_KEY": "benchmarks-only-not-secret",
        "DEBUG": False,
        "ALLOWED_HOSTS": ["*"],
        "USE_TZ": True,
        "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
        "INSTALLED_APPS": [
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "django_kissmetrics",
        ],
        "DATABASES": {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        "LOGGING_CONFIG": None,
    }
    options.update(overrides)
    settings.configure(**options)
    django.setup()


def timed(func: Callable[[], object]) -> float:
    """Seconds ``func()`` took."""
    started = time.perf_counter()
    func()
    return time.perf_counter() - started
