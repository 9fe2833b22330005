"""Delivery speed: one worker process's delivery path beside py-KISSmetrics and http.client.

For each latency (0, 10, 50 and 200 ms) a stand-in tracker runs in a process of its own:
a lean asyncio server that holds every answer that long while it serves every other
connection, so that it sustains thousands of answers a second at any latency. Against
it, for batches of 10, 500 and 10,000 commands, in the same run and round by round:

- django-kissmetrics: ``tasks.deliver`` on the whole batch, the task body a Celery
  worker runs (``DELIVERY_CONCURRENCY`` calls in flight on the process's event loop);
- py-KISSmetrics 1.1: ``Client.record`` one event after the other (keep-alive);
- a bare ``http.client`` keep-alive loop, one connection, the query built per call.

Each measurement repeats its batch for at least ``--min-seconds``. The one-by-one
contenders' time is linear in the batch, so at high latency they send only for
``--budget`` seconds (at least 5 calls) and their rate is extrapolated to the batch: the
table says where. CPU per event is this process's (all its threads). For the largest batch
the package's peak resident memory over its baseline, its peak open sockets and its
peak of asyncio tasks are sampled while it runs.

Targets: at 50 ms, >= 2,000 events/s on the 10,000 batch; at 0 ms (loopback), >= 0.8x the
bare loop's events/s on the 10,000 batch. Exits 1 when one is missed.
Run: ``python benchmarks/delivery.py`` (about five minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import _common
from _common import TrackerProcess, median, table

KEY = "bench-key"
TIMESTAMP = 1_700_000_000
LATENCIES = (0.0, 0.010, 0.050, 0.200)
BATCHES = (10, 500, 10_000)
RATE_TARGET = 2_000.0  # events/s at 50 ms, batch of 10,000
RATE_LATENCY = 0.050
LOOPBACK_TARGET = 0.8  # x the bare loop at 0 ms, batch of 10,000


def events(count: int) -> list[dict[str, Any]]:
    """``count`` different events as every contender gets them: person, name, properties."""
    return [
        {
            "person": f"visitor-{i}@example.com",
            "event": "Viewed Product",
            "properties": {"sku": f"SKU-{i % 97}", "price": 49, "plan": "pro & more"},
        }
        for i in range(count)
    ]


def cpu_seconds() -> float:
    """CPU time of this process, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Sample:
    """One measurement: events sent, wall seconds, CPU seconds; ``part``: extrapolated."""

    events: int
    seconds: float
    cpu: float
    part: bool = False

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds


def package_batch(batch: list[dict[str, Any]]) -> Callable[[], int]:
    """The worker's path: the task body on one message holding the whole batch."""
    from django_kissmetrics import tasks
    from django_kissmetrics.commands import make_record

    message = [
        make_record(e["person"], e["event"], e["properties"], TIMESTAMP).to_wire() for e in batch
    ]

    def run() -> int:
        delivered = tasks.deliver(message)
        if delivered != len(message):
            raise RuntimeError(f"only {delivered} of {len(message)} delivered")
        return len(message)

    return run


def py_kissmetrics_one(host: str) -> Callable[[dict[str, Any]], None]:
    """py-KISSmetrics 1.1: ``Client.record`` for one event (urllib3 pool, keep-alive)."""
    from KISSmetrics.client import Client

    client = Client(KEY, trk_host=host, trk_scheme="http")

    def send(e: dict[str, Any]) -> None:
        response = client.record(e["person"], e["event"], e["properties"], TIMESTAMP)
        if response.status != 200:
            raise RuntimeError(f"py-KISSmetrics got {response.status}")

    return send


def raw_one(host: str) -> Callable[[dict[str, Any]], None]:
    """The floor: ``http.client`` on one keep-alive connection, the query built per call."""
    name, port = host.rsplit(":", 1)
    conn = http.client.HTTPConnection(name, int(port), timeout=10)

    def send(e: dict[str, Any]) -> None:
        query = urlencode(
            [
                ("_k", KEY),
                ("_p", e["person"]),
                ("_n", e["event"]),
                ("_t", str(TIMESTAMP)),
                ("_d", "1"),
                *((k, str(v)) for k, v in e["properties"].items()),
            ]
        )
        conn.request("GET", f"/e?{query}")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"http.client got {response.status}")

    return send


