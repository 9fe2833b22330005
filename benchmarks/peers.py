"""The peers beside this package, in one run: ``python benchmarks/request.py --peers``.

Each variant is a site in a process of its own (two analytics libraries in one process
would share its interpreter lock, its threads and its garbage collector), set up as its
library's documentation shows:

- ``django-kissmetrics``: the middleware and one ``km.record``, the celery backend on a
  real Redis broker, the page with ``{% kissmetrics_js %}``: what ``request.py`` times;
- ``posthog capture``: a posthog-python ``Posthog`` client, ``capture`` in the view;
- ``posthog + middleware``: the same with ``PosthogContextMiddleware``, its Django
  integration, which reads the user and the request for every event's properties;
- ``segment track``: a segment analytics-python ``Client``, ``track`` in the view;
- ``py-KISSmetrics``: ``Client.record`` in the view, which sends before the view returns.

The peers keep no visitor id of their own, so their view does what a site would: it reads
the anonymous id from a cookie and, on a first visit, makes one (``uuid4``) and sets the
cookie, as this package does. Each peer sends to a stand-in of its API on loopback, in a
process of its own, which counts the events that arrive; this package's commands are
counted in the Redis queue.

A variant's process holds two WSGI handlers: the tracked site and the same site with no
analytics (the same middleware stack without the library's). Each round it times both,
for both views and both visitors; a tracked round lasts until the client has sent
everything it queued (``flush()``), so each library's background sending is charged to it
as the publisher's is to this package: the requests by their wall time, the flush by the
CPU time it took (all threads), since a client that waits for a pause before it sends
(segment's) spends nothing while it waits. The parent runs one process's round at a time, in
an order that rotates. The added time is the median over the rounds of tracked minus plain.

With ``--hooks`` this package runs with ``SITES``, ``TRACK`` and ``BEFORE_SEND`` set, and
once more without them in a process of its own, for comparison; the budget is judged on
the one with them.

The budget (with the consent gate and the spool in place): this package's added time at
most half the cheapest peer's for a returning visitor, and 0.6x for a first visit, on both
views. Exits 1 when it is missed or when a variant's events did not all arrive.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import multiprocessing
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import _common
import _site
from _common import median, table
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

#: This package's variant; the others are the peers.
OURS = "django-kissmetrics"
#: With ``--hooks``: this package without them too, in the same run, for comparison.
OURS_WITHOUT_HOOKS = f"{OURS} (no hooks)"
#: Ours over the cheapest peer's added time, by visitor.
BUDGET = {"returning visitor": 0.5, "first visit": 0.6}
EVENT, PROPERTIES = _site.EVENT, _site.PROPERTIES
#: The peers' anonymous id cookie: the same name as ours, so that every variant's
#: returning visitor sends the same request.
COOKIE = "km_ai"
PEER_VIEWS = {"empty": "/peer/", "page": "/peer-page/"}

#: This process's ``send(visitor, event, properties)``, set up by :func:`_build_peer`.
_send: Callable[[str, str, dict[str, Any]], object] | None = None


def _anonymous(request: HttpRequest) -> tuple[str, bool]:
    """The visitor's id from the cookie, or a new one (and whether it is new)."""
    visitor = request.COOKIES.get(COOKIE)
    if visitor:
        return visitor, False
    return uuid.uuid4().hex, True


def _tracked(request: HttpRequest, answer: Callable[[], HttpResponse]) -> HttpResponse:
    assert _send is not None
    visitor, new = _anonymous(request)
    _send(visitor, EVENT, PROPERTIES)
    response = answer()
    if new:
        response.set_cookie(COOKIE, visitor, max_age=5 * 365 * 86400, samesite="Lax")
    return response


def peer_view(request: HttpRequest) -> HttpResponse:
    """The fixed page, recording one event through the peer of this process."""
    return _tracked(request, lambda: HttpResponse(_site.PAGE))


def peer_page(request: HttpRequest) -> HttpResponse:
    """The templated page (the peers' script tag is static HTML), recording one event."""
    return _tracked(request, lambda: render(request, "plain.html", _site.CONTEXT))


#: The peers' URLconf: the plain views, and the tracked ones above.
urlpatterns = [
    *_site.urlpatterns,
    path(PEER_VIEWS["empty"].lstrip("/"), peer_view),
    path(PEER_VIEWS["page"].lstrip("/"), peer_page),
]


