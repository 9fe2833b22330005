"""Delivery speed: the package's Celery delivery path against py-KISSmetrics and raw http.client.

Two scenarios, each against a stand-in tracker in its own process on loopback:

1. Throughput (a lean server that answers at once): events per second of the path a
   Celery worker runs (``tasks.deliver`` on batches of ``MAX_BATCH`` commands, with the
   configured ``DELIVERY_CONCURRENCY``), of the client sending one command at a time, of
   py-KISSmetrics' ``Client`` in a loop and of a raw ``http.client`` keep-alive loop,
   interleaved round by round. Target: the delivery path >= 1.0x py-KISSmetrics.
2. Latency (the package's threaded ``StandInTracker`` answering after 50 ms): one batch
   of 500 commands through the delivery path against py-KISSmetrics sending them one
   after the other. Target: >= 10x faster. With ``DELIVERY_CONCURRENCY`` calls in flight
   the speed-up cannot exceed that number: the target needs a concurrency of 11 or more.

Exits 1 when a target is missed. Run: ``python benchmarks/delivery.py``.
"""

from __future__ import annotations

import argparse
import http.client
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import _common
from _common import TrackerProcess, interleave, median, table, timed

KEY = "bench-key"
TIMESTAMP = 1_700_000_000
THROUGHPUT_TARGET = 1.0
LATENCY_TARGET = 10.0
LATENCY = 0.05
LATENCY_BATCH = 500


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


def package_path(batch: list[dict[str, Any]]) -> Callable[[], None]:
    """The worker's path: the task body on messages of ``MAX_BATCH`` commands each."""
    from django_kissmetrics import tasks
    from django_kissmetrics.commands import make_record
    from django_kissmetrics.publisher import MAX_BATCH

    # What a message carries: commands made (and time-stamped) in the request.
    messages = [
        [
            make_record(e["person"], e["event"], e["properties"], TIMESTAMP).to_wire()
            for e in batch[start : start + MAX_BATCH]
        ]
        for start in range(0, len(batch), MAX_BATCH)
    ]

    def run() -> None:
        for message in messages:
            delivered = tasks.deliver(message)
            if delivered != len(message):
                raise RuntimeError(f"only {delivered} of {len(message)} delivered")

    return run


def package_client_loop(url: str, batch: list[dict[str, Any]]) -> Callable[[], None]:
    """``KissmetricsClient.record`` in a loop: the client's cost per call, nothing else."""
    from django_kissmetrics.client import KissmetricsClient

    client = KissmetricsClient(KEY, url=url)

    def run() -> None:
        for e in batch:
            client.record(e["person"], e["event"], e["properties"], TIMESTAMP)

    return run


def py_kissmetrics_loop(host: str, batch: list[dict[str, Any]]) -> Callable[[], None]:
    """py-KISSmetrics 1.1: ``Client.record`` in a loop (urllib3 pool, keep-alive)."""
    from KISSmetrics.client import Client

    client = Client(KEY, trk_host=host, trk_scheme="http")

    def run() -> None:
        for e in batch:
            response = client.record(e["person"], e["event"], e["properties"], TIMESTAMP)
            if response.status != 200:
                raise RuntimeError(f"py-KISSmetrics got {response.status}")

    return run


def raw_loop(host: str, batch: list[dict[str, Any]]) -> Callable[[], None]:
    """The floor: ``http.client`` on one keep-alive connection, the query built per call."""
    name, port = host.rsplit(":", 1)
    conn = http.client.HTTPConnection(name, int(port), timeout=5)

    def run() -> None:
        for e in batch:
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

    return run


def _overlap_after() -> float:
    from django_kissmetrics import client

    return float(getattr(client, "OVERLAP_AFTER", 0.0))


def settings_for(tracker: TrackerProcess, concurrency: int | None) -> dict[str, Any]:
    """``KISSMETRICS`` pointing at ``tracker``; the package's default concurrency unless given."""
    conf: dict[str, Any] = {"API_KEY": KEY, "TRACKING_URL": tracker.url}
    if concurrency is not None:
        conf["DELIVERY_CONCURRENCY"] = concurrency
    return conf


def checked(tracker: TrackerProcess, run: Callable[[], None], expected: int) -> Callable[[], float]:
    """Time ``run`` and make sure the tracker received exactly ``expected`` requests."""

    def measure() -> float:
        tracker.reset()
        seconds = timed(run)
        hits = tracker.hits()
        if hits != expected:
            raise RuntimeError(f"the tracker received {hits} requests, expected {expected}")
        return seconds

    return measure


