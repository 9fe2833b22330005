"""Request overhead: a view that calls ``km.record`` once, against the same site without the app.

Two WSGI handlers live in one process, built from the same settings except the
middleware list: both run the full middleware stack Django's ``startproject`` writes
(``--stack minimal`` for Session, CSRF, Authentication and Messages only); the tracked
one adds ``KissmetricsMiddleware`` and its view calls ``km.record`` once; the plain one
has neither. The tracked site uses the ``celery`` backend with a real Redis broker (DB 13
unless ``--redis`` says otherwise): the per-process publisher puts the commands on the
queue off the request thread. Rounds of each are interleaved; a tracked round is timed
until the publisher has flushed, so publishing is charged to it. A third variant runs
the tracked requests with the ``locmem`` backend, to split the added time between the
request path and publishing. The ratio is the median of each round's tracked time over
the plain time of the same round, printed with its middle half: on a shared machine
that spread is the honest error bar.

Two visitors: a returning one (a valid ``km_ai`` cookie: every request after the first)
and a first visit (no cookie: the request that writes it, once per browser).

Afterwards the commands are counted in the Redis queue (every tracked request must have
queued exactly one) and the benchmark's keys are deleted. The timed ratio has no target
of its own: on a view that does nothing, any tracking at all is a large share of the
request. Exits 1 when a queue is wrong. Run: ``python benchmarks/request.py``.

``--peers`` measures posthog-python, segment analytics-python and py-KISSmetrics beside
this package in the same run, and judges the budget against them (see ``peers.py``):
exits 1 when it is missed.

``--instructions`` counts instead of timing: each variant runs in its own process under
valgrind's callgrind, which counts the instructions the process executes, whatever else
the machine is doing. The count is the same from run to run, so it shows a change of a
percent that timing on a noisy machine cannot. Target: a returning visitor on the empty
view at most 1.15x the plain site's instructions; exits 1 when it is missed.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import _common
from _common import interleave, median, table
from _site import (
    ALL_HOOKS,
    STACKS,
    VIEWS,
    VISITORS,
    add_auto_events,
    add_consent_cookie,
    build_site,
    check_queue,
    clean_up,
    environ,
    events_in,
    hooks_label,
    runner,
)

#: ``--instructions``: a returning visitor's instructions on the empty view, over the plain site's.
TARGET = 1.15
#: ``--instructions``: the variants counted; ``--kinds`` picks some.
KINDS = ("plain", "tracked", "locmem")


def tasks_settings(folder: str) -> dict[str, Any]:
    """``--tasks``: django-tasks-db on a SQLite file, the queue of a site without a broker."""
    import django

    backport = ["django_tasks"] if django.VERSION < (6, 0) else []
    return {
        "INSTALLED_APPS": [
            *("django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions"),
            *("django.contrib.messages", "django_kissmetrics", *backport, "django_tasks_db"),
        ],
        "DATABASES": {
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": os.path.join(folder, "site.sqlite3"),
            }
        },
        "TASKS": {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}},
    }


def queued_tasks() -> int:
    """Commands the django-tasks-db queue holds; the queue is emptied."""
    from django_tasks_db.models import DBTaskResult

    count = sum(len(r.args_kwargs["args"][0]) for r in DBTaskResult.objects.all())
    DBTaskResult.objects.all().delete()
    return count


def wall_time(args: argparse.Namespace) -> int:
    """Time the variants in interleaved rounds; 1 when a queue was wrong, else 0."""
    folder = tempfile.mkdtemp(prefix="km-bench-tasks-")
    site = build_site(args, django_settings=tasks_settings(folder) if args.tasks else None)
    if args.tasks:
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
    from django.conf import settings
    from django.core.signals import setting_changed

    from django_kissmetrics import publisher, testing
    from django_kissmetrics.conf import get_settings

    n: int = args.requests
    cpu: dict[str, list[float]] = {}

    def timed_round(name: str, run: Callable[[], None], flush: bool = False) -> Callable[[], float]:
        """Wall time per request of one round; the process's CPU time (all threads) aside."""

        def measure() -> float:
            started, started_cpu = time.perf_counter(), time.process_time()
            run()
            if flush:
                # Until the publisher has put everything on the queue: the broker's cost
                # is charged to the requests that caused it.
                publisher.flush()
            cpu.setdefault(name, []).append((time.process_time() - started_cpu) / n)
            return (time.perf_counter() - started) / n

        return measure

    def use(backend: str) -> None:
        # Not override_settings: while it is active every settings lookup goes through
        # an extra layer, which would slow down each request of the round.
        value = {**site.km_settings, "BACKEND": backend}
        settings.KISSMETRICS = value
        setting_changed.send(sender=type(settings), setting="KISSMETRICS", value=value, enter=True)

    def switched_round(name: str, run: Callable[[], None], backend: str) -> Callable[[], float]:
        """The tracked requests with another backend: ``locmem`` is the request path
        alone; ``tasks`` enqueues on django-tasks-db, flushed like the celery rounds."""
        measure = timed_round(name, run, flush=backend == "tasks")

        def switched() -> float:
            use(backend)
            try:
                seconds = measure()
            finally:
                use("celery")
            sent = queued_tasks() if backend == "tasks" else events_in(testing.outbox)
            if sent != n:
                raise RuntimeError(f"{sent} commands sent through {backend}, expected {n}")
            testing.outbox.clear()
            return seconds

        return switched

    variants: dict[str, Callable[[], float]] = {}
    for label, cookie in VISITORS.items():
        tracked_path, plain_path = VIEWS[args.view]
        tracked_run = runner(site.tracked, environ(tracked_path, cookie, label), n)
        for name, run in (
            (f"{label}|plain", runner(site.plain, environ(plain_path, cookie, label), n)),
            (f"{label}|celery", tracked_run),
        ):
            variants[name] = timed_round(name, run, flush=name.endswith("celery"))
        variants[f"{label}|locmem"] = switched_round(f"{label}|locmem", tracked_run, "locmem")
        if args.tasks:
            variants[f"{label}|tasks"] = switched_round(f"{label}|tasks", tracked_run, "tasks")

    print("benchmarks/request.py: one km.record per request, celery backend, real Redis broker")
    print(_common.machine())
    conf = get_settings()
    print(f"middleware ({args.stack}): {', '.join(m.rsplit('.', 1)[1] for m in site.middleware)}")
    print(hooks_label(args))
    print(f"view: {args.view} ({' against '.join(VIEWS[args.view])})")
    print(f"AUTO_EVENTS: {'every item' if args.auto_events else 'none'}")
    print(
        f"publisher: {conf.PUBLISH}, window {conf.PUBLISH_WINDOW * 1000:g} ms; broker "
        f"{args.redis}, queue {site.queue}; {n} requests per round, {args.rounds} rounds "
        "interleaved"
    )
    try:
        results = interleave(variants, args.rounds)
        publisher.flush()
        # The warm-up round included.
        ok = check_queue(site.client, site.queue, len(VISITORS) * n * (args.rounds + 1))
    finally:
        clean_up(site.client, site.queue)

    def us(seconds: float, sign: bool = False) -> str:
        return f"{seconds * 1e6:+,.0f}" if sign else f"{seconds * 1e6:,.0f}"

    rows, where = [], []
    for label in VISITORS:
        wall = {kind: median(results[f"{label}|{kind}"]) for kind in ("plain", "celery", "locmem")}
        # The first entry is the warm-up round's.
        used = {kind: median(cpu[f"{label}|{kind}"][1:]) for kind in ("plain", "celery", "locmem")}
        # Each round's tracked time against the plain one of the same round: a slow
        # spell of the machine lands on both sides of a ratio instead of on one median.
        paired = [
            t / p
            for t, p in zip(results[f"{label}|celery"], results[f"{label}|plain"], strict=True)
        ]
        ratio = median(paired)
        quartiles = statistics.quantiles(paired, n=4)
        rows.append(
            [
                label,
                us(wall["plain"]),
                us(wall["celery"]),
                us(wall["celery"] - wall["plain"], sign=True),
                f"{ratio:.3f}x",
                f"{quartiles[0]:.3f}-{quartiles[2]:.3f}",
            ]
        )
        where.append(
            [
                label,
                us(wall["locmem"] - wall["plain"], sign=True),
                us(wall["celery"] - wall["locmem"], sign=True),
                us(used["plain"]),
                us(used["celery"]),
                us(used["celery"] - used["plain"], sign=True),
                f"{used['celery'] / used['plain']:.3f}x",
            ]
        )
    print(
        "\nwall time per request (medians of the rounds; ratio: median of each round's "
        "tracked/plain, and its middle half)"
    )
    header = ["visitor", "plain us", "tracked us", "added us", "ratio", "middle half"]
    print(table(header, rows))
    print(
        "\nwhere the added time goes: 'request path' = the tracked requests with the locmem "
        "backend (no broker),\n'publishing' = the rest (the publisher thread's work); and "
        "the process's CPU time per request (all threads)"
    )
    print(
        table(
            [
                "visitor",
                "request path us",
                "publishing us",
                "CPU plain us",
                "CPU tracked us",
                "CPU added us",
                "CPU ratio",
            ],
            where,
        )
    )
    if args.tasks:
        print(
            "\nthe tasks backend beside celery (django-tasks-db on a SQLite file: one INSERT "
            "per message, from the publisher thread)"
        )
        tasks_rows = []
        for label in VISITORS:
            wall = {k: median(results[f"{label}|{k}"]) for k in ("plain", "celery", "tasks")}
            used = {k: median(cpu[f"{label}|{k}"][1:]) for k in ("plain", "celery", "tasks")}
            paired = [
                t / p
                for t, p in zip(results[f"{label}|tasks"], results[f"{label}|plain"], strict=True)
            ]
            tasks_rows.append(
                [
                    label,
                    us(wall["celery"] - wall["plain"], sign=True),
                    us(wall["tasks"] - wall["plain"], sign=True),
                    f"{median(paired):.3f}x",
                    us(used["celery"] - used["plain"], sign=True),
                    us(used["tasks"] - used["plain"], sign=True),
                ]
            )
        header = ["visitor", "celery added us", "tasks added us", "tasks ratio"]
        print(table([*header, "CPU celery added us", "CPU tasks added us"], tasks_rows))
    if not ok:
        print("\nERROR: the queue did not hold exactly one command per tracked request")
    print("\nagainst the peers, in the same run: python benchmarks/request.py --peers")
    return 0 if ok else 1