class Peer:
    """One peer's client, made as its documentation shows, sending to ``url``."""

    #: The distribution on the registry, and the module it installs.
    distribution: str = ""
    module: str = ""
    #: Middleware the library adds to the stack.
    middleware: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        """The Django settings the library reads."""
        return {}

    def __init__(self, url: str) -> None:
        self.url = url

    def send(self, visitor: str, event: str, properties: dict[str, Any]) -> object:
        """Record one event about ``visitor``."""
        raise NotImplementedError

    def flush(self) -> None:
        """Until everything queued has been sent (nothing to do for a synchronous client)."""


class Posthog(Peer):
    """posthog-python: ``capture`` queues the event, a consumer thread posts batches."""

    distribution, module = "posthog", "posthog"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        from posthog import Posthog as Client

        # No feature flags to poll and no exception autocapture: events only.
        self.client = Client("phc_benchmark", host=url, enable_local_evaluation=False)

    def send(self, visitor: str, event: str, properties: dict[str, Any]) -> object:
        return self.client.capture(event, distinct_id=visitor, properties=properties)

    def flush(self) -> None:
        self.client.flush()


class PosthogMiddleware(Posthog):
    """posthog-python with ``PosthogContextMiddleware``: request properties on each event."""

    middleware = ("posthog.integrations.django.PosthogContextMiddleware",)

    def settings(self) -> dict[str, Any]:
        # The events go through this client; exceptions are not part of the measure.
        return {"POSTHOG_MW_CLIENT": self.client, "POSTHOG_MW_CAPTURE_EXCEPTIONS": False}


class Segment(Peer):
    """segment analytics-python: ``track`` queues the event, a consumer thread posts batches."""

    distribution, module = "segment-analytics-python", "segment.analytics"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        from segment.analytics import Client

        self.client = Client("benchmark-write-key", host=url)

    def send(self, visitor: str, event: str, properties: dict[str, Any]) -> object:
        return self.client.track(anonymous_id=visitor, event=event, properties=properties)

    def flush(self) -> None:
        self.client.flush()


class PyKissmetrics(Peer):
    """py-KISSmetrics 1.1: ``record`` sends one GET before it returns (urllib3, keep-alive)."""

    distribution, module = "py-KISSmetrics", "KISSmetrics"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        from KISSmetrics.client import Client

        self.client = Client(_site.KEY, trk_host=url.split("://", 1)[1], trk_scheme="http")

    def send(self, visitor: str, event: str, properties: dict[str, Any]) -> object:
        return self.client.record(visitor, event, properties)


PEERS: dict[str, type[Peer]] = {
    "posthog capture": Posthog,
    "posthog + middleware": PosthogMiddleware,
    "segment track": Segment,
    "py-KISSmetrics": PyKissmetrics,
}


def measured_cases() -> list[tuple[str, str]]:
    """(view, visitor) of each measured case (``--auto-events`` adds a visitor)."""
    return [(view, visitor) for view in _site.VIEWS for visitor in _site.VISITORS]