def throughput(count: int, rounds: int, concurrency: int | None) -> float:
    """Scenario 1; returns the delivery path's ratio to py-KISSmetrics."""
    from django.test import override_settings

    from django_kissmetrics.conf import get_settings

    batch = events(count)
    with TrackerProcess("fast") as tracker:
        override = override_settings(KISSMETRICS=settings_for(tracker, concurrency))
        with override:
            concurrency = get_settings().DELIVERY_CONCURRENCY
            contenders = {
                f"django-kissmetrics delivery (tasks.deliver, concurrency {concurrency})": (
                    package_path(batch)
                ),
                "django-kissmetrics KissmetricsClient.record loop": package_client_loop(
                    tracker.url, batch
                ),
                "py-KISSmetrics Client.record loop": py_kissmetrics_loop(tracker.host, batch),
                "raw http.client keep-alive loop": raw_loop(tracker.host, batch),
            }
            results = interleave(
                {name: checked(tracker, run, count) for name, run in contenders.items()}, rounds
            )
    rates = {name: count / median(seconds) for name, seconds in results.items()}
    names = list(rates)
    package, reference = rates[names[0]], rates[names[2]]
    print(
        f"\n1. Throughput: {count} events per round, {rounds} rounds interleaved, "
        "stand-in tracker answering at once (own process)"
    )
    rows = [
        [
            name,
            f"{rate:,.0f}",
            f"{count / max(results[name]):,.0f}-{count / min(results[name]):,.0f}",
            f"{rate / reference:.2f}x",
            f"{rate / rates[names[3]]:.2f}x",
        ]
        for name, rate in rates.items()
    ]
    print(table(["contender", "events/s (median)", "range", "vs py-KM", "vs raw"], rows))
    print(
        "(a loopback call costs about as much CPU as it waits: the delivery path sends from one "
        "thread until calls average over client.OVERLAP_AFTER, "
        f"{_overlap_after() * 1000:g} ms)"
    )
    ratio = package / reference
    verdict = "OK" if ratio >= THROUGHPUT_TARGET else "MISSED"
    print(
        f"delivery path vs py-KISSmetrics: {ratio:.2f}x (target >= {THROUGHPUT_TARGET}x) {verdict}"
    )
    return ratio


def latency(sequential: int, rounds: int, concurrency: int | None) -> float:
    """Scenario 2; returns the delivery path's speed-up over py-KISSmetrics in sequence."""
    from django.test import override_settings

    from django_kissmetrics.conf import get_settings

    with TrackerProcess("stand-in", delay=LATENCY) as tracker:
        override = override_settings(KISSMETRICS=settings_for(tracker, concurrency))
        with override:
            concurrency = get_settings().DELIVERY_CONCURRENCY
            # py-KISSmetrics has no concurrency: its time is linear in the batch, so a
            # part of the batch is timed and scaled (the whole would take ~25 s a round).
            contenders = {
                "package": checked(tracker, package_path(events(LATENCY_BATCH)), LATENCY_BATCH),
                "py-KISSmetrics": checked(
                    tracker, py_kissmetrics_loop(tracker.host, events(sequential)), sequential
                ),
            }
            results = interleave(contenders, rounds, warmup=False)
    package = median(results["package"])
    reference = median(results["py-KISSmetrics"]) * LATENCY_BATCH / sequential
    print(
        f"\n2. Latency: a batch of {LATENCY_BATCH} commands, stand-in tracker answering after "
        f"{LATENCY * 1000:.0f} ms (threaded, own process), {rounds} rounds interleaved"
    )
    rows = [
        [
            f"django-kissmetrics delivery (tasks.deliver, concurrency {concurrency})",
            f"{package:.2f}",
            f"{LATENCY_BATCH / package:,.0f}",
            f"{reference / package:.2f}x",
        ],
        [
            f"py-KISSmetrics Client.record loop ({sequential} timed, scaled x"
            f"{LATENCY_BATCH / sequential:g})",
            f"{reference:.2f}",
            f"{LATENCY_BATCH / reference:,.0f}",
            "1.00x",
        ],
    ]
    print(table(["contender", "seconds per batch (median)", "events/s", "vs py-KM"], rows))
    ratio = reference / package
    verdict = "OK" if ratio >= LATENCY_TARGET else "MISSED"
    print(
        f"delivery path vs py-KISSmetrics in sequence: {ratio:.2f}x faster "
        f"(target >= {LATENCY_TARGET:g}x) {verdict}"
    )
    return ratio


def main(argv: list[str] | None = None) -> int:
    """Run both scenarios; 0 when both targets are met, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=500, help="events per throughput round")
    parser.add_argument("--rounds", type=int, default=21, help="throughput rounds")
    parser.add_argument("--latency-rounds", type=int, default=3, help="latency rounds")
    parser.add_argument(
        "--sequential", type=int, default=50, help="py-KISSmetrics calls timed per latency round"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="DELIVERY_CONCURRENCY to use (default: the package's default)",
    )
    args = parser.parse_args(argv)

    _common.setup_django(KISSMETRICS={"API_KEY": KEY})
    print("benchmarks/delivery.py: delivering commands to a stand-in tracker on loopback")
    print(_common.machine())
    ok = throughput(args.events, args.rounds, args.concurrency) >= THROUGHPUT_TARGET
    ok = latency(args.sequential, args.latency_rounds, args.concurrency) >= LATENCY_TARGET and ok
    print(f"\n{'all targets met' if ok else 'TARGET MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
