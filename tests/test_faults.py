"""Delivery under the failures real sites see, with a real Celery worker and a real Redis.

Every command is made through ``km`` (or a real request through the middleware), goes
through the per-process publisher to Redis, is taken by a worker and sent over HTTP to a
stand-in tracker that can refuse, fail, hang or be slow. What the tracker finally holds is
the proof: every command, with the ``_t`` of its call and ``_d=1``, and copies only where a
retry or a redelivery made them (which Kissmetrics de-duplicates by ``_t``).

Tests that need to observe the worker (Celery's task signals, ``delivery_failed``, its
log) use an in-process worker; tests that kill the worker or its broker use a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from celery.signals import task_postrun, task_prerun, task_retry
from django.test import Client

from django_kissmetrics import km, publisher, spool
from django_kissmetrics.commands import Command, make_record
from django_kissmetrics.signals import delivery_failed
from django_kissmetrics.tasks import deliver
from django_kissmetrics.testing import Hit, StandInTracker
from tests.conftest import RedisServer, wait_until
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

#: Backoff small enough for tests, and far under every visibility timeout used here.
FAST_RETRIES: dict[str, Any] = {
    "RETRY_BACKOFF": 0.05,
    "RETRY_BACKOFF_MAX": 1.0,
    "MAX_RETRIES": 8,
    "TIMEOUT": 2.0,
}
#: For a worker that will be killed: a message it held comes back after 3 s, and the
#: sweep that brings it back runs every second (kombu's default is 10 s x 10).
KILL_TRANSPORT = {
    "visibility_timeout": 3,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}


@dataclass(frozen=True)
class Sent:
    """One ``km.record`` call and the wall-clock second range it was made in."""

    person: str
    event: str
    before: int
    after: int


def record_many(count: int, label: str) -> list[Sent]:
    """``count`` events for ``count`` people, outside a request, as one delivery."""
    sent = []
    with km.batch():
        for i in range(count):
            before = time.time()
            km.record(f"{label} {i}", {"seq": i}, identity=f"{label}-person-{i}")
            sent.append(Sent(f"{label}-person-{i}", f"{label} {i}", int(before), int(time.time())))
    publisher.flush()
    return sent


def copies(hits: list[Hit]) -> Counter[tuple[str, str | None]]:
    return Counter((h.person, h.name) for h in hits)


def all_arrived(tracker: StandInTracker, sent: list[Sent]) -> Callable[[], bool]:
    def check() -> bool:
        seen = copies(tracker.hits)
        return all(seen[(s.person, s.event)] for s in sent)

    return check


def assert_delivered(tracker: StandInTracker, sent: list[Sent], *, most: int = 1) -> None:
    """Every sent command arrived 1 to ``most`` times, each copy dated at its call."""
    hits = list(tracker.hits)
    by_command: dict[tuple[str, str | None], list[Hit]] = {}
    for hit in hits:
        by_command.setdefault((hit.person, hit.name), []).append(hit)
    assert set(by_command) == {(s.person, s.event) for s in sent}, "unexpected commands arrived"
    for s in sent:
        arrived = by_command[(s.person, s.event)]
        assert 1 <= len(arrived) <= most, f"{s.event!r} arrived {len(arrived)} times"
        for hit in arrived:
            assert hit.path == "/e"
            assert hit.params["_d"] == "1"
            # The time of the call, not of the (late, retried) delivery.
            assert s.before <= int(hit.params["_t"]) <= s.after, (s, hit.params)


class TaskEvents:
    """What the in-process worker did with the delivery task, from Celery's own signals."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.starts: list[float] = []  # time.monotonic() at the start of each run.
        self.runs: list[float] = []  # Durations of finished runs, in seconds.
        self.retries = 0

    def prerun(self, task_id: str, **kwargs: Any) -> None:
        self.started[task_id] = time.monotonic()
        self.starts.append(self.started[task_id])

    def postrun(self, task_id: str, **kwargs: Any) -> None:
        self.runs.append(time.monotonic() - self.started.pop(task_id, time.monotonic()))

    def retry(self, **kwargs: Any) -> None:
        self.retries += 1


@pytest.fixture
def task_events() -> Iterator[TaskEvents]:
    events = TaskEvents()
    task_prerun.connect(events.prerun, weak=False)
    task_postrun.connect(events.postrun, weak=False)
    task_retry.connect(events.retry, weak=False)
    yield events
    task_prerun.disconnect(events.prerun)
    task_postrun.disconnect(events.postrun)
    task_retry.disconnect(events.retry)


