"""End to end: events recorded by requests, delivered by a real Celery worker to a far tracker.

20,000 requests (``--events``) through Django's test client and the package's middleware,
each recording one event with ``km.record`` (celery backend, the background publisher) ->
a real Redis -> one Celery worker in a process of its own (prefork, ``--concurrency 1``) ->
a stand-in tracker that answers after 50 ms (``--latency``), a lean asyncio server in a third
process that notes each event's sequence number and ``_t``.

Two phases. Live: the worker runs while the requests come; the time from the first request
to the last hit. Backlog: the same requests made while no worker runs (the messages wait in
Redis, each filled to ``MAX_BATCH`` as at a busy site), then the worker started; the time
from its start to the last hit, which is the worker process's own delivery rate. Each phase
checks that every event arrived exactly once, dated (``_d=1``) with a ``_t`` inside the run.
Exits 1 otherwise.
Run: ``python benchmarks/end_to_end.py [--redis URL]`` (a database of its own: its Celery
keys are cleared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import _common  # Also puts the checkout first on sys.path.
from _common import TrackerProcess

#: A database of its own: request.py uses 13, soak.py 12, backfill.py 11.
REDIS_URL = "redis://127.0.0.1:6379/10"
KEY = "e2e-key"


def setup(tracking_url: str, broker: str) -> None:
    """Django from tests.settings, with the celery backend and ``broker``."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django
    from django.conf import settings

    settings.KISSMETRICS = {"API_KEY": KEY, "BACKEND": "celery", "TRACKING_URL": tracking_url}
    settings.CELERY_BROKER_URL = broker
    django.setup()

    import redis

    from tests.celery_app import app

    app.set_default()
    app.set_current()
    redis.Redis.from_url(broker).delete("celery", "unacked", "unacked_index")


def requests(count: int) -> tuple[float, float]:
    """``count`` requests, each recording one event; returns (first start, last end)."""
    from django.test import Client

    from django_kissmetrics import publisher

    client = Client()
    began = time.time()
    for seq in range(count):
        response = client.get("/record/", {"event": "E2E", "props": json.dumps({"seq": seq})})
        if response.status_code != 200:
            raise RuntimeError(f"request {seq} answered {response.status_code}")
        if seq % 500 == 0:
            # One thread outruns the publisher's bounded queue, which would log what does
            # not fit: hold back while it is half full, as many processes would share it.
            buffer = publisher.get_publisher()
            while len(buffer.pending) > buffer.maxsize // 2:
                time.sleep(0.001)
    ended = time.time()
    publisher.flush()
    return began, ended


def wait_for(tracker: TrackerProcess, count: int, stall: float) -> dict[str, Any]:
    """What the tracker saw once ``count`` events arrived, or nothing came for ``stall`` s."""
    last, since = -1, time.monotonic()
    while True:
        seen = tracker.seen()
        arrived = len(seen["counts"])
        if arrived >= count:
            time.sleep(1.0)  # Long enough for a duplicate to show.
            return tracker.seen()
        if arrived != last:
            last, since = arrived, time.monotonic()
        elif time.monotonic() - since > stall:
            return seen
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """One run; 0 when every event arrived exactly once with its ``_t``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="requests, one event each")
    parser.add_argument("--latency", type=float, default=50.0, help="the tracker's, in ms")
    parser.add_argument("--redis", default=REDIS_URL, help=f"the broker (default {REDIS_URL})")
    args = parser.parse_args(argv)

    with TrackerProcess("recording", delay=args.latency / 1000) as tracker:
        setup(tracker.url, args.redis)
        from django.conf import settings

        from django_kissmetrics.conf import get_settings
        from tests.worker import WorkerProcess

        print("benchmarks/end_to_end.py: requests -> Redis -> Celery worker -> tracker")
        print(_common.machine())
        print(
            f"{args.events:,} requests (Django test client, celery backend) -> {args.redis}"
            f" -> one prefork worker process (DELIVERY_CONCURRENCY "
            f"{get_settings().DELIVERY_CONCURRENCY}) -> tracker answering after "
            f"{args.latency:g} ms"
        )
        worker = WorkerProcess(
            args.redis, settings.KISSMETRICS, pool="prefork", concurrency=1, loglevel="WARNING"
        )
        worker.start()
        try:
            tracker.reset()
            began, ended = requests(args.events)
            seen = wait_for(tracker, args.events, stall=30.0)
        finally:
            worker.stop()
        print(
            f"\nlive: {args.events:,} requests in {ended - began:.1f} s "
            f"({args.events / (ended - began):,.0f}/s, one thread)"
        )
        last = seen["last"] or ended
        print(
            f"  first request to last hit: {last - began:.1f} s; "
            f"the last hit {last - ended:.2f} s after the last request"
        )
        ok = check(seen, args.events, began, ended)

        # A busy site's messages: a publish window long enough to fill each to MAX_BATCH,
        # where one thread of requests would fill a 0.2 s window with about a hundred.
        from django.test import override_settings

        from django_kissmetrics import publisher

        tracker.reset()
        publisher.stop()
        with override_settings(KISSMETRICS={**settings.KISSMETRICS, "PUBLISH_WINDOW": 5.0}):
            began, ended = requests(args.events)
            publisher.stop()
        with worker:  # Started here; stopped and cleaned up at the end.
            started = time.time()
            seen = wait_for(tracker, args.events, stall=30.0)
        last = seen["last"] or started
        print(
            f"\nbacklog: {args.events:,} events waiting in Redis, then the worker started: "
            f"start to last hit {last - started:.1f} s "
            f"({len(seen['counts']) / (last - started):,.0f} events/s)"
        )
        ok = check(seen, args.events, began, ended) and ok
    print("\nevery event exactly once, with its _t" if ok else "\nFAILED")
    return 0 if ok else 1


def check(seen: dict[str, Any], events: int, began: float, ended: float) -> bool:
    """Print and judge what arrived: each of ``events`` once, with a ``_t`` in the run."""
    counts: dict[str, int] = seen["counts"]
    stamps: dict[str, int] = seen["stamps"]
    expected = {str(n) for n in range(events)}
    missing = len(expected - set(counts))
    duplicates = sum(n - 1 for n in counts.values())
    undated = len(expected - set(stamps))
    outside = sum(1 for t in stamps.values() if not int(began) <= t <= ended + 1)
    print(
        f"  arrived {len(counts):,} of {events:,}: missing {missing:,}, duplicates "
        f"{duplicates:,}, without _t/_d {undated:,}, _t outside the requests {outside:,}"
    )
    return missing == duplicates == undated == outside == 0


if __name__ == "__main__":
    sys.exit(main())
