"""Soak: many events through the whole Celery path, for throughput, latency and memory.

km.record (outside a request) -> the per-process publisher -> Redis -> a Celery worker in
its own process (prefork by default, as deployed) -> KissmetricsClient -> the package's
StandInTracker in a third process. Every event carries its sequence number and the time of
the call; the tracker process notes when each one arrives.

Two phases after a warm-up:

1. Steady (``--events``, default 100,000, at ``--rate`` events per second): the soak.
   Latency from call to tracker hit (p50, p99, max), events lost or duplicated, and the
   worker's resident memory (main and pool processes, ``VmRSS``) at start, after the
   warm-up and at the end. Target: under 10 MB of growth from the warm-up to the end.
2. Burst (``--burst`` events, as fast as one thread can call ``km.record``): throughput,
   events delivered per second from the first call to the last hit.

Needs a Redis (``--redis``, default ``redis://127.0.0.1:6379/12``; its Celery keys are
cleared). Exits 1 when an event is lost or memory grows past the target.
Run: ``python benchmarks/soak.py [--events N]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection

import _common  # Also puts the checkout first on sys.path.

MEMORY_TARGET_MB = 10.0
#: A database of its own: the test suite uses 15 and benchmarks/request.py 13.
REDIS_URL = "redis://127.0.0.1:6379/12"
WARMUP = 2_000


# --- The tracker, in its own process ---------------------------------------------------


def _serve(conn: Connection) -> None:
    from django_kissmetrics.testing import StandInTracker

    tracker = StandInTracker().start()
    first: dict[int, float] = {}  # Sequence number -> latency of its first arrival.
    state = {"hits": 0}
    lock = threading.Lock()

    def drain() -> None:
        # Fold hits into latencies as they come, so 100,000 hits do not pile up in memory.
        # Only appends happen concurrently, so slicing the front off is safe.
        hits = tracker.hits
        while True:
            count = len(hits)
            batch = hits[:count]
            del hits[:count]
            with lock:
                for hit in batch:
                    if "seq" not in hit.params or "sent" not in hit.params:
                        continue  # Not one of ours (another process sharing the broker).
                    state["hits"] += 1
                    seq = int(hit.params["seq"])
                    if seq not in first:
                        first[seq] = hit.received - float(hit.params["sent"])
            time.sleep(0.05)

    threading.Thread(target=drain, daemon=True).start()
    conn.send(tracker.url)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        with lock:
            if message == "count":
                conn.send((len(first), state["hits"]))
            elif message == "take":
                conn.send((dict(first), state["hits"]))
                first.clear()
                state["hits"] = 0
            else:
                conn.send(None)
                return


class Tracker:
    """The stand-in tracker process and its control pipe."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()
        if not self._conn.poll(30):
            raise RuntimeError("the stand-in tracker did not start")
        self.url: str = self._conn.recv()
        self.pid = self._process.pid

    def count(self) -> tuple[int, int]:
        """(distinct events arrived, hits) since the last :meth:`take`."""
        self._conn.send("count")
        unique, hits = self._conn.recv()
        return int(unique), int(hits)

    def take(self) -> tuple[dict[int, float], int]:
        """Latency of each distinct event and the number of hits; then start afresh."""
        self._conn.send("take")
        first, hits = self._conn.recv()
        return first, int(hits)

    def stop(self) -> None:
        self._conn.send("stop")
        self._conn.recv()
        self._process.join(5)


# --- The site side ---------------------------------------------------------------------