def child(args: argparse.Namespace) -> int:
    """One variant's requests, run under callgrind by :func:`instructions`.

    The parent reads the queue afterwards: decoding it here would be counted too.
    """
    kind, visitor, rounds = args.child.split(":")
    # Only flush() publishes: one message per round, as in the timed rounds, however
    # slowly the requests run under valgrind.
    backend = "locmem" if kind == "locmem" else "celery"
    site = build_site(args, PUBLISH_WINDOW=3600, CELERY_QUEUE=args.queue, BACKEND=backend)
    from django_kissmetrics import publisher, testing

    label = next(label for label in VISITORS if label.startswith(visitor))
    tracked_path, plain_path = VIEWS[args.view]
    path, handler = (plain_path, site.plain) if kind == "plain" else (tracked_path, site.tracked)
    run = runner(handler, environ(path, VISITORS[label], label), args.requests)

    def one_round() -> None:
        run()
        publisher.flush()
        if kind == "locmem" and events_in(testing.outbox) != args.requests:
            raise RuntimeError(f"{len(testing.outbox)} commands in the outbox")
        testing.outbox.clear()

    one_round()  # Warm-up: imports, caches, the broker connection.
    # What start-up left is set aside from the collector (gc.freeze(), as Python's
    # documentation suggests for a server that forks its workers): a full collection
    # then costs what the requests left behind, not the size of the modules the tracked
    # site imported (Celery's). Without it one such collection, landing in the three-round
    # run and not the one-round run, added 50,000 instructions to every request.
    gc.collect()
    gc.freeze()
    for _ in range(int(rounds)):
        one_round()
    return 0


