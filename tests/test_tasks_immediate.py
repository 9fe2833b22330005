"""The ``tasks`` backend in this process, on the framework's ImmediateBackend.

What needs no queue of its own: the publisher's hook, retries that cannot be deferred
waiting in the spool, a queue that refuses, and the ping's hops. The real queue, in
another process, is test_tasks_backend.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.test import override_settings

from django_kissmetrics import km, ping, publisher, spool
from django_kissmetrics.testing import StandInTracker
from tests.conftest import wait_until

PACKAGE = "django.tasks" if django.VERSION >= (6, 0) else "django_tasks"
IMMEDIATE = {"default": {"BACKEND": f"{PACKAGE}.backends.immediate.ImmediateBackend"}}


@pytest.fixture
def immediate(km_settings: Any, tracker: StandInTracker) -> Iterator[StandInTracker]:
    with override_settings(TASKS=IMMEDIATE):
        km_settings(
            BACKEND="tasks", TRACKING_URL=tracker.url, RETRY_BACKOFF=0.05, RETRY_BACKOFF_MAX=0.5
        )
        yield tracker


def record(count: int) -> None:
    with km.batch():
        for i in range(count):
            km.record(f"Event {i}", {"n": i}, identity=f"person-{i}")
    publisher.flush()


def test_a_batch_is_one_task_run_off_the_request(immediate: StandInTracker) -> None:
    record(3)
    hits = immediate.wait_for(3)
    assert sorted(h.name or "" for h in hits) == ["Event 0", "Event 1", "Event 2"]
    assert all(h.params["_d"] == "1" for h in hits)


def test_a_retry_the_backend_cannot_defer_waits_in_the_spool(immediate: StandInTracker) -> None:
    immediate.fail(2, 503)
    record(3)
    wait_until(lambda: len(immediate.hits) == 3, 15, "the retried commands")
    assert len(immediate.refused) == 2
    assert sorted(h.name or "" for h in immediate.hits) == ["Event 0", "Event 1", "Event 2"]
    assert spool.get_spool() is not None
    wait_until(lambda: spool.get_spool().status().count == 0, 5, "an empty spool")  # type: ignore[union-attr]


def test_a_queue_that_refuses_spools_the_batch(
    immediate: StandInTracker, km_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    km_settings(TASKS_BACKEND="missing")
    record(2)
    status = spool.get_spool().status()  # type: ignore[union-attr]
    assert status.commands == 2
    assert "could not queue" in caplog.text
    assert immediate.hits == []
    publisher.stop()  # No replay into the next test: the spool is this test process's.
    assert len(spool.get_spool().purge(0)) == 2  # type: ignore[union-attr]


def test_the_ping_reports_each_hop(immediate: StandInTracker) -> None:
    hops: list[tuple[str, str]] = []
    ping.run("pinger", 10, lambda hop, detail: hops.append((hop, detail)))
    assert [h for h, _ in hops] == ["settings", "tasks", "worker", "tracking server"]
    assert "enqueued on TASKS['default'] (ImmediateBackend)" in hops[1][1]
    assert "answered 200" in hops[3][1]
    (hit,) = immediate.wait_for(1)
    assert hit.name == ping.EVENT
