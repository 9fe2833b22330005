"""``manage.py kissmetrics_ping``: each hop, with a real Redis, a real worker, a real tracker.

The command runs in this process with the test suite's Celery app; the worker is a
subprocess (``tests.worker``) on the same Redis, as a site's worker would be.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from django_kissmetrics.ping import DEFAULT_IDENTITY, EVENT
from django_kissmetrics.testing import StandInTracker
from tests.conftest import RedisServer
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def ping(*args: str) -> tuple[list[str], str, float]:
    """Run the command: its output lines, the error it ended with (or ""), its seconds."""
    out = io.StringIO()
    started = time.monotonic()
    error = ""
    try:
        call_command("kissmetrics_ping", *args, stdout=out)
    except CommandError as exc:
        error = str(exc)
    return out.getvalue().splitlines(), error, time.monotonic() - started


ROOT = Path(__file__).resolve().parent.parent


def shape(line: str) -> str:
    """``line`` with what differs between runs (URLs, names, numbers, tokens) blanked."""
    line = re.sub(r"\S+://[^\s,]+|[\w.-]+@[\w.%-]+|\w{4}\.\.\.", "#", line)
    line = re.sub(r"'[^']*'|\b[0-9a-f]{16}\b|\d+(\.\d+)?", "#", line)
    return line


def hops(lines: list[str]) -> list[str]:
    """The hops reported as working, in order."""
    return [line.split(":", 1)[0].removeprefix("ok  ") for line in lines if line.startswith("ok")]


@pytest.fixture
def celery_settings(
    tracker: StandInTracker, km_settings: Callable[..., None], celery_app: Any
) -> dict[str, Any]:
    """The celery backend, sending to the stand-in tracker (here and in the worker)."""
    config = {"API_KEY": "ping-key-0123456789", "BACKEND": "celery", "TRACKING_URL": tracker.url}
    km_settings(**config)
    return config


@pytest.fixture
def worker(redis_url: str, celery_settings: dict[str, Any]) -> Iterator[WorkerProcess]:
    """A real worker subprocess on the test Redis."""
    with WorkerProcess(redis_url, celery_settings) as process:
        yield process


def test_all_up_the_event_reaches_the_tracker(
    tracker: StandInTracker, worker: WorkerProcess, redis_url: str
) -> None:
    lines, error, _ = ping("--identity", "ops@example.com", "--timeout", "20")
    assert not error, "\n".join(lines) + worker.log()
    assert hops(lines) == ["settings", "broker", "worker", "tracking server"]
    assert f"reachable at {redis_url}" in lines[1]
    assert "took the task from queue 'celery'" in lines[2]
    assert f"{tracker.url} answered 200" in lines[3]
    # The output the Troubleshooting page shows, but for what varies from run to run.
    sample = (ROOT / "docs" / "examples" / "ping_output.txt").read_text().splitlines()[1:]
    assert [shape(line) for line in sample] == [shape(line) for line in lines]
    token = lines[-1].split("token ")[1].rstrip(").")
    (hit,) = tracker.wait_for(1)
    assert (hit.path, hit.person, hit.name) == ("/e", "ops@example.com", EVENT)
    assert hit.properties == {"token": token}
    assert hit.params["_d"] == "1"


def test_no_worker_fails_within_the_timeout_naming_the_worker(
    tracker: StandInTracker, celery_settings: dict[str, Any]
) -> None:
    lines, error, took = ping("--timeout", "2")
    assert error.startswith("worker: no worker consumed the ping task from queue 'celery' in 2 s")
    assert hops(lines) == ["settings", "broker"]
    assert took < 4
    assert tracker.hits == []


def test_a_worker_started_later_does_not_send_a_stale_ping(
    tracker: StandInTracker, redis_url: str, celery_settings: dict[str, Any]
) -> None:
    _, error, _ = ping("--timeout", "1")
    assert error.startswith("worker:")
    time.sleep(1.5)  # The ping task has expired by now.
    with WorkerProcess(redis_url, celery_settings):
        lines, error, _ = ping("--timeout", "20")
        assert not error, lines
        assert len(tracker.wait_for(1)) == 1
        time.sleep(0.5)
    assert len(tracker.hits) == 1  # Only the ping that was waited for.


def test_broker_down_fails_naming_the_broker(
    tracker: StandInTracker, celery_settings: dict[str, Any], celery_app: Any
) -> None:
    server = RedisServer()
    server.start()
    server.stop()  # The broker went away: its port refuses connections.
    previous = celery_app.conf.broker_url
    celery_app.conf.broker_url = server.url
    try:
        lines, error, took = ping("--timeout", "5")
    finally:
        celery_app.conf.broker_url = previous
    assert error.startswith(f"broker: broker unreachable at {server.url}")
    assert hops(lines) == ["settings"]
    assert took < 5


def test_tracker_refusing_fails_naming_the_status(
    tracker: StandInTracker, worker: WorkerProcess
) -> None:
    tracker.fail(1, 403)
    lines, error, _ = ping("--timeout", "20")
    assert error.startswith(f"tracking server: tracking server answered 403 at {tracker.url}")
    assert "(from km-test-" in error  # The worker that got the answer.
    assert hops(lines) == ["settings", "broker", "worker"]
    assert len(tracker.refused) == 1
    assert tracker.hits == []


def test_tracker_down_fails_naming_it(tracker: StandInTracker, worker: WorkerProcess) -> None:
    tracker.stop()
    _, error, _ = ping("--timeout", "20")
    assert error.startswith(f"tracking server: tracking server unreachable at {tracker.url}")


def test_sync_goes_straight_to_the_tracker(
    tracker: StandInTracker, km_settings: Callable[..., None]
) -> None:
    km_settings(API_KEY="ping-key", BACKEND="sync", TRACKING_URL=tracker.url)
    lines, error, _ = ping()
    assert not error, lines
    assert hops(lines) == ["settings", "delivery", "tracking server"]
    (hit,) = tracker.hits
    assert (hit.person, hit.name) == (DEFAULT_IDENTITY, EVENT)
    tracker.fail(1, 500)
    _, error, _ = ping()
    assert error == f"tracking server: tracking server answered 500 at {tracker.url}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"API_KEY": None}, 'settings: KISSMETRICS["API_KEY"] is not set'),
        ({"BACKEND": "locmem"}, "settings: KISSMETRICS[\"BACKEND\"] is 'locmem'"),
        ({"TIMEOUT": "5"}, "settings: settings.KISSMETRICS['TIMEOUT'] must be"),
    ],
)
def test_settings_that_send_nothing_fail_first(
    km_settings: Callable[..., None], overrides: dict[str, Any], message: str
) -> None:
    km_settings(**overrides)
    lines, error, _ = ping()
    assert error.startswith(message)
    assert lines == []


def test_a_worker_that_lost_its_key_delivers_the_ping_with_the_commands_key(
    tracker: StandInTracker, redis_url: str, celery_settings: dict[str, Any]
) -> None:
    # The key travels with each command: the worker's own settings need none for it. (A
    # worker started without one does not consume at all: tests/test_worker_key.py.)
    with WorkerProcess(redis_url, celery_settings, lose_api_key=True):
        lines, error, _ = ping("--timeout", "20")
    assert not error, lines
    assert hops(lines) == ["settings", "broker", "worker", "tracking server"]
    (hit,) = tracker.wait_for(1)
    assert hit.params["_k"] == celery_settings["API_KEY"]