def instructions(args: argparse.Namespace) -> int:
    """Instructions per request, counted by callgrind; 1 when the target is missed, else 0.

    The count does not move with the machine's load, so a change of one percent shows
    up run after run. Each variant runs twice, with one and with three rounds; the
    difference is what two rounds of requests cost, without start-up and warm-up. The
    target holds for a returning visitor on the empty view; the rest is for reference.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("--instructions needs valgrind (Debian: apt-get install valgrind)")
        return 2
    n: int = args.requests
    print("benchmarks/request.py --instructions: one km.record per request, counted by callgrind")
    print(_common.machine())
    print(f"CONSENT: {'a function reading the banner cookie' if args.consent else 'None'}")
    print(f"AUTO_EVENTS: {'every item' if args.auto_events else 'none'}")
    print(hooks_label(args))
    print(
        f"middleware ({args.stack}), view ({args.view}) and broker as in the timed run; "
        f"{n} requests per round, one Celery message per round"
    )

    import redis

    client = redis.Redis.from_url(args.redis)
    client.ping()
    queue = f"km-bench-request-{os.getpid()}"

    ok, missed = True, False

    def count(kind: str, visitor: str, rounds: int) -> int:
        nonlocal ok
        command = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        command += [sys.executable, __file__, "--child", f"{kind}:{visitor}:{rounds}"]
        command += ["--requests", str(n), "--redis", args.redis, "--stack", args.stack]
        command += ["--view", args.view]
        command += ["--queue", queue, *(["--consent"] if args.consent else [])]
        command += ["--auto-events"] if args.auto_events else []
        command += ["--hooks", args.hooks] if args.hooks else []
        # A fixed hash seed: the same dict and set layouts in every run.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or found is None:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
        try:
            expected = n * (rounds + 1) if kind == "tracked" else 0  # locmem: none queued.
            ok = check_queue(client, queue, expected, quiet=True) and ok
        finally:
            clean_up(client, queue)
        return int(found.group(1))

    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    if not set(kinds) <= set(KINDS):
        print(f"--kinds: each of {','.join(KINDS)}")
        return 2
    rows = []
    for label in VISITORS:
        visitor = label.split()[0]
        if args.visitor and visitor != args.visitor:
            continue
        per = {}
        for kind in kinds:
            per[kind] = (count(kind, visitor, 3) - count(kind, visitor, 1)) / (2 * n)
            # As it comes: under valgrind a run is long, and a partial one still tells.
            print(f"  {label}, {kind}: {per[kind]:,.0f} instructions per request", flush=True)
        if len(per) < len(KINDS):
            continue  # --kinds: the lines above are the result.
        ratio = per["tracked"] / per["plain"]
        judged = label == "returning visitor" and args.view == "empty"
        if judged and ratio > TARGET:
            missed = True
        rows.append(
            [
                label,
                f"{per['plain']:,.0f}",
                f"{per['tracked']:,.0f}",
                f"{per['tracked'] - per['plain']:+,.0f}",
                f"{per['locmem'] - per['plain']:+,.0f}",
                f"{per['tracked'] - per['locmem']:+,.0f}",
                f"{ratio:.3f}x",
                ("OK" if ratio <= TARGET else "MISSED") if judged else "not judged",
            ]
        )
    if not rows:
        return 0 if ok else 1
    print(
        "\ninstructions per request (all threads; 'request path' as in the timed run, "
        "with the locmem backend; 'publishing' the rest)"
    )
    header = ["visitor", "plain", "tracked", "added", "request path", "publishing", "ratio"]
    print(table([*header, f"<= {TARGET}x"], rows))
    if not ok:
        print("\nERROR: a queue did not hold exactly one command per tracked request")
    if args.view == "empty":
        print(f"\n{'TARGET MISSED' if missed else 'target met'} (a returning visitor)")
    return 0 if ok and not missed else 1


def main(argv: list[str] | None = None) -> int:
    """Measure; 0 when the target is met and every command arrived, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per round")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of each variant")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13", help="broker URL")
    parser.add_argument(
        "--stack",
        choices=sorted(STACKS),
        default="startproject",
        help="startproject: Django's default list; minimal: Session, CSRF, Auth, Messages",
    )
    parser.add_argument(
        "--view",
        choices=sorted(VIEWS),
        default="empty",
        help="empty: a view that returns a fixed page (the target's measure); page: one "
        "that renders a template, the tracked one with {%% kissmetrics_js %%}",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per request with valgrind's callgrind instead of timing",
    )
    parser.add_argument(
        "--consent",
        action="store_true",
        help="gate on CONSENT (a function reading a banner's cookie), every visitor agreed",
    )
    parser.add_argument(
        "--tasks",
        action="store_true",
        help="also time the tasks backend (Django Tasks on django-tasks-db, SQLite file)",
    )
    parser.add_argument(
        "--auto-events",
        action="store_true",
        help="AUTO_EVENTS on (every item): the returning visitor is inside a visit, the "
        "first visit arrives from a Google search by a campaign link",
    )
    parser.add_argument(
        "--hooks",
        nargs="?",
        const=ALL_HOOKS,
        metavar="sites,track,before_send",
        help="set SITES (two sites), TRACK (staff and an office range kept out) and "
        "BEFORE_SEND (a hook that keeps each command); or only the ones named",
    )
    parser.add_argument(
        "--visitor",
        choices=["returning", "first"],
        help="--instructions: count this visitor only (default both)",
    )
    parser.add_argument(
        "--kinds",
        metavar="plain,tracked,locmem",
        help="--instructions: count these variants only (default all three), each printed "
        "as it is counted",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument(
        "--peers",
        action="store_true",
        help="measure posthog, segment and py-KISSmetrics beside this package, both views, "
        "one process per variant, and judge the budget against them",
    )
    parser.add_argument(
        "--before",
        metavar="PATH",
        help="with --peers: also measure the package of the checkout at PATH (a git "
        "worktree of an earlier commit), as a variant of its own",
    )
    args = parser.parse_args(argv)
    if args.consent:
        add_consent_cookie()
    if args.auto_events:
        add_auto_events()
    if args.peers:
        import peers

        return peers.compare(args)
    if args.child:
        return child(args)
    if args.instructions:
        return instructions(args)
    return wall_time(args)


if __name__ == "__main__":
    sys.exit(main())