@pytest.fixture
def failed() -> Iterator[list[list[Command]]]:
    """Every ``delivery_failed`` sent in this process: one list of commands per signal."""
    calls: list[list[Command]] = []

    def receiver(commands: list[Command], **kwargs: Any) -> None:
        calls.append(list(commands))

    delivery_failed.connect(receiver, weak=False)
    yield calls
    delivery_failed.disconnect(receiver)


@pytest.fixture
def worker_logging() -> Iterator[None]:
    """Undo what starting the in-process worker does to logging, once it has stopped.

    Celery's worker takes over the root logger (its handlers removed, its level set to
    the worker's ERROR), which would hide WARNING records from later tests' caplog.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.fixture
def via_celery(
    worker_logging: None,
    tracker: StandInTracker,
    km_settings: Callable[..., None],
    celery_worker: Any,
) -> StandInTracker:
    """The celery backend, an in-process worker, the stand-in tracker at the far end."""
    km_settings(BACKEND="celery", TRACKING_URL=tracker.url, **FAST_RETRIES)
    return tracker


def quiesce(tracker: StandInTracker, quiet: float, timeout: float) -> None:
    """Wait until no hit has arrived for ``quiet`` seconds (a redelivery has finished)."""
    deadline = time.monotonic() + timeout
    count, since = len(tracker.hits), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            pytest.fail(f"hits kept arriving for {timeout} s")
        time.sleep(0.05)
        if len(tracker.hits) != count:
            count, since = len(tracker.hits), time.monotonic()


def settle(tracker: StandInTracker, seconds: float = 0.5) -> None:
    """Give a stray duplicate the time to show up before counting."""
    count = len(tracker.hits)
    time.sleep(seconds)
    assert len(tracker.hits) == count, "more hits arrived after everything was delivered"


# Exactly once, on the happy path.


def test_commands_outside_a_request_arrive_exactly_once(
    via_celery: StandInTracker, failed: list[list[Command]]
) -> None:
    sent = record_many(20, "Outside")
    wait_until(all_arrived(via_celery, sent), 15, "20 events")
    settle(via_celery)
    assert_delivered(via_celery, sent, most=1)
    assert via_celery.refused == []
    assert failed == []  # Nothing reported lost on the way.


@pytest.mark.django_db
def test_commands_of_requests_arrive_exactly_once(
    client: Client, via_celery: StandInTracker, failed: list[list[Command]]
) -> None:
    client.get("/nothing/")
    person = unquote(client.cookies["km_ai"].value)
    sent = []
    for i in range(5):
        before = int(time.time())
        response = client.get("/record/", {"event": f"Page {i}", "props": json.dumps({"i": i})})
        assert response.status_code == 200
        sent.append(Sent(person, f"Page {i}", before, int(time.time())))
    publisher.flush()
    wait_until(all_arrived(via_celery, sent), 15, "5 events")
    settle(via_celery)
    assert_delivered(via_celery, sent, most=1)
    assert {h.name: h.properties for h in via_celery.hits} == {
        f"Page {i}": {"i": str(i)} for i in range(5)
    }
    assert failed == []


# The tracker misbehaves, then recovers.


def test_tracker_refusing_connections_then_back(
    via_celery: StandInTracker, task_events: TaskEvents
) -> None:
    # Stopped before any traffic: no kept-alive connection to the old server survives.
    via_celery.stop()
    sent = record_many(5, "Refused")
    wait_until(lambda: task_events.retries >= 2, 15, "two failed attempts")
    via_celery.start()
    wait_until(all_arrived(via_celery, sent), 15, "the events after the tracker came back")
    settle(via_celery)
    # A refused connection reaches nobody: each command arrives once, late, dated right.
    assert_delivered(via_celery, sent, most=1)


@pytest.mark.parametrize("retry_after", [None, "1"])
def test_tracker_answering_503_for_a_while(
    via_celery: StandInTracker, task_events: TaskEvents, retry_after: str | None
) -> None:
    via_celery.retry_after = retry_after
    via_celery.fail(6, 503)  # Two rounds for three commands sent at once.
    sent = record_many(3, "Unavailable")
    wait_until(all_arrived(via_celery, sent), 15, "the events after the 503s")
    settle(via_celery)
    assert_delivered(via_celery, sent, most=1)
    refused = copies(via_celery.refused)
    assert refused == {(s.person, s.event): 2 for s in sent}
    assert task_events.retries == 2
    if retry_after is not None:
        # The server asked for a second; the backoff alone would be ~0.05 s and ~0.1 s.
        for s in sent:
            last_refusal = max(h.received for h in via_celery.refused if h.name == s.event)
            (delivered,) = [h for h in via_celery.hits if h.name == s.event]
            assert delivered.received - last_refusal >= 0.9


def test_only_the_failed_commands_are_retried(
    via_celery: StandInTracker, task_events: TaskEvents
) -> None:
    via_celery.fail(1, 500)
    sent = record_many(5, "Partial")
    wait_until(all_arrived(via_celery, sent), 15, "the events")
    settle(via_celery)
    assert_delivered(via_celery, sent, most=1)
    # One refusal, one retry of that command alone: 5 + 1 calls in all, not 5 + 5.
    assert len(via_celery.refused) == 1
    assert len(via_celery.hits) + len(via_celery.refused) == 6
    assert task_events.retries == 1


def test_tracker_hanging_past_the_timeout_then_recovering(
    via_celery: StandInTracker, task_events: TaskEvents, km_settings: Callable[..., None]
) -> None:
    timeout, delay = 0.5, 3.0
    km_settings(
        BACKEND="celery", TRACKING_URL=via_celery.url, **{**FAST_RETRIES, "TIMEOUT": timeout}
    )
    via_celery.delay = delay  # Every answer comes six timeouts late.
    sent = record_many(4, "Hanging")
    wait_until(lambda: task_events.retries >= 1, 10, "an attempt to time out")
    via_celery.delay = 0.0
    wait_until(all_arrived(via_celery, sent), 15, "the events after the tracker recovered")
    # The stand-in still records each hung call once its delay is over: those calls
    # reached the tracker, so they are copies too (same _t, de-duplicated by Kissmetrics).
    time.sleep(max(0.0, max(task_events.starts) + delay + 0.3 - time.monotonic()))
    settle(via_celery)
    attempts = len(task_events.runs)
    assert attempts >= 2
    assert_delivered(via_celery, sent, most=attempts)
    # No run waited on the hung tracker for the whole delay: the calls of a batch go out
    # together, so a run that times out lasts about one timeout plus the retry's publish.
    # The margin is for a loaded machine; without a timeout a run would last the delay.
    assert max(task_events.runs) < delay - 0.5, task_events.runs


def test_retries_exhausted_signal_and_error_log_once(
    via_celery: StandInTracker,
    km_settings: Callable[..., None],
    failed: list[list[Command]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # "log": no spool, as before it existed (test_spool covers the spool's side).
    config = {**FAST_RETRIES, "MAX_RETRIES": 2, "ON_ENQUEUE_FAILURE": "log"}
    km_settings(BACKEND="celery", TRACKING_URL=via_celery.url, **config)
    via_celery.fail(1000, 503)
    with caplog.at_level(logging.ERROR, logger="django_kissmetrics"):
        sent = record_many(3, "Doomed")
        wait_until(lambda: bool(failed), 15, "delivery_failed")
        time.sleep(1.0)  # Long enough for a second signal (backoff max is 1 s) to show.
    assert len(failed) == 1
    (commands,) = failed
    commands = sorted(commands, key=lambda c: c.person)
    assert [(c.person, c.name) for c in commands] == [(s.person, s.event) for s in sent]
    assert all(s.before <= c.timestamp <= s.after for c, s in zip(commands, sent, strict=True))
    # Tried 1 + MAX_RETRIES times each, then left alone.
    assert copies(via_celery.refused) == {(s.person, s.event): 3 for s in sent}
    assert via_celery.hits == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "3 command(s) not delivered" in message
    for s in sent:
        assert s.person in message
        assert s.event in message


def test_refused_for_good_is_given_up_at_once(
    via_celery: StandInTracker, task_events: TaskEvents, failed: list[list[Command]]
) -> None:
    via_celery.fail(1, 400)  # A 4xx other than 408/429: sending it again cannot help.
    sent = record_many(4, "Rejected")
    wait_until(lambda: bool(failed) and len(via_celery.hits) == 3, 15, "the outcome")
    settle(via_celery)
    (rejected,) = via_celery.refused
    assert [[(c.person, c.name) for c in commands] for commands in failed] == [
        [(rejected.person, rejected.name)]
    ]
    assert task_events.retries == 0
    assert_delivered(via_celery, [s for s in sent if s.event != rejected.name], most=1)


def test_worker_that_lost_its_api_key_spools_the_commands(
    via_celery: StandInTracker,
    km_settings: Callable[..., None],
    failed: list[list[Command]],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    # The key went missing after the worker started (a worker started without one does
    # not consume at all: tests/test_worker_key.py): kept for a worker that has it.
    km_settings(
        BACKEND="celery",
        TRACKING_URL=via_celery.url,
        API_KEY=None,
        SPOOL_DIR=str(tmp_path),
        # The spooled batch is due again after RETRY_BACKOFF_MAX: not during this test.
        **{**FAST_RETRIES, "RETRY_BACKOFF_MAX": 60.0},
    )
    store = spool.Spool(tmp_path, max_bytes=10**9, max_age=3600)
    command = make_record("ann", "Keyless", {"plan": "pro"})

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    with caplog.at_level(logging.WARNING, logger="django_kissmetrics"):
        deliver.delay([command.to_wire()])
        # The worker's thread logs once the commands are in the spool.
        wait_until(lambda: bool(warnings()), 15, "the spool's warning")
    assert store.status().commands == 1
    assert failed == []
    (warning,) = warnings()
    assert "spooled 1 command(s) (this worker cannot deliver)" in warning
    assert "API_KEY" in warning
    assert store.purge(older_than=-60) == [command]
    assert via_celery.hits == []


# The worker dies in the middle of a batch.


@pytest.fixture
def worker_config(tracker: StandInTracker) -> dict[str, Any]:
    # DELIVERY_CONCURRENCY 4 with 16 commands: four rounds, so a kill lands mid-batch.
    return {
        "BACKEND": "celery",
        "TRACKING_URL": tracker.url,
        "DELIVERY_CONCURRENCY": 4,
        **FAST_RETRIES,
    }


def receipts(*workers: WorkerProcess) -> int:
    """How many times these workers took a batch off the queue."""
    return sum(w.log().count("] received") for w in workers)


def start_killable_batch(tracker: StandInTracker) -> list[Sent]:
    """Queue 16 commands to a slow tracker and wait until the first one has arrived."""
    tracker.delay = 0.3
    sent = record_many(16, "Killed")
    wait_until(lambda: len(tracker.hits) >= 1, 15, "the batch to start")
    return sent


def finish_after_kill(
    tracker: StandInTracker, sent: list[Sent], at_kill: int, *workers: WorkerProcess
) -> None:
    assert 0 < at_kill < len(sent), "the kill did not land in the middle of the batch"
    tracker.delay = 0.0
    wait_until(all_arrived(tracker, sent), 20, "the batch after the kill")
    # The batch is delivered again in full, including what went out before the kill.
    quiesce(tracker, quiet=1.0, timeout=20)
    taken = receipts(*workers)
    assert taken >= 2
    # Copies only from redeliveries, each with the _t of its call: Kissmetrics
    # de-duplicates them. Nothing is lost.
    assert_delivered(tracker, sent, most=taken)


def test_worker_killed_mid_batch_then_a_new_worker(
    tracker: StandInTracker,
    km_settings: Callable[..., None],
    celery_app: Any,
    redis_url: str,
    worker_config: dict[str, Any],
) -> None:
    # A threads pool: the worker is one process, and it dies with the batch
    # unacknowledged. A new worker takes the batch back once the visibility timeout
    # has passed.
    km_settings(**worker_config)
    options: dict[str, Any] = {"pool": "threads", "transport_options": KILL_TRANSPORT}
    with WorkerProcess(redis_url, worker_config, **options) as first:
        sent = start_killable_batch(tracker)
        first.kill()
        at_kill = len(tracker.hits)
        with WorkerProcess(redis_url, worker_config, **options) as second:
            finish_after_kill(tracker, sent, at_kill, first, second)


def test_pool_process_killed_mid_batch(
    tracker: StandInTracker,
    km_settings: Callable[..., None],
    celery_app: Any,
    redis_url: str,
    worker_config: dict[str, Any],
) -> None:
    # A prefork pool: the pool process dies, the worker requeues the batch at once
    # (reject_on_worker_lost) and a fresh pool process delivers it. The visibility
    # timeout stays long (tests.settings), so nothing else can bring the batch back.
    km_settings(**worker_config)
    with WorkerProcess(redis_url, worker_config, pool="prefork", concurrency=1) as worker:
        sent = start_killable_batch(tracker)
        (child,) = worker.pool_pids()
        os.kill(child, signal.SIGKILL)
        finish_after_kill(tracker, sent, len(tracker.hits), worker)


# The broker goes away while the site serves requests.


@pytest.mark.django_db
@pytest.mark.parametrize("on_failure", ["log", "sync"])
def test_broker_down_while_serving_requests(
    client: Client,
    tracker: StandInTracker,
    km_settings: Callable[..., None],
    own_broker: RedisServer,
    failed: list[list[Command]],
    caplog: pytest.LogCaptureFixture,
    on_failure: str,
) -> None:
    config = {
        "BACKEND": "celery",
        "TRACKING_URL": tracker.url,
        "ON_ENQUEUE_FAILURE": on_failure,
        **FAST_RETRIES,
    }
    km_settings(**config)
    caplog.set_level(logging.INFO, logger="django_kissmetrics")
    with WorkerProcess(own_broker.url, config):

        def visit(event: str) -> Sent:
            before = time.time()
            response = client.get("/record/", {"event": event})
            elapsed = time.time() - before
            assert response.status_code == 200
            # The request only hands its commands to the publisher thread.
            assert elapsed < 0.5, f"a request waited {elapsed:.2f} s"
            return Sent(person, event, int(before), int(time.time()))

        client.get("/nothing/")
        person = unquote(client.cookies["km_ai"].value)
        before = [visit("Before")]
        publisher.flush()
        wait_until(all_arrived(tracker, before), 15, "delivery through the broker")

        own_broker.stop()
        during = [visit(f"During {i}") for i in range(5)]
        publisher.flush()

        if on_failure == "log":
            # Logged in full, and signalled: nothing silently dropped.
            lost = [c for commands in failed for c in commands]
            assert sorted(c.name or "" for c in lost) == [s.event for s in during]
            assert all(c.person == person for c in lost)
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            logged = " ".join(errors)
            assert "could not queue" in logged
            assert person in logged
            for s in during:
                assert s.event in logged
            assert all(h.name == "Before" for h in tracker.hits)
        else:
            # Delivered straight from the publisher thread, dated at their calls.
            wait_until(all_arrived(tracker, during), 10, "direct delivery")
            assert failed == []
            assert any("delivering directly" in r.getMessage() for r in caplog.records)

        own_broker.start()  # The same port, as a restarted Redis.
        caplog.clear()
        after = [visit("After")]
        publisher.flush()
        wait_until(all_arrived(tracker, after), 30, "delivery after the broker returned")
        # Queued normally again: no fallback, nothing logged.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        settle(tracker)
        assert_delivered(tracker, before + after + (during if on_failure == "sync" else []))


def test_broker_lost_before_a_retry_logs_the_commands(
    tracker: StandInTracker, km_settings: Callable[..., None], own_broker: RedisServer
) -> None:
    config = {
        "BACKEND": "celery",
        "TRACKING_URL": tracker.url,
        "ON_ENQUEUE_FAILURE": "log",  # No spool to keep them in.
        **{**FAST_RETRIES, "TIMEOUT": 10.0},
    }
    km_settings(**config)
    with WorkerProcess(own_broker.url, config) as worker:
        tracker.delay = 3.0  # The 503 comes after the broker has gone, even on a slow machine.
        tracker.fail(1, 503)
        (sent,) = record_many(1, "Orphan")
        wait_until(lambda: " received" in worker.log(), 15, "the worker to take the batch")
        own_broker.stop()
        # Celery cannot queue the retry and drops the message: the worker must say
        # which commands it could not keep.
        wait_until(lambda: "could not queue a retry" in worker.log(), 15, "the ERROR line")
        (line,) = [x for x in worker.log().splitlines() if "could not queue a retry" in x]
        assert "ERROR" in line
        assert f'"person": "{sent.person}"' in line
        assert f'"name": "{sent.event}"' in line