class _Variant:
    """A variant's site in this process: its two handlers, a round of each, and a count."""

    def __init__(self, name: str, options: argparse.Namespace) -> None:
        self.name = name
        self.n: int = options.requests
        self.tracker: _common.TrackerProcess | None = None
        self.peer: Peer | None = None
        self.site: _site.Site | None = None
        if name not in PEERS:  # This package, from this checkout or the --before one.
            if name == OURS_WITHOUT_HOOKS:
                options = argparse.Namespace(**{**vars(options), "hooks": None})
            site = self.site = _site.build_site(options)
            tracked, plain = site.tracked, site.plain
            paths = dict(_site.VIEWS)
        else:
            tracked, plain = self._build_peer(name, options)
            paths = {view: (PEER_VIEWS[view], _site.VIEWS[view][1]) for view in _site.VIEWS}
        self.runs: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
        for view, visitor in measured_cases():
            cookie = _site.VISITORS[visitor]
            tracked_path, plain_path = paths[view]
            self.runs[f"{view}|{visitor}"] = (
                _site.runner(tracked, _site.environ(tracked_path, cookie, visitor), self.n),
                _site.runner(plain, _site.environ(plain_path, cookie, visitor), self.n),
            )

    def _build_peer(self, name: str, options: argparse.Namespace) -> tuple[Any, Any]:
        global _send
        # The event's name, as every peer's wire format carries it once per event.
        self.tracker = _common.TrackerProcess("batch", marker=EVENT.split()[0].encode()).start()
        peer = self.peer = PEERS[name](self.tracker.url)
        _send = peer.send
        stack = _site.STACKS[options.stack]
        _common.setup_django(
            ROOT_URLCONF="peers",
            MIDDLEWARE=[*stack, *peer.middleware],
            TEMPLATES=_site.TEMPLATE_SETTINGS,
            # The peers' site does not install this package.
            INSTALLED_APPS=[
                "django.contrib.auth",
                "django.contrib.contenttypes",
                "django.contrib.sessions",
                "django.contrib.messages",
            ],
            **peer.settings(),
        )
        return _site.build_handlers([*stack, *peer.middleware], stack)

    def flush(self) -> None:
        if self.peer is not None:
            self.peer.flush()
        else:
            from django_kissmetrics import publisher

            publisher.flush()

    def round(self, number: int) -> dict[str, tuple[float, float]]:
        """Seconds per request, (tracked, plain), of one round of each case."""
        results = {}
        for case, (tracked, plain) in self.runs.items():

            def timed_tracked(run: Callable[[], None] = tracked) -> float:
                started = time.perf_counter()
                run()
                ended, cpu = time.perf_counter(), time.process_time()
                self.flush()
                # The flush is charged the CPU time it took, not the time it waited:
                # segment's consumer sends a short batch only after a pause in events
                # (its upload_interval, 0.5 s), and that pause costs a site nothing.
                return (ended - started + time.process_time() - cpu) / self.n

            def timed_plain(run: Callable[[], None] = plain) -> float:
                started = time.perf_counter()
                run()
                return (time.perf_counter() - started) / self.n

            # Which of the two goes first alternates, so neither always follows the other.
            if number % 2:
                plain_s = timed_plain()
                tracked_s = timed_tracked()
            else:
                tracked_s = timed_tracked()
                plain_s = timed_plain()
            results[case] = (tracked_s, plain_s)
        return results

    def close(self) -> None:
        """Stop the stand-in and delete this run's Redis keys (again, if already done)."""
        if self.tracker is not None:
            self.tracker.stop()
        if self.site is not None:
            _site.clean_up(self.site.client, self.site.queue)

    def delivered(self, expected: int) -> tuple[int, bool]:
        """How many events arrived, and whether exactly ``expected`` did."""
        self.flush()
        if (site := self.site) is not None:
            good = _site.check_queue(site.client, site.queue, expected, quiet=True)
            count = _site.events_in(_site.queued_commands(site.client, site.queue))
            _site.clean_up(site.client, site.queue)
            return count, good
        assert self.tracker is not None
        # flush() returns once the client has handed its batches over; the last one can
        # still be on its way.
        deadline = time.monotonic() + 10
        while (count := self.tracker.hits()) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        self.tracker.stop()
        return count, count == expected


def _origin(name: str) -> str:
    """What this process measures: the peer's version, or where this package came from."""
    if name in PEERS:
        distribution = PEERS[name].distribution
        return f"{distribution} {importlib.metadata.version(distribution)}"
    import django_kissmetrics

    return f"django_kissmetrics from {Path(django_kissmetrics.__file__).parent.parent}"


def _child(conn: Connection, name: str, options: argparse.Namespace) -> None:
    """A variant's process: build the site, then answer the parent's requests."""
    if options.consent:
        _site.add_consent_cookie()
    if getattr(options, "auto_events", False):
        _site.add_auto_events()
    variant = _Variant(name, options)
    try:
        variant.round(0)  # Warm-up: imports, caches, connections.
        # What start-up left is set aside from the collector, as request.py does.
        gc.collect()
        gc.freeze()
        conn.send(("ready", _origin(name)))
        while True:
            try:
                message, number = conn.recv()
            except EOFError:  # The parent gave up: stop at once.
                return
            if message == "round":
                conn.send(variant.round(number))
            else:
                conn.send(variant.delivered(number))
                return
    finally:
        variant.close()


@contextlib.contextmanager
def _variants(
    names: list[str], options: argparse.Namespace, checkouts: dict[str, str]
) -> Iterator[dict[str, Connection]]:
    """One process per variant, started one after the other (each warms up alone).

    A variant in ``checkouts`` imports the package from that folder: a spawned process
    starts with the sys.path its parent had when it was started.
    """
    context = multiprocessing.get_context("spawn")
    processes, conns = [], {}
    try:
        for name in names:
            parent, child = context.Pipe()
            process = context.Process(target=_child, args=(child, name, options))
            checkout = checkouts.get(name)
            if checkout is not None:
                sys.path.insert(0, checkout)
            try:
                process.start()
            finally:
                if checkout is not None:
                    sys.path.remove(checkout)
            processes.append(process)
            conns[name] = parent
            try:
                if not parent.poll(120):
                    raise RuntimeError(f"{name}: the process did not start in 120 s")
                _ready, origin = parent.recv()
            except EOFError:
                raise RuntimeError(
                    f"{name}: the process ended while starting (see above)"
                ) from None
            print(f"  {name}: {origin}")
        yield conns
    finally:
        # Closed first, so that a child still waiting for a round sees the end and exits.
        for conn in conns.values():
            conn.close()
        for process in processes:
            process.join(15)
            if process.is_alive():
                process.terminate()


