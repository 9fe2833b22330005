"""Delivery throughput of one Django Tasks worker: the ``tasks`` backend on django-tasks-db.

Queues ``--batches`` tasks of ``MAX_BATCH`` (500) commands each, as the publisher does,
then drains them with one worker, ``manage.py db_worker --batch`` (one process, the
queue's own loop), against a lean stand-in tracker in its own process on loopback.
Beside it, in the same run, the delivery path alone: the same task called directly,
with no queue. Events per second of each, and the share the queue costs. Every event
must reach the tracker: exits 1 otherwise.

The queue is a SQLite file by default; ``--postgres NAME`` creates that database on
127.0.0.1:5432 (user postgres), uses it, and drops it. Run:
``python benchmarks/tasks_worker.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
from _common import TrackerProcess, interleave, median, table

KEY = "bench-key"


def configure(tracker: TrackerProcess, database: dict[str, Any]) -> None:
    import django

    backport = ["django_tasks"] if django.VERSION < (6, 0) else []
    _common.setup_django(
        INSTALLED_APPS=["django_kissmetrics", *backport, "django_tasks_db"],
        DATABASES={"default": database},
        TASKS={"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}},
        KISSMETRICS={
            "API_KEY": KEY,
            "BACKEND": "tasks",
            "TRACKING_URL": tracker.url,
            "ON_ENQUEUE_FAILURE": "log",  # No spool: nothing here fails, and none is held.
        },
    )


def wire_batches(batches: int, size: int) -> list[list[Any]]:
    from django_kissmetrics.commands import make_record

    return [
        [
            make_record(f"visitor-{b}-{i}", "Viewed Product", {"sku": i, "price": 49}).to_wire()
            for i in range(size)
        ]
        for b in range(batches)
    ]


def run(args: argparse.Namespace, database: dict[str, Any]) -> int:
    with TrackerProcess("fast") as tracker:
        configure(tracker, database)
        from django.core.management import call_command

        from django_kissmetrics.publisher import MAX_BATCH
        from django_kissmetrics.tasks_backend import deliver

        call_command("migrate", verbosity=0)
        batches = wire_batches(args.batches, MAX_BATCH)
        total = args.batches * MAX_BATCH
        print("benchmarks/tasks_worker.py: one Django Tasks worker delivering to loopback")
        print(_common.machine())
        print(
            f"queue: django-tasks-db on {database['ENGINE'].rsplit('.', 1)[1]}; "
            f"{args.batches} tasks of {MAX_BATCH} commands"
        )
        arrived: list[int] = []

        def queued() -> float:
            tracker.reset()
            for wire in batches:
                deliver.enqueue(wire, 0)
            started = time.perf_counter()
            call_command("db_worker", "--batch", "--no-startup-delay", verbosity=0)
            seconds = time.perf_counter() - started
            arrived.append(tracker.hits())
            return seconds

        def direct() -> float:
            tracker.reset()
            started = time.perf_counter()
            for wire in batches:
                deliver.call(wire, 0)
            seconds = time.perf_counter() - started
            arrived.append(tracker.hits())
            return seconds

        paths = {"delivery path alone": direct, "db_worker (queue + delivery)": queued}
        results = interleave(paths, args.rounds)
        ok = all(count == total for count in arrived)
        rows = [
            [name, f"{median(times):.2f}", f"{total / median(times):,.0f}"]
            for name, times in results.items()
        ]
        print(f"medians of {args.rounds} interleaved rounds (after a warm-up round)")
        print(table(["path", "seconds", "events/s"], rows))
        alone, queue = results.values()
        ratios = [q / d for d, q in zip(alone, queue, strict=True)]
        print(
            f"\nthe queue's share: db_worker takes {median(ratios):.2f}x the delivery path's "
            "time (median of the rounds)"
        )
        if not ok:
            print(f"ERROR: not every one of the {total} events arrived in every round")
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Measure; 0 when every event arrived, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20, help="tasks of 500 commands")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each path")
    parser.add_argument("--postgres", metavar="NAME", help="queue on this PostgreSQL database")
    args = parser.parse_args(argv)
    if not args.postgres:
        with tempfile.TemporaryDirectory(prefix="km-bench-tasks-") as folder:
            name = str(Path(folder) / "queue.sqlite3")
            return run(args, {"ENGINE": "django.db.backends.sqlite3", "NAME": name})
    import psycopg

    with psycopg.connect(host="127.0.0.1", user="postgres", autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{args.postgres}"')
    try:
        return run(
            args,
            {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": args.postgres,
                "USER": "postgres",
                "HOST": "127.0.0.1",
            },
        )
    finally:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(host="127.0.0.1", user="postgres", autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{args.postgres}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
