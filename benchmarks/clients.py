"""HTTP clients for the delivery path: events per second and CPU per event on loopback.

The question this answers: which asynchronous client spends the least CPU per call, since
per-call CPU, not the network, is what bounds one worker process. Against the lean stand-in
tracker in its own process (answering at once, or after ``--latency`` ms), each contender
sends the same ``--events`` GETs, round by round:

- ``http.client``: one keep-alive connection, one call after the other (the floor);
- ``aiohttp``: one ``ClientSession``, ``--concurrency`` coroutines taking the next call;
- ``httpx``: one ``AsyncClient`` (anyio, httpcore), the same coroutines;
- ``django-kissmetrics``: ``KissmetricsClient.send_many`` (aiohttp, as the package uses it).

CPU is this process's, every thread. Needs ``pip install -e ".[bench]"`` for httpx.
Run: ``python benchmarks/clients.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import resource
import sys
import time
from collections.abc import Callable
from urllib.parse import urlencode

import _common
from _common import TrackerProcess, median, table


def cpu_seconds() -> float:
    """CPU time of this process, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def targets(count: int) -> list[str]:
    """``count`` different tracking-API paths with their queries."""
    return [
        "/e?"
        + urlencode(
            [
                ("_k", "bench-key"),
                ("_p", f"visitor-{i}@example.com"),
                ("_n", "Viewed Product"),
                ("_t", "1700000000"),
                ("_d", "1"),
                ("sku", f"SKU-{i % 97}"),
                ("price", "49"),
                ("plan", "pro & more"),
            ]
        )
        for i in range(count)
    ]


def raw(host: str, paths: list[str], concurrency: int) -> None:
    """One ``http.client`` connection, one call after the other."""
    name, port = host.rsplit(":", 1)
    conn = http.client.HTTPConnection(name, int(port), timeout=10)
    for path in paths:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"http.client got {response.status}")
    conn.close()


async def _aiohttp(url: str, paths: list[str], concurrency: int) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as session:
        pending = iter(paths)

        async def work() -> None:
            for path in pending:
                async with session.get(path) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"aiohttp got {response.status}")

        await asyncio.gather(*(work() for _ in range(concurrency)))


async def _httpx(url: str, paths: list[str], concurrency: int) -> None:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits) as session:
        pending = iter(paths)

        async def work() -> None:
            for path in pending:
                response = await session.get(path)
                if response.status_code != 200:
                    raise RuntimeError(f"httpx got {response.status_code}")

        await asyncio.gather(*(work() for _ in range(concurrency)))


def package(url: str, count: int, concurrency: int) -> Callable[[], None]:
    """``KissmetricsClient.send_many`` on the same events, commands made beforehand."""
    from django_kissmetrics.client import KissmetricsClient
    from django_kissmetrics.commands import make_record

    client = KissmetricsClient("bench-key", url=url, concurrency=concurrency)
    commands = [
        make_record(
            f"visitor-{i}@example.com",
            "Viewed Product",
            {"sku": f"SKU-{i % 97}", "price": 49, "plan": "pro & more"},
            1_700_000_000,
        )
        for i in range(count)
    ]

    def run() -> None:
        if client.send_many(commands):
            raise RuntimeError("django-kissmetrics: some calls failed")

    return run


def main(argv: list[str] | None = None) -> int:
    """Measure every contender that is installed; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=3000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64, help="coroutines / connections")
    parser.add_argument("--latency", type=float, default=0.0, help="the tracker's, in ms")
    args = parser.parse_args(argv)

    paths = targets(args.events)
    print("benchmarks/clients.py: HTTP clients against the stand-in tracker")
    print(_common.machine())
    with TrackerProcess("fast", delay=args.latency / 1000) as tracker:
        contenders: dict[str, Callable[[], None]] = {
            "http.client, one connection in sequence": lambda: raw(
                tracker.host, paths, args.concurrency
            ),
            f"aiohttp, {args.concurrency} coroutines": lambda: asyncio.run(
                _aiohttp(tracker.url, paths, args.concurrency)
            ),
            "django-kissmetrics send_many (aiohttp)": package(
                tracker.url, args.events, args.concurrency
            ),
        }
        try:
            import httpx  # noqa: F401
        except ImportError:
            print("(httpx is not installed: pip install -e '.[bench]')")
        else:
            contenders[f"httpx, {args.concurrency} coroutines"] = lambda: asyncio.run(
                _httpx(tracker.url, paths, args.concurrency)
            )
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        cpus: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for r in range(args.rounds + 1):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                tracker.reset()
                cpu, started = cpu_seconds(), time.perf_counter()
                contenders[name]()
                elapsed = time.perf_counter() - started
                spent = cpu_seconds() - cpu
                if tracker.hits() != args.events:
                    raise RuntimeError(f"{name}: the tracker counted {tracker.hits()}")
                if r:  # The first round warms up.
                    rates[name].append(args.events / elapsed)
                    cpus[name].append(spent / args.events * 1e6)
    floor = median(rates[names[0]])
    rows = [
        [
            name,
            f"{median(rates[name]):,.0f}",
            f"{median(cpus[name]):,.0f}",
            f"{median(rates[name]) / floor:.2f}x",
        ]
        for name in names
    ]
    print(
        f"\n{args.events:,} calls per round, {args.rounds} rounds, tracker latency "
        f"{args.latency:g} ms"
    )
    print(table(["client", "events/s", "CPU us/event", "vs http.client"], rows))
    return 0


if __name__ == "__main__":
    _common.setup_django()
    sys.exit(main())