def batched(run: Callable[[], int], min_seconds: float) -> Callable[[], Sample]:
    """Measure ``run`` (one whole batch) repeated for at least ``min_seconds``."""

    def measure() -> Sample:
        sent, cpu, started = 0, cpu_seconds(), time.perf_counter()
        while True:
            sent += run()
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                return Sample(sent, elapsed, cpu_seconds() - cpu)

    return measure


def one_by_one(
    send: Callable[[dict[str, Any]], None],
    batch: list[dict[str, Any]],
    min_seconds: float,
    budget: float,
) -> Callable[[], Sample]:
    """Measure ``send`` over ``batch`` (repeated for ``min_seconds``, cut at ``budget``)."""

    def measure() -> Sample:
        sent, cpu, started = 0, cpu_seconds(), time.perf_counter()
        while True:
            for e in batch:
                send(e)
                sent += 1
                elapsed = time.perf_counter() - started
                if elapsed >= budget and sent >= 5:
                    return Sample(sent, elapsed, cpu_seconds() - cpu, part=sent % len(batch) != 0)
            if elapsed >= min_seconds:
                return Sample(sent, elapsed, cpu_seconds() - cpu)

    return measure


def counted(tracker: TrackerProcess, measure: Callable[[], Sample]) -> Callable[[], Sample]:
    """``measure``, checking that the tracker received exactly the events it sent."""

    def run() -> Sample:
        tracker.reset()
        sample = measure()
        hits = tracker.hits()
        if hits != sample.events:
            raise RuntimeError(f"the tracker received {hits} requests, {sample.events} sent")
        return sample

    return run


class Peaks:
    """Samples this process's resident memory, open sockets and asyncio tasks while it runs."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.rss = self.sockets = self.tasks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_now() -> int:
        """Resident memory in bytes."""
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    @staticmethod
    def sockets_now() -> int:
        """Open sockets of this process."""
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # Closed since listed.
                count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        return count

    @staticmethod
    def tasks_now() -> int:
        """Tasks on the package's delivery loop (its private engine: a benchmark's view)."""
        import asyncio

        from django_kissmetrics import client

        engine = client._engine
        return 0 if engine is None else len(asyncio.all_tasks(engine.loop))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.rss = max(self.rss, self.rss_now())
            self.sockets = max(self.sockets, self.sockets_now())
            self.tasks = max(self.tasks, self.tasks_now())

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def at_latency(
    latency: float, rounds: int, min_seconds: float, budget: float
) -> tuple[dict[tuple[int, str], list[Sample]], dict[str, int]]:
    """Every batch and contender against one stand-in; the package's peaks for the largest."""
    results: dict[tuple[int, str], list[Sample]] = {}
    peaks: dict[str, int] = {}
    with TrackerProcess("fast", delay=latency) as tracker:
        from django.test import override_settings

        with override_settings(KISSMETRICS={"API_KEY": KEY, "TRACKING_URL": tracker.url}):
            # Warm up: the loop, its connections, the imports.
            package_batch(events(500))()
            for size in BATCHES:
                batch = events(size)
                contenders = {
                    "package": counted(tracker, batched(package_batch(batch), min_seconds)),
                    "py-KISSmetrics": counted(
                        tracker,
                        one_by_one(py_kissmetrics_one(tracker.host), batch, min_seconds, budget),
                    ),
                    "http.client": counted(
                        tracker, one_by_one(raw_one(tracker.host), batch, min_seconds, budget)
                    ),
                }
                names = list(contenders)
                for name in names:
                    results[size, name] = []
                for r in range(rounds):
                    shift = r % len(names)
                    for name in names[shift:] + names[:shift]:
                        results[size, name].append(contenders[name]())
                if size == max(BATCHES):
                    from django_kissmetrics import client

                    client.close()  # Count the sockets one batch opens, from none.
                    before = Peaks.rss_now()
                    with Peaks() as seen:
                        package_batch(batch)()
                    peaks = {
                        "rss": seen.rss - before,
                        "sockets": seen.sockets,
                        "tasks": seen.tasks,
                    }
    return results, peaks


