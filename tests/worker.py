"""A real Celery worker in a subprocess, for tests (and the soak benchmark) that kill it.

An in-process worker cannot be SIGKILLed without killing the test run, and it shares the
test's broker connection pool; a subprocess is what production runs. ``WorkerProcess``
starts ``python -m tests.worker``, which sets Django up from ``tests.settings`` with the
overrides the parent passes in one environment variable, then runs the worker of
``tests.celery_app``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["ProcessGroup", "WorkerProcess", "rss_kb"]

ROOT = Path(__file__).resolve().parent.parent
#: JSON handed to the subprocess: ``kissmetrics`` (keys merged into ``KISSMETRICS``),
#: ``broker_url``, ``transport_options``, ``ready_file`` and ``lose_api_key`` (the key
#: is removed once the worker is ready).
CONFIG_ENV = "KM_TEST_WORKER_CONFIG"


def rss_kb(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (``VmRSS`` in ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # A zombie has no VmRSS line.


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the prefork pool's processes)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue  # The thread ended while we looked.
    return found


class ProcessGroup:
    """A subprocess in a session of its own, with its output in ``log_path``."""

    process: subprocess.Popen[bytes] | None
    log_path: Path

    def kill(self) -> None:
        """SIGKILL the process group: no shutdown, no acknowledgement, no cleanup."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def log(self) -> str:
        """What the process wrote so far (its log and any traceback)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class WorkerProcess(ProcessGroup):
    """``celery worker`` for ``tests.celery_app`` in its own process group.

    ``transport_options`` are merged over ``CELERY_BROKER_TRANSPORT_OPTIONS``: tests that
    kill a worker pass a short ``visibility_timeout`` (and a quick restore sweep), so an
    abandoned message comes back in seconds rather than an hour.
    """

    def __init__(
        self,
        broker_url: str,
        kissmetrics: dict[str, Any],
        *,
        pool: str = "threads",
        concurrency: int = 4,
        transport_options: dict[str, Any] | None = None,
        log_path: Path | None = None,
        loglevel: str = "INFO",
        lose_api_key: bool = False,
    ) -> None:
        self.broker_url = broker_url
        self.kissmetrics = kissmetrics
        self.pool = pool
        self.concurrency = concurrency
        self.transport_options = transport_options or {}
        self.loglevel = loglevel
        self.lose_api_key = lose_api_key
        self._tmp = tempfile.TemporaryDirectory(prefix="km-worker-")
        self.log_path = log_path or Path(self._tmp.name) / "worker.log"
        self.ready_file = Path(self._tmp.name) / f"ready-{time.monotonic_ns()}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The worker's main process."""
        assert self.process is not None, "the worker is not running"
        return self.process.pid

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        """Start the worker and wait until it consumes from the broker."""
        self.ready_file.unlink(missing_ok=True)
        config = {
            "kissmetrics": self.kissmetrics,
            "broker_url": self.broker_url,
            "transport_options": self.transport_options,
            "ready_file": str(self.ready_file),
            "lose_api_key": self.lose_api_key,
        }
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "KM_TEST_REDIS_URL": self.broker_url,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            CONFIG_ENV: json.dumps(config),
        }
        command = [
            sys.executable,
            "-m",
            "tests.worker",
            f"--pool={self.pool}",
            f"--concurrency={self.concurrency}",
            f"--loglevel={self.loglevel}",
            # Gossip, mingle and heartbeats talk to other workers: seconds of start-up
            # and broker chatter that these single-worker runs do not need.
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=km-test-{os.getpid()}-{time.monotonic_ns()}@%h",
        ]
        log = self.log_path.open("ab")
        # A session of its own: SIGKILL of the group takes the prefork pool down too,
        # as when a machine loses a worker.
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited at start-up:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the worker did not become ready:\n{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it takes longer than ``timeout``."""
        if self.process is None:
            return
        # The main process only: it stops its pool itself, as under a process manager.
        self.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.kill()  # Whatever is left of the group.

    def pool_pids(self) -> list[int]:
        """The prefork pool's processes (empty for the threads pool)."""
        return children(self.pid)

    def rss_kb(self) -> int:
        """Resident memory of the worker and its pool processes, in KiB."""
        return sum(rss_kb(pid) for pid in [self.pid, *self.pool_pids()])

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()


def main(argv: list[str]) -> None:
    """The subprocess: configure Django and Celery from ``CONFIG_ENV``, then run the worker."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    config = json.loads(os.environ.get(CONFIG_ENV) or "{}")

    import django
    from django.conf import settings

    # Before django.setup() and before the Celery app reads its configuration.
    settings.KISSMETRICS = {**settings.KISSMETRICS, **config.get("kissmetrics", {})}
    if config.get("broker_url"):
        settings.CELERY_BROKER_URL = config["broker_url"]
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {
        **settings.CELERY_BROKER_TRANSPORT_OPTIONS,
        **config.get("transport_options", {}),
    }
    settings.CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
    django.setup()

    from celery.signals import worker_ready

    ready_file = config.get("ready_file")

    @worker_ready.connect(weak=False)
    def announce(**kwargs: Any) -> None:
        if config.get("lose_api_key"):
            # A key that goes missing after the worker started (its checks passed).
            from django_kissmetrics.conf import get_settings

            settings.KISSMETRICS = {**settings.KISSMETRICS, "API_KEY": None}
            get_settings.cache_clear()
        if ready_file:
            Path(ready_file).touch()

    # The `celery` command itself (worker_main drops the worker's exit status).
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", "--app=tests.celery_app", "worker", *argv]
    celery_main()


if __name__ == "__main__":
    main(sys.argv[1:])
