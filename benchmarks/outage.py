"""Outage: the broker goes away for a while under steady load; what the spool keeps.

km.record (outside a request, ``--rate`` events per second) -> the per-process publisher
-> a redis-server of its own -> a Celery worker in a subprocess -> the stand-in tracker.
After ``--before`` seconds the Redis server is stopped for ``--outage`` seconds (30),
while the load goes on; then it is started again on the same port and the load goes on
for ``--after`` seconds.

Reports events lost (goal 0) and duplicated, the spool's peak size (entries, commands,
bytes), the time from the broker's return until the spool is empty (drain), and from
the end of the load until every event has arrived. Exits 1 when an event is lost.
Run: ``python benchmarks/outage.py [--outage 30] [--rate 200]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter

import _common  # Also puts the checkout first on sys.path.


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=30.0, help="seconds without a broker")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--before", type=float, default=5.0, help="seconds before the outage")
    parser.add_argument("--after", type=float, default=10.0, help="seconds of load after it")
    args = parser.parse_args()

    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django
    from django.conf import settings

    from django_kissmetrics.testing import StandInTracker
    from tests.conftest import RedisServer
    from tests.worker import WorkerProcess

    tracker = StandInTracker().start()
    broker = RedisServer()
    broker.start()
    spool_dir = tempfile.mkdtemp(prefix="km-outage-spool-")
    config = {
        "API_KEY": "outage-key",
        "BACKEND": "celery",
        "TRACKING_URL": tracker.url,
        "SPOOL_DIR": spool_dir,
    }
    settings.KISSMETRICS = config
    settings.CELERY_BROKER_URL = broker.url
    django.setup()

    from django_kissmetrics import km, publisher
    from django_kissmetrics.spool import get_spool
    from tests.celery_app import app

    app.set_default()
    app.set_current()
    spool = get_spool()
    assert spool is not None

    peak = {"entries": 0, "commands": 0, "bytes": 0}
    watching = threading.Event()
    #: time.monotonic() of the broker's return, and of the spool's first empty look after.
    moments: dict[str, float] = {}

    def watch() -> None:
        while not watching.wait(0.1):
            status = spool.status()
            peak["entries"] = max(peak["entries"], status.count)
            peak["commands"] = max(peak["commands"], status.commands)
            peak["bytes"] = max(peak["bytes"], status.bytes)
            if "back" in moments and "drained" not in moments and status.count == 0:
                moments["drained"] = time.monotonic()

    sent = 0
    total = args.before + args.outage + args.after
    worker = WorkerProcess(broker.url, config, loglevel="WARNING").start()
    print(_common.machine())
    print(
        f"load: {args.rate:.0f} events/s for {total:.0f} s; broker down from "
        f"{args.before:.0f} s to {args.before + args.outage:.0f} s; spool {spool.path}"
    )
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        began = time.monotonic()
        down_at = began + args.before
        up_at = down_at + args.outage
        broker_down = False
        back: float | None = None
        while True:
            now = time.monotonic()
            if now - began >= total:
                break
            if not broker_down and now >= down_at and back is None:
                broker.stop()
                broker_down = True
            if broker_down and now >= up_at:
                broker.start()  # The same port, as a restarted Redis.
                broker_down = False
                back = moments["back"] = time.monotonic()
            due = began + sent / args.rate
            if due > now:
                time.sleep(min(due - now, 0.01))
                continue
            km.record("Outage Load", {"seq": sent}, identity=f"outage-{sent % 1000}")
            sent += 1
        publisher.flush()
        ended = time.monotonic()
        assert back is not None
        arrived_at = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and ("drained" not in moments or arrived_at is None):
            if arrived_at is None and len({h.params.get("seq") for h in tracker.hits}) >= sent:
                arrived_at = time.monotonic()
            time.sleep(0.05)
        drained_at = moments.get("drained")
        time.sleep(1.0)
    finally:
        watching.set()
        worker.stop()
        broker.stop()
        tracker.stop()

    copies = Counter(h.params.get("seq") for h in tracker.hits)
    lost = sent - len(copies)
    duplicates = sum(copies.values()) - len(copies)
    during = int(args.outage * args.rate)
    print(f"\nevents sent: {sent:,} ({during:,} of them during the outage)")
    print(f"events lost: {lost:,}; duplicate hits: {duplicates:,}")
    print(
        f"spool peak: {peak['entries']:,} entries, {peak['commands']:,} commands, "
        f"{peak['bytes'] / 1024:.1f} KiB"
    )

    def since(start: float, at: float | None) -> str:
        return "not within 120 s" if at is None else f"{at - start:.1f} s"

    print(f"drain (broker back -> spool empty): {since(back, drained_at)}")
    print(f"end of the load -> every event at the tracker: {since(ended, arrived_at)}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
