"""A worker without an API key: it refuses to consume, and a key lost later spools.

Real worker subprocesses (``tests.worker``) on the test Redis, a real stand-in tracker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from django_kissmetrics import spool
from django_kissmetrics.commands import make_record
from django_kissmetrics.tasks import deliver
from django_kissmetrics.testing import StandInTracker
from tests.conftest import wait_until
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def queued(redis_url: str) -> int:
    """Messages waiting in the default queue."""
    return int(redis.Redis.from_url(redis_url).llen("celery"))


def test_a_worker_without_a_key_refuses_to_consume(
    tracker: StandInTracker, redis_url: str, celery_app: Any
) -> None:
    command = make_record("ada@example.com", "Signed Up")
    deliver.apply_async(args=([command.to_wire()],))
    assert queued(redis_url) == 1
    config = {"API_KEY": None, "BACKEND": "celery", "TRACKING_URL": tracker.url}
    keyless = WorkerProcess(redis_url, config)
    with pytest.raises(RuntimeError, match="exited at start-up") as exited:
        keyless.start()
    assert keyless.process is not None
    assert keyless.process.wait(10) == 1
    message = str(exited.value)
    assert "Unrecoverable error" in message
    assert "KISSMETRICS['API_KEY'] is not set in this worker" in message
    assert "KISSMETRICS_API_KEY environment variable" in message
    # The message waits for a worker that can deliver it.
    assert queued(redis_url) == 1
    assert tracker.hits == []
    with WorkerProcess(redis_url, {**config, "API_KEY": "worker-key"}):
        (hit,) = tracker.wait_for(1)
    assert (hit.person, hit.name, hit.params["_t"]) == (
        "ada@example.com",
        "Signed Up",
        str(command.timestamp),
    )


def test_a_worker_without_a_key_starts_when_tracking_is_disabled(
    redis_url: str, celery_app: Any
) -> None:
    # A site that runs no tracking on this machine keeps its worker for its own tasks.
    with WorkerProcess(redis_url, {"API_KEY": None, "BACKEND": "disabled"}) as worker:
        assert worker.process is not None
        assert worker.process.poll() is None


def test_a_key_lost_after_the_start_spools_the_commands(
    tracker: StandInTracker, redis_url: str, celery_app: Any, tmp_path: Path
) -> None:
    config = {"API_KEY": "worker-key", "BACKEND": "celery", "TRACKING_URL": tracker.url}
    config["SPOOL_DIR"] = str(tmp_path)
    store = spool.Spool(tmp_path, max_bytes=10**9, max_age=3600)
    with WorkerProcess(redis_url, config, lose_api_key=True) as worker:
        command = make_record("ada@example.com", "Upgraded", {"plan": "Pro"})
        deliver.apply_async(args=([command.to_wire()],))
        spooled = "spooled 1 command(s) (this worker cannot deliver)"
        # The worker logs once the commands are in the spool.
        wait_until(lambda: spooled in worker.log(), 20, "the worker to spool it")
        assert store.status().commands == 1
        assert "not delivered" not in worker.log()
    assert tracker.hits == []
    # Kept whole, with the time of the call, for a worker that has the key.
    assert store.purge(older_than=-60) == [command]