def main(argv: list[str] | None = None) -> int:
    """Run every latency; 0 when both targets are met, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per batch and contender")
    parser.add_argument(
        "--min-seconds", type=float, default=0.5, help="shortest measurement (a batch repeats)"
    )
    parser.add_argument(
        "--budget", type=float, default=2.0, help="seconds a one-by-one contender sends"
    )
    parser.add_argument(
        "--latencies",
        type=lambda v: tuple(float(x) / 1000 for x in v.split(",")),
        default=LATENCIES,
        help="milliseconds, comma-separated (default 0,10,50,200)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=None, help="DELIVERY_CONCURRENCY (default: the package)"
    )
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {"API_KEY": KEY}
    _common.setup_django(KISSMETRICS=overrides)
    from django.conf import settings

    from django_kissmetrics.conf import DEFAULTS

    concurrency = args.concurrency or DEFAULTS["DELIVERY_CONCURRENCY"]
    # Every override_settings below starts from this dict.
    settings.KISSMETRICS = {"API_KEY": KEY, "DELIVERY_CONCURRENCY": concurrency}
    print("benchmarks/delivery.py: one worker process delivering to a stand-in tracker")
    print(_common.machine())
    print(
        f"DELIVERY_CONCURRENCY {concurrency}; {args.rounds} rounds interleaved, each at least "
        f"{args.min_seconds:g} s; one-by-one contenders cut at {args.budget:g} s "
        "(* = rate from part of the batch, extrapolated)"
    )
    rows: list[list[str]] = []
    memory: list[list[str]] = []
    rate_at_target = loopback_ratio = None
    for latency in args.latencies:
        ms = f"{latency * 1000:g} ms"
        results, peaks = at_latency(latency, args.rounds, args.min_seconds, args.budget)
        for size in BATCHES:
            rates = {
                name: median([s.rate for s in samples])
                for (n, name), samples in results.items()
                if n == size
            }
            for name, rate in rates.items():
                samples = results[size, name]
                cpu = median([s.cpu / s.events for s in samples]) * 1e6
                star = "*" if any(s.part for s in samples) else ""
                rows.append(
                    [
                        f"{ms}, batch {size:,}: {name}",
                        f"{rate:,.0f}{star}",
                        f"{size / rate:,.2f}{star}",
                        f"{cpu:,.0f}",
                        f"{rate / rates['py-KISSmetrics']:,.1f}x",
                        f"{rate / rates['http.client']:,.2f}x",
                    ]
                )
            if size == max(BATCHES):
                if abs(latency - RATE_LATENCY) < 1e-9:
                    rate_at_target = rates["package"]
                if latency == 0:
                    loopback_ratio = rates["package"] / rates["http.client"]
        memory.append(
            [
                f"{ms}, batch {max(BATCHES):,}",
                f"{peaks['rss'] / 2**20:,.1f}",
                str(peaks["sockets"]),
                str(peaks["tasks"]),
            ]
        )
    print()
    header = ["latency, batch: contender", "events/s", "s per batch", "CPU us/event"]
    print(table([*header, "vs py-KM", "vs http.client"], rows))
    print(f"\ndjango-kissmetrics, peaks while delivering one batch of {max(BATCHES):,}:")
    print(table(["latency, batch", "RSS growth, MiB", "open sockets", "asyncio tasks"], memory))
    ok = True
    if rate_at_target is not None:
        verdict = "OK" if rate_at_target >= RATE_TARGET else "MISSED"
        ok = ok and rate_at_target >= RATE_TARGET
        print(
            f"\nat {RATE_LATENCY * 1000:g} ms: {rate_at_target:,.0f} events/s "
            f"(target >= {RATE_TARGET:,.0f}) {verdict}"
        )
    if loopback_ratio is not None:
        verdict = "OK" if loopback_ratio >= LOOPBACK_TARGET else "MISSED"
        ok = ok and loopback_ratio >= LOOPBACK_TARGET
        print(
            f"on loopback: {loopback_ratio:.2f}x the bare http.client loop "
            f"(target >= {LOOPBACK_TARGET}x) {verdict}"
        )
    print(f"\n{'all targets met' if ok else 'TARGET MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
