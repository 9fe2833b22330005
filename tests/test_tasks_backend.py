"""The ``tasks`` backend against a real queue: django-tasks-db and its ``db_worker``.

The site and the worker are separate processes sharing a database (a SQLite file, or a
PostgreSQL database of the test's own) and a spool, as in production. Each test checks
what reached the stand-in tracker and what the queue held.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from django_kissmetrics.testing import StandInTracker
from tests.conftest import need, wait_until
from tests.test_faults import Sent, all_arrived, assert_delivered, quiesce
from tests.worker import ROOT, ProcessGroup

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TABLE = "django_tasks_database_dbtaskresult"
DELIVER = "django_kissmetrics.tasks_backend.deliver"
PG_PREFIX = os.environ.get("KM_TEST_PG_PREFIX", "km_test")


def postgres(name: str | None = None) -> Any:
    import psycopg

    return psycopg.connect(
        host="127.0.0.1", user="postgres", dbname=name or "postgres", autocommit=True
    )


class Queue:
    """The site's database, with the django-tasks-db tables migrated in."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.tmp = tmp
        if kind == "sqlite":
            self.database: dict[str, Any] = {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(tmp / "site.sqlite3"),
                # The worker and the site write at once: wait for the lock, as a site would.
                "OPTIONS": {"timeout": 20},
            }
        else:
            self.name = f"{PG_PREFIX}_tasks_{os.getpid()}_{time.monotonic_ns() % 10**6}"
            try:
                with postgres() as db:
                    db.execute(f'CREATE DATABASE "{self.name}"')
            except Exception as exc:
                need(f"PostgreSQL on 127.0.0.1:5432 (user postgres) is not reachable: {exc}")
            self.database = {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": self.name,
                "USER": "postgres",
                "HOST": "127.0.0.1",
                "PORT": "5432",
            }

    def env(self, kissmetrics: dict[str, Any]) -> dict[str, str]:
        config = {"database": self.database, "kissmetrics": kissmetrics}
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.tasks_settings",
            "KM_TASKS_CONFIG": json.dumps(config),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        }

    def rows(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(task path, status, args and kwargs) of every task the queue holds, oldest first."""
        query = f"SELECT task_path, status, args_kwargs FROM {TABLE} ORDER BY enqueued_at"
        if self.kind == "sqlite":
            with sqlite3.connect(self.database["NAME"]) as db:
                found = db.execute(query).fetchall()
            return [(p, s, json.loads(a)) for p, s, a in found]
        with postgres(self.name) as db:
            return [(p, s, a) for p, s, a in db.execute(query).fetchall()]

    def drop(self) -> None:
        if self.kind == "postgres":
            with postgres() as db:
                db.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class Site:
    """The site's side: migrate, record a batch, and the ``db_worker`` processes."""

    def __init__(self, queue: Queue, tracker: StandInTracker, **kissmetrics: Any) -> None:
        self.queue = queue
        self.kissmetrics = {
            "TRACKING_URL": tracker.url,
            "SPOOL_DIR": str(queue.tmp / "spool"),
            "RETRY_BACKOFF": 0.05,
            "RETRY_BACKOFF_MAX": 1.0,
            "TIMEOUT": 1.0,
            "DELIVERY_CONCURRENCY": 4,
            **kissmetrics,
        }
        self.workers: list[DbWorker] = []

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env=self.queue.env(self.kissmetrics),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def record(self, count: int, label: str) -> list[Sent]:
        """``count`` events for ``count`` people, sent as one batch by another process."""
        out = self.run("-m", "tests.tasks_site", str(count), label)
        return [Sent(*json.loads(line)) for line in out.splitlines()]

    def worker(self, **kissmetrics: Any) -> DbWorker:
        """A ``db_worker``; ``kissmetrics`` overrides the site's settings in its own."""
        worker = DbWorker(self, len(self.workers), kissmetrics).start()
        self.workers.append(worker)
        return worker

    def log(self) -> str:
        return "\n".join(w.log() for w in self.workers)


class DbWorker(ProcessGroup):
    """``manage.py db_worker``, polling every 0.1 s, in a process group of its own."""

    def __init__(self, site: Site, n: int, kissmetrics: dict[str, Any]) -> None:
        self.site = site
        self.kissmetrics = {**site.kissmetrics, **kissmetrics}
        self.log_path = site.queue.tmp / f"worker-{n}.log"
        self.process = None

    def start(self) -> DbWorker:
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "django", "db_worker", "--interval", "0.1"),
                    *("--no-startup-delay", "--worker-id", self.log_path.stem),
                ],
                cwd=ROOT,
                env=self.site.queue.env(self.kissmetrics),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None


