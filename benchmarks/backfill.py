"""``kissmetrics_backfill`` over 100,000 rows: time, peak memory (flat), everything queued.

A SQLite file holds 100,000 orders of 1,000 users. Each run is a fresh process that runs
``manage.py kissmetrics_backfill --model ...`` through the celery backend into a real
Redis, over the first 10,000, 50,000 and 100,000 rows. Beside each run, in the same way,
a baseline process only streams the same rows (``.iterator()``) without sending them.
After each run the benchmark reads the Celery messages back from Redis and counts the
commands in them: all of them must be there once the process has exited (the publisher
is flushed before the command returns).

Target: the peak resident memory of the 100,000-row run within 10 MB of the 10,000-row
run (memory is flat), and every command queued.

Needs Redis (``--redis``, default ``redis://127.0.0.1:6379/11``; the Celery keys there
are cleared).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, machine, setup_django, table

REDIS_URL = "redis://127.0.0.1:6379/11"
SIZES = (10_000, 50_000, 100_000)
USERS = 1_000
FLAT_MB = 10.0


def configure(db: Path, redis_url: str) -> None:
    """Django with the test suite's models in ``db`` and the celery backend on ``redis_url``."""
    setup_django(
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django_kissmetrics",
            "tests",
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(db)}},
        KISSMETRICS={"API_KEY": "bench-key", "BACKEND": "celery"},
    )
    from celery import Celery

    app = Celery("bench", broker=redis_url)
    app.conf.broker_connection_retry_on_startup = True
    app.set_default()
    app.set_current()


def populate(db: Path, redis_url: str, rows: int) -> None:
    """Create the tables and ``rows`` orders (in this process, before any run)."""
    configure(db, redis_url)
    from django.contrib.auth.models import User
    from django.core.management import call_command

    from tests.models import Order

    call_command("migrate", run_syncdb=True, verbosity=0)
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    User.objects.bulk_create(User(username=f"user{i}", password="!") for i in range(USERS))
    users = list(User.objects.order_by("pk").values_list("pk", flat=True))
    batch = [
        Order(
            user_id=users[i % USERS],
            placed_at=start + dt.timedelta(minutes=i),
            total=f"{10 + i % 90}.00",
            plan=("basic", "pro", "team")[i % 3],
        )
        for i in range(rows)
    ]
    Order.objects.bulk_create(batch, batch_size=5_000)


def child(db: Path, redis_url: str, rows: int, mode: str) -> None:
    """One measured process: the backfill, or the baseline; prints a JSON line."""
    configure(db, redis_url)
    import io

    from django.core.management import call_command

    from tests.models import Order

    started = time.perf_counter()
    if mode == "baseline":
        for _ in Order.objects.order_by("pk").filter(pk__lte=rows).iterator(chunk_size=500):
            pass
    else:
        out = io.StringIO()
        call_command(
            "kissmetrics_backfill",
            "--model=tests.Order",
            "--event=Placed Order",
            "--time-field=placed_at",
            "--identity-field=user",
            "--property=Total=total",
            "--property=Plan=plan",
            f"--filter=pk__lte={rows}",
            "--quiet",
            stdout=out,
        )
    seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_kb": peak_kb}))


def queued_commands(redis_url: str) -> int:
    """Commands in the Celery messages waiting in Redis (each message carries a chunk)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    total = 0
    for raw in client.lrange("celery", 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        total += len(args[0])
    return total


def clear(redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).delete("celery", "unacked", "unacked_index")


def measure(db: Path, redis_url: str, rows: int, mode: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            f"--rows={rows}",
            f"--db={db}",
            f"--redis={redis_url}",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode} run of {rows} rows failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default=REDIS_URL, help=f"broker (default {REDIS_URL})")
    parser.add_argument("--child", choices=["backfill", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=max(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.db, args.redis, args.rows, args.child)
        return 0

    print(machine())
    with tempfile.TemporaryDirectory(prefix="km-backfill-") as tmp:
        db = Path(tmp) / "orders.sqlite3"
        started = time.perf_counter()
        populate(db, args.redis, max(SIZES))
        print(
            f"{max(SIZES):,} orders of {USERS:,} users written in "
            f"{time.perf_counter() - started:.1f} s"
        )
        rows_out = []
        peaks: dict[int, float] = {}
        lost = 0
        for rows in SIZES:
            base = measure(db, args.redis, rows, "baseline")
            clear(args.redis)
            run = measure(db, args.redis, rows, "backfill")
            queued = queued_commands(args.redis)
            clear(args.redis)
            lost += rows - queued
            peaks[rows] = run["peak_kb"] / 1024
            rows_out.append(
                [
                    f"{rows:,}",
                    f"{run['seconds']:.2f}",
                    f"{rows / run['seconds']:,.0f}",
                    f"{base['seconds']:.2f}",
                    f"{run['peak_kb'] / 1024:.1f}",
                    f"{base['peak_kb'] / 1024:.1f}",
                    f"{queued:,}",
                ]
            )
    header = [
        "rows",
        "backfill s",
        "rows/s",
        "baseline s",
        "peak RSS MB",
        "baseline MB",
        "queued",
    ]
    print(table(header, rows_out))
    growth = peaks[max(SIZES)] - peaks[min(SIZES)]
    print(
        f"peak memory from {min(SIZES):,} to {max(SIZES):,} rows: {growth:+.1f} MB "
        f"(target < {FLAT_MB:.0f} MB); commands missing from Redis: {lost}"
    )
    return 0 if growth < FLAT_MB and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
