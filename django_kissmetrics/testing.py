"""Testing helpers: the ``locmem`` outbox and a stand-in tracking server on loopback.

``outbox`` holds the commands sent with ``"BACKEND": "locmem"``; the pytest fixture
``km_outbox`` clears it between tests. :class:`StandInTracker` answers ``/e``, ``/s``
and ``/a`` like the real API and records every hit, so integration tests can send
real HTTP without a Kissmetrics account.

``python -m django_kissmetrics.testing [--host H] [--port N]`` runs the stand-in on its
own and prints each hit, until Ctrl-C: point ``TRACKING_URL`` at it to see what a site
sends before it has an account.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .commands import Command

__all__ = ["Hit", "StandInTracker", "main", "outbox"]

#: Commands sent with the ``locmem`` backend, oldest first.
outbox: list[Command] = []

# The tracking API's answer to everything it accepts: a 1x1 transparent GIF.
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


@dataclass(frozen=True)
class Hit:
    """One request the stand-in tracker received."""

    path: str
    params: dict[str, str]
    user_agent: str = ""
    received: float = field(default_factory=time.time)

    @property
    def person(self) -> str:
        """``_p``."""
        return self.params.get("_p", "")

    @property
    def name(self) -> str | None:
        """``_n``: the event name, or the second identity of an alias."""
        return self.params.get("_n")

    @property
    def properties(self) -> dict[str, str]:
        """Every parameter that is not a transport field."""
        return {k: v for k, v in self.params.items() if k not in ("_k", "_p", "_n", "_t", "_d")}


class StandInTracker:
    """A loopback HTTP server that answers like the tracking API and records hits.

    Faults for tests: ``fail(n, status)`` answers ``status`` to the next ``n`` hits,
    ``delay`` holds every answer that many seconds, ``stop()`` refuses connections
    until ``start()`` again (on the same port). ``on_hit`` is called with every hit,
    in the server's thread.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_hit: Callable[[Hit, int], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.on_hit = on_hit
        self.hits: list[Hit] = []
        self.refused: list[Hit] = []
        self.delay = 0.0
        self.retry_after: str | None = None
        self._failures: list[int] = []
        self._lock = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The ``TRACKING_URL`` that points here."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> StandInTracker:
        """Start serving (on the same port as before, after a :meth:`stop`)."""
        handler = _handler(self)
        server = ThreadingHTTPServer((self.host, self.port), handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: connections are refused until :meth:`start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        # Kept-alive connections too: a stopped tracker serves nobody.
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def fail(self, count: int, status: int = 503) -> None:
        """Answer ``status`` to the next ``count`` hits."""
        with self._lock:
            self._failures += [status] * count

    def reset(self) -> None:
        """Forget hits and faults."""
        with self._lock:
            self.hits.clear()
            self.refused.clear()
            self._failures.clear()
            self.delay = 0.0
            self.retry_after = None

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Hit]:
        """Wait until at least ``count`` hits arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.hits) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            return list(self.hits)

    def _answer(self, path: str, query: str, user_agent: str) -> int:
        hit = Hit(path, dict(parse_qsl(query, keep_blank_values=True)), user_agent)
        with self._lock:
            status = self._failures.pop(0) if self._failures else 200
            (self.hits if status == 200 else self.refused).append(hit)
            self._lock.notify_all()
        if self.on_hit is not None:
            self.on_hit(hit, status)
        return status

    def __enter__(self) -> StandInTracker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _handler(tracker: StandInTracker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # Keep-alive, as the real server.
        # Headers and body go out in two writes; without this, Nagle's algorithm and
        # delayed ACKs hold every answer about 40 ms.
        disable_nagle_algorithm = True

        def setup(self) -> None:
            super().setup()
            with tracker._lock:
                tracker._connections.add(self.request)

        def finish(self) -> None:
            with tracker._lock:
                tracker._connections.discard(self.request)
            with contextlib.suppress(OSError):
                super().finish()

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if tracker.delay:
                time.sleep(tracker.delay)
            status = tracker._answer(parts.path, parts.query, self.headers.get("User-Agent", ""))
            try:
                self.send_response(status)
                if status != 200 and tracker.retry_after:
                    self.send_header("Retry-After", tracker.retry_after)
                self.send_header("Content-Type", "image/gif")
                self.send_header("Content-Length", str(len(GIF)))
                self.end_headers()
                self.wfile.write(GIF)
            except OSError:
                pass  # The client gave up waiting (a timeout test): nothing to answer.

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


_KINDS = {"/e": "record", "/s": "set", "/a": "alias"}


def _describe(hit: Hit, status: int = 200) -> str:
    """One line for ``hit``: what Kissmetrics would make of it."""
    kind = _KINDS.get(hit.path, hit.path)
    when = time.strftime("%H:%M:%S", time.localtime(hit.received))
    text = f"{when} {status} {kind:<6} person={hit.person!r}"
    if kind == "record":
        text += f" event={hit.name!r}"
    elif kind == "alias":
        text += f" to={hit.name!r}"
    if hit.properties:
        text += " " + json.dumps(hit.properties, ensure_ascii=False)
    if "_t" in hit.params:
        text += f" _t={hit.params['_t']}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in tracker and print each hit until Ctrl-C (or SIGTERM)."""
    parser = argparse.ArgumentParser(
        prog="python -m django_kissmetrics.testing",
        description="A stand-in Kissmetrics tracking server that prints what it receives.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8001, help="port (0: any free one)")
    options = parser.parse_args(argv)

    def show(hit: Hit, status: int) -> None:
        print(_describe(hit, status), flush=True)

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        tracker = StandInTracker(options.host, options.port, on_hit=show).start()
    except OSError as exc:
        print(f"cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr)
        return 1
    print(
        f"Stand-in Kissmetrics tracker on {tracker.url}\n"
        f'Set KISSMETRICS["TRACKING_URL"] = "{tracker.url}" (any API_KEY will do); '
        "Ctrl-C stops it.",
        flush=True,
    )
    try:
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    tracker.stop()
    print(f"{len(tracker.hits)} hit(s).", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