def setup(tracking_url: str, broker: str) -> None:
    """Django from tests.settings, with the celery backend and ``broker``."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django
    from django.conf import settings

    settings.KISSMETRICS = {
        "API_KEY": "soak-key",
        "BACKEND": "celery",
        "TRACKING_URL": tracking_url,
    }
    settings.CELERY_BROKER_URL = broker
    django.setup()

    import redis

    from tests.celery_app import app

    app.set_default()
    app.set_current()
    redis.Redis.from_url(broker).delete("celery", "unacked", "unacked_index")


def produce(start: int, count: int, rate: float | None) -> float:
    """``count`` events numbered from ``start``, paced at ``rate``/s (``None``: flat out).

    Returns the time of the first call. Each event is one km.record, as one request
    tracking one event would be.
    """
    from django_kissmetrics import km, publisher

    began = time.time()
    clock = time.monotonic()
    for n in range(count):
        if rate is not None:
            # Catch up to the schedule, then sleep until the next event is due.
            due = clock + n / rate
            delay = due - time.monotonic()
            if delay > 0.001:
                time.sleep(delay)
        seq = start + n
        km.record(
            "Soaked",
            {"seq": seq, "sent": f"{time.time():.6f}", "plan": "pro & more"},
            identity=f"soak-{seq % 5000}",
        )
        if rate is None and n % 500 == 0:
            # Flat out, one thread outruns the publisher's bounded queue (which logs
            # what does not fit): hold back while it is half full, as a site's traffic
            # would be spread over many processes.
            buffer = publisher.get_publisher()
            while len(buffer.pending) > buffer.maxsize // 2:
                time.sleep(0.001)
    publisher.flush()
    return began


def wait_delivered(tracker: Tracker, expected: int, stall: float = 60.0) -> float:
    """Wait until ``expected`` distinct events arrived; return when the last one did."""
    last, since = -1, time.monotonic()
    while True:
        unique, _ = tracker.count()
        if unique >= expected:
            return time.time()
        if unique != last:
            last, since = unique, time.monotonic()
        elif time.monotonic() - since > stall:
            return time.time()  # Nothing new for a minute: report what arrived.
        time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="steady-phase events")
    parser.add_argument("--rate", type=float, default=1_000.0, help="steady-phase events/s")
    parser.add_argument("--burst", type=int, default=20_000, help="burst-phase events")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "threads"])
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--redis", default=REDIS_URL, help=f"the broker; its Celery keys are cleared ({REDIS_URL})"
    )
    args = parser.parse_args()

    tracker = Tracker()
    broker = args.redis
    setup(tracker.url, broker)
    from tests.worker import WorkerProcess

    worker = WorkerProcess(
        broker,
        {"API_KEY": "soak-key", "BACKEND": "celery", "TRACKING_URL": tracker.url},
        pool=args.pool,
        concurrency=args.concurrency,
        loglevel="WARNING",
    ).start()
    print(_common.machine())
    print(
        f"worker: --pool={args.pool} --concurrency={args.concurrency}; broker {broker}; "
        f"tracker pid {tracker.pid}"
    )
    failed = False
    try:
        rss_start = worker.rss_kb()
        produce(0, WARMUP, None)
        wait_delivered(tracker, WARMUP)
        tracker.take()
        rss_before = worker.rss_kb()

        # 1. Steady.
        produce(WARMUP, args.events, args.rate)
        wait_delivered(tracker, args.events)
        first, hits = tracker.take()
        rss_after = worker.rss_kb()
        latencies = sorted(first.values())
        lost = args.events - len(first)
        growth = (rss_after - rss_before) / 1024
        print(f"\nsteady: {args.events:,} events offered at {args.rate:,.0f}/s")
        if latencies:
            print(
                f"  latency call -> tracker: p50 {percentile(latencies, 50) * 1000:.1f} ms, "
                f"p99 {percentile(latencies, 99) * 1000:.1f} ms, "
                f"max {latencies[-1] * 1000:.1f} ms"
            )
        print(f"  delivered {len(first):,}, lost {lost:,}, duplicate hits {hits - len(first):,}")
        print(
            f"  worker RSS (main + pool processes): {rss_start / 1024:.1f} MB at start, "
            f"{rss_before / 1024:.1f} MB after a {WARMUP:,}-event warm-up, "
            f"{rss_after / 1024:.1f} MB after the soak "
            f"({growth:+.1f} MB; target < {MEMORY_TARGET_MB:.0f} MB)"
        )
        failed |= lost > 0 or growth >= MEMORY_TARGET_MB

        # 2. Burst.
        start = WARMUP + args.events
        began = produce(start, args.burst, None)
        finished = wait_delivered(tracker, args.burst)
        first, hits = tracker.take()
        elapsed = finished - began
        print(f"\nburst: {args.burst:,} events as fast as one thread calls km.record")
        print(
            f"  throughput {len(first) / elapsed:,.0f} events/s "
            f"({len(first):,} delivered in {elapsed:.1f} s, "
            f"lost {args.burst - len(first):,}, duplicate hits {hits - len(first):,})"
        )
        print(f"  worker RSS at the end: {worker.rss_kb() / 1024:.1f} MB")
        failed |= len(first) < args.burst
    finally:
        worker.stop()
        tracker.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