def compare(options: argparse.Namespace) -> int:
    """Measure every variant; 0 when the budget is met and every event arrived, else 1."""
    missing = []
    for module, distribution in {p.module: p.distribution for p in PEERS.values()}.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    if missing:
        print(f"--peers needs {', '.join(missing)}: pip install -e '.[bench]'")
        return 2
    checkouts = {}
    if options.before:
        before = Path(options.before).resolve()
        if not (before / "django_kissmetrics" / "__init__.py").is_file():
            print(f"--before {before}: no django_kissmetrics package there")
            return 2
        checkouts[f"{OURS} ({before.name})"] = str(before)
    variants = [OURS, *([OURS_WITHOUT_HOOKS] if options.hooks else []), *checkouts]
    names = [*variants, *PEERS]
    n, rounds = options.requests, options.rounds
    print("benchmarks/request.py --peers: one event per request, each library in its own process")
    print(_common.machine())
    print(
        f"middleware ({options.stack}); {n} requests per round and case, {rounds} rounds; "
        f"CONSENT: {'a function reading the banner cookie' if options.consent else 'None'}; "
        f"AUTO_EVENTS: {', '.join(_site.AUTO_EVENTS) if options.auto_events else 'none'}"
    )
    if options.auto_events:
        print(
            "  (ours records them: a returning visitor is inside a visit, a first visit records "
            "Visited Site, a campaign first visit from a Google search all four)"
        )
    print(_site.hooks_label(options))
    added: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    delivered: dict[str, tuple[int, bool]] = {}
    with _variants(names, options, checkouts) as conns:
        for number in range(1, rounds + 1):
            shift = number % len(names)
            for name in names[shift:] + names[:shift]:
                conns[name].send(("round", number))
                for case, (tracked, plain) in conns[name].recv().items():
                    added[name].setdefault(case, []).append(tracked - plain)
        expected = (rounds + 1) * len(measured_cases()) * n  # The warm-up round included.
        for name in names:
            conns[name].send(("done", expected))
            delivered[name] = conns[name].recv()

    cases = [f"{view}|{visitor}" for view, visitor in measured_cases()]

    def cell(values: list[float]) -> str:
        if len(values) < 2:
            return f"{median(values) * 1e6:+,.0f}"
        low, _, high = (q * 1e6 for q in statistics.quantiles(values, n=4))
        return f"{median(values) * 1e6:+,.0f} ({low:+,.0f} to {high:+,.0f})"

    rows = [
        [name, *(cell(added[name][case]) for case in cases), f"{delivered[name][0]:,}"]
        for name in names
    ]
    print(
        "\nadded per request, us: median over the rounds of tracked minus plain (middle half); "
        f"events that arrived, of {expected:,}"
    )
    header = ["variant", *(case.replace("|", ", ") for case in cases), "arrived"]
    print(table(header, rows))

    ok = all(good for _count, good in delivered.values())
    verdicts = []
    for case in cases:
        ours = median(added[OURS][case])
        cheapest = min(PEERS, key=lambda name: median(added[name][case]))
        limit = BUDGET.get(case.split("|")[1])
        floor = median(added[cheapest][case])
        # A peer that seems to cost nothing or less is noise, not a measure: no verdict.
        ratio = ours / floor if floor > 0 else float("nan")
        if limit is None:  # --auto-events' campaign visit: reported, not judged.
            verdicts.append([case.replace("|", ", "), cheapest, f"{ratio:.2f}x", "", "not judged"])
            continue
        met = ratio <= limit
        ok = ok and met
        verdict = "OK" if met else ("MISSED" if floor > 0 else "INCONCLUSIVE")
        verdicts.append(
            [case.replace("|", ", "), cheapest, f"{ratio:.2f}x", f"<= {limit}x", verdict]
        )
    print("\nthe budget: ours over the cheapest peer's added time")
    print(table(["case", "cheapest peer", "ours", "budget", ""], verdicts))
    for name, (count, good) in delivered.items():
        if not good:
            print(f"ERROR: {name}: {count:,} events arrived, expected {expected:,}")
    for name in variants[1:]:
        print(
            f"{name}: "
            + ", ".join(
                f"{case.replace('|', ', ')} {median(added[name][case]) * 1e6:+,.0f} us"
                for case in cases
            )
            + " (for comparison; the budget is this checkout's)"
        )
    print(f"\n{'budget met' if ok else 'BUDGET MISSED'}")
    return 0 if ok else 1
