"""Graceful stops under CPU pressure: does a stop lose the publisher's last window?

For each server kind (gunicorn gthread, gunicorn sync, uvicorn; two workers each) and
``--cycles`` cycles (20): start the site (``tests.site``, celery backend, the default
200 ms publish window) under a real server, send visitors at it from ``--visitors``
threads, send the graceful stop a deploy sends while they are still coming, and count
at the stand-in tracker every event whose request was answered 200. A busy loop runs
on every core for the whole run, so that the publisher thread, the server's workers and
the Celery worker all fight for the CPU.

Reports, per server kind: events answered (sent), events that arrived, lost, and
duplicated; cycles with a loss. Exits 1 when an event is lost. Bounded in time: a
cycle that has not seen its events within ``--settle`` seconds counts them as lost, and
the run stops starting cycles after ``--budget`` seconds.

Run: ``python benchmarks/stops.py [--cycles 20] [--servers gthread,sync,uvicorn]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import _common  # Also puts the checkout first on sys.path.

#: Server kind -> (server, its extra options).
KINDS: dict[str, tuple[str, list[str]]] = {
    "gthread": ("gunicorn", ["-k", "gthread", "--threads", "4"]),
    "sync": ("gunicorn", []),
    "uvicorn": ("uvicorn", []),
}


def _spin(stop: Any) -> None:
    # A busy loop: one core's worth of CPU pressure until told to stop.
    while not stop.is_set():
        for _ in range(100_000):
            pass


def _visit(url: str, label: str, answered: list[str], until: threading.Event) -> None:
    n = 0
    while not until.is_set():
        event = f"{label}-{n}"
        n += 1
        try:
            with urllib.request.urlopen(f"{url}/record/?event={event}", timeout=10) as response:
                response.read()
                if response.status == 200:
                    answered.append(event)
        except (OSError, urllib.error.URLError):
            # The server stopped listening: this visitor is done (its last request,
            # unanswered, may or may not have been handled; it is not counted as sent).
            return


def cycle(
    kind: str, number: int, broker_url: str, config: dict[str, Any], args: argparse.Namespace
) -> tuple[list[str], float]:
    """One start, traffic, graceful stop; the events answered 200 and the stop's seconds."""
    from tests.servers import SiteProcess

    server, options = KINDS[kind]
    site = SiteProcess(server, config, broker_url, workers=2, options=options)
    with site:
        answered: list[str] = []
        until = threading.Event()
        visitors = [
            threading.Thread(
                target=_visit, args=(site.url, f"{kind}.{number}.{v}", answered, until)
            )
            for v in range(args.visitors)
        ]
        for visitor in visitors:
            visitor.start()
        time.sleep(args.traffic)
        started = time.monotonic()
        site.stop(timeout=60)
        took = time.monotonic() - started
        until.set()
        for visitor in visitors:
            visitor.join(15)
    return list(answered), took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20, help="stops per server kind")
    parser.add_argument("--servers", default="gthread,sync,uvicorn", help="kinds, comma-separated")
    parser.add_argument("--visitors", type=int, default=8, help="visitor threads")
    parser.add_argument("--traffic", type=float, default=1.5, help="seconds of traffic per stop")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait for events")
    parser.add_argument("--budget", type=float, default=1500.0, help="seconds for the whole run")
    parser.add_argument("--spinners", type=int, default=1, help="busy loops per core (0: none)")
    args = parser.parse_args()
    kinds = [k for k in args.servers.split(",") if k]

    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    from django_kissmetrics.testing import StandInTracker
    from tests.conftest import RedisServer
    from tests.worker import WorkerProcess

    print(_common.machine())
    tracker = StandInTracker().start()
    broker = RedisServer()
    broker.start()
    stop_spinning = multiprocessing.Event()
    spinners = [
        multiprocessing.Process(target=_spin, args=(stop_spinning,), daemon=True)
        for _ in range(args.spinners * (os.cpu_count() or 1))
    ]
    for spinner in spinners:
        spinner.start()
    print(f"busy loops: {len(spinners)}; visitors: {args.visitors}; cycles: {args.cycles}")
    deadline = time.monotonic() + args.budget
    rows: list[list[str]] = []
    lost_any = False
    try:
        for kind in kinds:
            spool_dir = tempfile.mkdtemp(prefix=f"km-stops-{kind}-")
            config = {
                "BACKEND": "celery",
                "TRACKING_URL": tracker.url,
                "SPOOL_DIR": spool_dir,
                "RETRY_BACKOFF": 0.05,
                "RETRY_BACKOFF_MAX": 1.0,
            }
            sent_total = arrived_total = duplicated = 0
            lossy: list[str] = []
            stops: list[float] = []
            done = 0
            with WorkerProcess(broker.url, config):
                for number in range(args.cycles):
                    if time.monotonic() > deadline:
                        break
                    sent, took = cycle(kind, number, broker.url, config, args)
                    stops.append(took)
                    wanted = set(sent)
                    until = time.monotonic() + args.settle
                    while time.monotonic() < until:
                        seen = Counter(h.name or "" for h in tracker.hits)
                        if all(seen[e] for e in wanted):
                            break
                        time.sleep(0.2)
                    time.sleep(0.5)
                    seen = Counter(h.name or "" for h in tracker.hits)
                    arrived = sum(1 for e in wanted if seen[e])
                    duplicated += sum(seen[e] - 1 for e in wanted if seen[e] > 1)
                    sent_total += len(wanted)
                    arrived_total += arrived
                    done += 1
                    if arrived < len(wanted):
                        missing = sorted(wanted - {e for e in wanted if seen[e]})
                        lossy.append(f"{number}: {len(missing)} ({', '.join(missing[:5])})")
                    print(
                        f"{kind} cycle {number}: sent {len(wanted)}, arrived {arrived}, "
                        f"stop {took:.1f} s",
                        flush=True,
                    )
            lost = sent_total - arrived_total
            lost_any = lost_any or lost > 0
            rows.append(
                [
                    kind,
                    str(done),
                    str(sent_total),
                    str(arrived_total),
                    str(lost),
                    str(duplicated),
                    f"{_common.median(stops):.1f}" if stops else "-",
                    str(len(lossy)),
                ]
            )
            for line in lossy:
                print(f"  {kind} lost in cycle {line}")
    finally:
        stop_spinning.set()
        for spinner in spinners:
            spinner.join(5)
        broker.stop()
        tracker.stop()
    print()
    print(_common.machine())
    header = ["server", "cycles", "sent", "arrived", "lost", "duplicated", "stop s", "lossy"]
    print(_common.table(header, rows))
    return 1 if lost_any else 0


if __name__ == "__main__":
    sys.exit(main())
