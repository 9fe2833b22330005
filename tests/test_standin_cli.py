"""``python -m django_kissmetrics.testing``: the stand-in tracker on its own, printing each hit.

Run as a user would, in a subprocess; the hits are real HTTP from ``KissmetricsClient``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Empty, Queue

import pytest

from django_kissmetrics.client import KissmetricsClient
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


class Running:
    """The command in a subprocess, its output lines on a queue as they come."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "django_kissmetrics.testing", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: Queue[str] = Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 10.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except Empty:
            pytest.fail(f"no output in {timeout} s")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)  # Ctrl-C.
        return self.process.wait(10)


@pytest.fixture
def standin() -> Iterator[Running]:
    running = Running("--port", "0")
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait(10)


def test_it_prints_each_hit_until_ctrl_c(standin: Running) -> None:
    first = standin.line()
    assert first.startswith("Stand-in Kissmetrics tracker on http://127.0.0.1:")
    url = first.rsplit(" ", 1)[1]
    second = standin.line()
    assert f'KISSMETRICS["TRACKING_URL"] = "{url}"' in second
    client = KissmetricsClient("any-key", url=url, timeout=5)
    client.record("ann@example.com", "Signed Up", {"plan": "pro"}, timestamp=1796436468)
    client.set("ann@example.com", {"plan": "pro"}, timestamp=1796436468)
    client.alias("anon-id", "ann@example.com")
    lines = [standin.line() for _ in range(3)]
    assert lines[0].endswith(
        "200 record person='ann@example.com' event='Signed Up' {\"plan\": \"pro\"} _t=1796436468"
    )
    assert lines[1].endswith('200 set    person=\'ann@example.com\' {"plan": "pro"} _t=1796436468')
    assert lines[2].endswith("200 alias  person='anon-id' to='ann@example.com'")
    assert standin.stop() == 0
    assert standin.line() == "3 hit(s)."
    # The Testing page shows the same lines (a signup: the alias, then the event).
    sample = (ROOT / "docs" / "examples" / "standin.txt").read_text().splitlines()
    assert sample[0] == "$ python -m django_kissmetrics.testing --port 8001"
    assert sample[1:3] == [line.replace(url, "http://127.0.0.1:8001") for line in (first, second)]
    shown = {line.split(" ", 2)[2].split(" person=")[0] for line in sample[3:-1]}
    assert shown <= {line.split(" ", 2)[2].split(" person=")[0] for line in lines}
    assert sample[-1] == "^C3 hit(s)."


def test_it_listens_on_the_port_asked_for() -> None:
    port = free_port()
    running = Running("--port", str(port))
    try:
        assert running.line() == f"Stand-in Kissmetrics tracker on http://127.0.0.1:{port}"
        KissmetricsClient("k", url=f"http://127.0.0.1:{port}").record("p", "Hello")
        assert "event='Hello'" in running.line() + running.line()
    finally:
        assert running.stop() == 0


def test_a_port_in_use_is_an_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "django_kissmetrics.testing", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