@pytest.fixture(params=["sqlite", "postgres"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Queue]:
    made = Queue(request.param, tmp_path)
    try:
        yield made
    finally:
        made.drop()


@pytest.fixture
def site(queue: Queue, tracker: StandInTracker) -> Iterator[Site]:
    made = Site(queue, tracker)
    made.run("-m", "django", "migrate", "--noinput", "-v", "0")
    try:
        yield made
    finally:
        for worker in made.workers:
            worker.stop()


def deliveries(queue: Queue) -> list[tuple[str, dict[str, Any]]]:
    return [(status, args) for path, status, args in queue.rows() if path == DELIVER]


def test_one_task_per_batch_delivered_by_db_worker(site: Site, tracker: StandInTracker) -> None:
    sent = site.record(10, "Batch")
    ((status, args),) = deliveries(site.queue)  # Queued, one task for the batch.
    assert status == "READY"
    assert len(args["args"][0]) == 10

    site.worker()
    wait_until(all_arrived(tracker, sent), 30, f"the batch\n{site.log()}")
    quiesce(tracker, quiet=0.5, timeout=10)
    assert_delivered(tracker, sent)  # Once each, with the _t of its call.
    wait_until(lambda: deliveries(site.queue)[0][0] == "SUCCESSFUL", 10, "the task to finish")


def test_only_the_failed_commands_are_retried_with_run_after(
    site: Site, tracker: StandInTracker
) -> None:
    tracker.fail(3, 503)
    site.worker()
    sent = site.record(10, "Retry")
    wait_until(all_arrived(tracker, sent), 30, f"the retried commands\n{site.log()}")
    quiesce(tracker, quiet=0.5, timeout=10)
    assert_delivered(tracker, sent)
    assert len(tracker.refused) == 3
    tasks = deliveries(site.queue)
    # The batch, then its three failed commands alone, as attempt 1.
    assert [len(args["args"][0]) for _, args in tasks] == [10, 3]
    assert [args["args"][1] for _, args in tasks] == [0, 1]
    assert {c[1] for c in tasks[1][1]["args"][0]} <= {r.person for r in tracker.refused}


def test_worker_killed_mid_batch_the_spool_replays_it(site: Site, tracker: StandInTracker) -> None:
    # DELIVERY_CONCURRENCY 4 with 16 commands: four rounds, so a kill lands mid-batch.
    tracker.delay = 0.5
    sent = site.record(16, "Killed")
    first = site.worker()
    wait_until(lambda: len(tracker.hits) >= 1, 30, f"the batch to start\n{site.log()}")
    first.kill()
    at_kill = len(tracker.hits)
    assert 0 < at_kill < len(sent), "the kill did not land in the middle of the batch"
    # django-tasks-db leaves the task "running" for good: the queue will not run it again.
    assert [status for status, _ in deliveries(site.queue)] == ["RUNNING"]
    tracker.delay = 0.0

    # The next worker of the host replays what the killed one held, once its lease ends
    # (2 x TIMEOUT x 4 rounds + 5 s): the next batch starts its publisher.
    site.worker()
    later = site.record(1, "Later")
    wait_until(all_arrived(tracker, sent + later), 60, f"the killed batch\n{site.log()}")
    quiesce(tracker, quiet=1.0, timeout=20)
    # Copies only of what was in flight at the kill, each with the _t of its call.
    assert_delivered(tracker, sent + later, most=2)


def test_the_ping_reports_each_hop(site: Site, tracker: StandInTracker) -> None:
    quiet = site.queue.env(site.kissmetrics)
    no_worker = subprocess.run(
        [sys.executable, "-m", "django", "kissmetrics_ping", "--timeout", "2"],
        cwd=ROOT,
        env=quiet,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_worker.returncode == 1
    assert "ok  tasks: enqueued on TASKS['default'] (DatabaseBackend)" in no_worker.stdout
    assert "worker: no worker took the ping task" in no_worker.stderr

    site.worker()
    out = site.run("-m", "django", "kissmetrics_ping", "--timeout", "30")
    assert "ok  worker: worker-0 took the task" in out
    assert f"ok  tracking server: {tracker.url} answered 200" in out
    assert "(from worker-0)" in out


def test_a_worker_without_a_key_delivers_the_ping_with_the_commands_key(
    site: Site, tracker: StandInTracker
) -> None:
    # As on Celery (tests/test_ping.py): the key travels with the command, so a worker whose
    # environment lacks it still delivers, and never blames the tracking server for that.
    site.worker(API_KEY=None)
    out = site.run("-m", "django", "kissmetrics_ping", "--timeout", "30")
    assert f"ok  tracking server: {tracker.url} answered 200" in out
    (hit,) = tracker.wait_for(1)
    assert hit.name == "Kissmetrics Ping"
    assert hit.params["_k"] == "test-key"
