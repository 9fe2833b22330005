"""The test site (``tests.site``) under a real server in a subprocess, stopped as a deploy does.

``SiteProcess("uvicorn", ...)`` runs ``uvicorn tests.site.asgi:application --workers 2``
and so on for gunicorn, daphne, hypercorn and runserver; ``stop()`` sends the signal a
process manager sends (SIGTERM; SIGINT for runserver, as Ctrl-C) and waits for the exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.conftest import free_port, need
from tests.worker import ProcessGroup

__all__ = ["SERVERS", "SiteProcess"]

ROOT = Path(__file__).resolve().parent.parent


def _command(server: str, port: int, workers: int) -> list[str]:
    bind = f"127.0.0.1:{port}"
    if server == "gunicorn":
        return ["gunicorn", "tests.site.wsgi:application", "-b", bind, "-w", str(workers)]
    if server == "uvicorn":
        # The ASGI app as startproject writes it; --workers makes uvicorn a supervisor of
        # spawned worker processes, as sites run it.
        args = ["tests.site.asgi:application", "--port", str(port), "--workers", str(workers)]
        return ["uvicorn", *args, "--no-access-log"]
    if server == "daphne":
        return ["daphne", "-b", "127.0.0.1", "-p", str(port), "tests.site.asgi:application"]
    if server == "hypercorn":
        return ["hypercorn", "-b", bind, "-w", str(workers), "tests.site.asgi:application"]
    if server == "runserver":
        return [sys.executable, "-m", "django", "runserver", bind, "--noreload"]
    raise ValueError(server)


#: Each server with the signal that stops it gracefully.
SERVERS: dict[str, signal.Signals] = {
    "gunicorn": signal.SIGTERM,
    "uvicorn": signal.SIGTERM,
    "daphne": signal.SIGTERM,
    "hypercorn": signal.SIGTERM,
    "runserver": signal.SIGINT,
}


class SiteProcess(ProcessGroup):
    """One server process (and its workers) serving ``tests.site`` on a port of its own."""

    def __init__(
        self,
        server: str,
        kissmetrics: dict[str, Any],
        broker_url: str,
        *,
        workers: int = 2,
        port: int | None = None,
        options: Sequence[str] = (),
    ) -> None:
        self.server = server
        #: More command-line options for the server (``-k gthread --threads 4``).
        self.options = list(options)
        self.kissmetrics = kissmetrics
        self.broker_url = broker_url
        self.workers = workers
        self.port = port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"km-{server}-")
        self.log_path = Path(self._tmp.name) / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The site's root URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> SiteProcess:
        """Start the server and wait until it answers."""
        command = [*_command(self.server, self.port, self.workers), *self.options]
        if command[0] != sys.executable:
            binary = shutil.which(command[0], path=os.path.dirname(sys.executable))
            if binary is None:
                need(f"{command[0]} is not installed (pip install -e '.[test]')")
            command[0] = str(binary)
        config = {"kissmetrics": self.kissmetrics, "broker_url": self.broker_url}
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.site.settings",
            "KM_TEST_SITE_CONFIG": json.dumps(config),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.server} exited at start-up:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.server} did not start:\n{self.log()}")
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/nothing/", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def get(self, path: str) -> int:
        """GET ``path`` on a fresh connection (a new visitor); the status code."""
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            response.read()
            return int(response.status)

    def stop(self, timeout: float = 30.0) -> int:
        """The graceful stop a deploy sends; wait for the exit; the exit status."""
        assert self.process is not None, "the server is not running"
        self.process.send_signal(SERVERS[self.server])
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.server} did not stop:\n{self.log()}") from None
        # Workers of a supervisor that exited first must not outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None
        return code

    def __enter__(self) -> SiteProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._tmp.cleanup()


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` (the old server let go of it)."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0
