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
queued exactly one) and the benchmark's keys are deleted. Target: tracked <= 1.15x plain.
Exits 1 when the target is missed. Run: ``python benchmarks/request.py``.

``--instructions`` counts instead of timing: each variant runs in its own process under
valgrind's callgrind, which counts the instructions the process executes, whatever else
the machine is doing. The count is the same from run to run, so it shows a change of a
percent that timing on a noisy machine cannot. Instructions are not time (a syscall or a
cache miss costs more than its count), so the timed run stays the measure of the target.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import gc
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import _common
from _common import interleave, median, table
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from django_kissmetrics import km
from django_kissmetrics.commands import Command
from django_kissmetrics.identity import encode_cookie

TARGET = 1.15
KEY = "bench-key"
#: A visitor who has been here before: a valid anonymous id (in ``km_ai``, percent-encoded).
RETURNING_ID = "q1W2e3R4t5Y6u7I8o9P0aSdFgHk="
#: The middleware both sites run; the tracked one adds KissmetricsMiddleware at the end.
STACKS = {
    "minimal": [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
    ],
    # What `django-admin startproject` writes.
    "startproject": [
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
    ],
}
PAGE = "<!doctype html><title>Pricing</title><h1>Pricing</h1>" + "<p>Plans and prices.</p>" * 20
#: ``--view page``: a page rendered from a template, as most views answer.
TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }} | Shop</title>
{% block head %}{% endblock %}</head>
<body><nav>{% for link in links %}<a href="{{ link.url }}">{{ link.label }}</a>{% endfor %}</nav>
<main><h1>{{ title }}</h1>
{% for plan in plans %}<section><h2>{{ plan.name|title }}</h2>
<p>{{ plan.price|floatformat:2 }} a month</p>
<ul>{% for feature in plan.features %}<li>{{ feature }}</li>{% endfor %}</ul></section>
{% endfor %}</main></body></html>"""
TEMPLATES = {
    "plain.html": TEMPLATE,
    # The tracked page also has the tag, as the README asks a site to put in its base.
    "tracked.html": TEMPLATE.replace(
        "{% block head %}{% endblock %}", "{% load kissmetrics %}{% kissmetrics_js %}"
    ),
}
CONTEXT = {
    "title": "Pricing",
    "links": [{"url": f"/{name}/", "label": name.title()} for name in ("home", "pricing", "help")],
    "plans": [
        {"name": name, "price": price, "features": [f"Feature {i}" for i in range(8)]}
        for name, price in (("basic", 9), ("pro", 29), ("team", 99))
    ],
}


def tracked_view(request: HttpRequest) -> HttpResponse:
    """The page, recording one event about the current visitor."""
    km.record("Viewed Pricing", {"plan": "pro", "source": "benchmark"})
    return HttpResponse(PAGE)


def plain_view(request: HttpRequest) -> HttpResponse:
    """The same page without tracking."""
    return HttpResponse(PAGE)


def tracked_page(request: HttpRequest) -> HttpResponse:
    """The templated page, recording one event; its template has the tag."""
    km.record("Viewed Pricing", {"plan": "pro", "source": "benchmark"})
    return render(request, "tracked.html", CONTEXT)


def plain_page(request: HttpRequest) -> HttpResponse:
    """The same templated page, without tracking or the tag."""
    return render(request, "plain.html", CONTEXT)


#: ``--view``: (tracked path, plain path).
VIEWS = {"empty": ("/tracked/", "/plain/"), "page": ("/tracked-page/", "/plain-page/")}
#: This module is the URLconf (``ROOT_URLCONF = "__main__"``).
urlpatterns = [
    path("tracked/", tracked_view),
    path("plain/", plain_view),
    path("tracked-page/", tracked_page),
    path("plain-page/", plain_page),
]


def environ(path: str, cookie: str | None) -> dict[str, Any]:
    """A browser's GET as a WSGI server hands it over."""
    env: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "www.shop.test",
        "SERVER_PORT": "443",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "203.0.113.7",
        "HTTP_HOST": "www.shop.test",
        "HTTP_USER_AGENT": (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/126.0 Safari/537.36"
        ),
        "HTTP_ACCEPT": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "HTTP_ACCEPT_LANGUAGE": "en-GB,en;q=0.9",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if cookie is not None:
        env["HTTP_COOKIE"] = cookie
    return env


def runner(handler: Any, env: dict[str, Any], count: int) -> Callable[[], None]:
    """Serve ``count`` requests through ``handler`` as a WSGI server would."""
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)
        return None

    def run() -> None:
        statuses.clear()
        for _ in range(count):
            request_env = dict(env)
            request_env["wsgi.input"] = io.BytesIO(b"")
            response = handler(request_env, start_response)
            b"".join(response)
            response.close()  # request_finished, as the server would.
        if statuses.count("200 OK") != count:
            raise RuntimeError(f"unexpected answers: {sorted(set(statuses))}")

    return run


def build_handlers(tracked_middleware: list[str], plain_middleware: list[str]) -> tuple[Any, Any]:
    """The tracked and the plain WSGI handlers (middleware is read when one is built)."""
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    with override_settings(MIDDLEWARE=tracked_middleware):
        tracked = WSGIHandler()
    with override_settings(MIDDLEWARE=plain_middleware):
        plain = WSGIHandler()
    return tracked, plain


def queued_commands(client: Any, queue: str) -> list[Command]:
    """The commands in the Celery messages waiting in ``queue``."""
    commands: list[Command] = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, _kwargs, _embed = json.loads(body)
        commands.extend(Command.from_wire(c) for c in args[0])
    return commands


def clean_up(client: Any, queue: str) -> None:
    """Delete this run's queue and bindings from the Redis database."""
    for key in client.scan_iter(match=f"*{queue}*"):
        client.delete(key)
    for key in client.scan_iter(match="_kombu.binding*"):
        if client.type(key) == b"zset":
            for member in client.zrange(key, 0, -1):
                if queue.encode() in member:
                    client.zrem(key, member)


VISITORS = {
    "returning visitor": f"km_ai={encode_cookie(RETURNING_ID)}",
    "first visit": None,
}
#: ``--consent``: the cookie a consent banner set, and the ``CONSENT`` function reading it.
CONSENT_COOKIE = "analytics_consent=yes"


def banner_consent(request: HttpRequest) -> bool:
    """``CONSENT`` for ``--consent``: the visitor agreed in the banner."""
    return request.COOKIES.get("analytics_consent") == "yes"


@dataclasses.dataclass
class Site:
    """The two handlers and the broker the tracked one publishes to."""

    tracked: Any
    plain: Any
    km_settings: dict[str, Any]
    middleware: list[str]
    client: Any
    queue: str


def build_site(args: argparse.Namespace, **km_overrides: Any) -> Site:
    """Configure Django, a Celery app on the Redis broker, and the two handlers."""
    queue = km_overrides.get("CELERY_QUEUE", f"km-bench-request-{os.getpid()}")
    base_middleware = STACKS[args.stack]
    tracked_middleware = [*base_middleware, "django_kissmetrics.middleware.KissmetricsMiddleware"]
    km_settings = {
        "API_KEY": KEY,
        "BACKEND": "celery",
        "CELERY_QUEUE": queue,
        # Never contacted: no worker consumes the queue.
        "TRACKING_URL": "http://127.0.0.1:9",
        **({"CONSENT": "__main__.banner_consent"} if args.consent else {}),
        **km_overrides,
    }
    _common.setup_django(
        ROOT_URLCONF="__main__",
        MIDDLEWARE=tracked_middleware,
        KISSMETRICS=km_settings,
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "OPTIONS": {
                    # Cached, as Django's default loaders are when DEBUG is off.
                    "loaders": [
                        (
                            "django.template.loaders.cached.Loader",
                            [("django.template.loaders.locmem.Loader", TEMPLATES)],
                        )
                    ],
                    "context_processors": ["django.template.context_processors.request"],
                },
            }
        ],
    )
    import redis
    from celery import Celery

    app = Celery("benchmark", broker=args.redis)
    app.conf.task_ignore_result = True
    app.set_default()
    app.set_current()
    client = redis.Redis.from_url(args.redis)
    client.ping()
    clean_up(client, queue)
    tracked, plain = build_handlers(tracked_middleware, base_middleware)
    return Site(tracked, plain, km_settings, tracked_middleware, client, queue)


def check_queue(client: Any, queue: str, expected: int, *, quiet: bool = False) -> bool:
    """Whether ``queue`` holds exactly ``expected`` commands, one per tracked request."""
    commands = queued_commands(client, queue)
    messages = client.llen(queue)
    good = [c for c in commands if c.kind == "record" and c.name == "Viewed Pricing"]
    if not quiet:
        print(
            f"\nqueued: {len(good)} commands in {messages} Celery messages for {expected} "
            f"tracked requests ({len(good) / max(messages, 1):.0f} commands per message); "
            "queue deleted"
        )
    if len(good) != expected or len(commands) != len(good):
        print(f"ERROR: {queue} holds {len(commands)} commands, expected {expected}")
        return False
    return True


def wall_time(args: argparse.Namespace) -> int:
    """Time the variants in interleaved rounds; 0 when the target is met, else 1."""
    site = build_site(args)
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

    def locmem_round(name: str, run: Callable[[], None]) -> Callable[[], float]:
        """The tracked requests with the locmem backend: the request path alone."""
        measure = timed_round(name, run)

        def switched() -> float:
            use("locmem")
            try:
                seconds = measure()
            finally:
                use("celery")
            if len(testing.outbox) != n:
                raise RuntimeError(f"{len(testing.outbox)} commands in the outbox, expected {n}")
            testing.outbox.clear()
            return seconds

        return switched

    variants: dict[str, Callable[[], float]] = {}
    for label, cookie in VISITORS.items():
        tracked_path, plain_path = VIEWS[args.view]
        tracked_run = runner(site.tracked, environ(tracked_path, cookie), n)
        for name, run in (
            (f"{label}|plain", runner(site.plain, environ(plain_path, cookie), n)),
            (f"{label}|celery", tracked_run),
        ):
            variants[name] = timed_round(name, run, flush=name.endswith("celery"))
        variants[f"{label}|locmem"] = locmem_round(f"{label}|locmem", tracked_run)

    print("benchmarks/request.py: one km.record per request, celery backend, real Redis broker")
    print(_common.machine())
    conf = get_settings()
    print(f"middleware ({args.stack}): {', '.join(m.rsplit('.', 1)[1] for m in site.middleware)}")
    print(f"view: {args.view} ({' against '.join(VIEWS[args.view])})")
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
        met = ratio <= TARGET
        ok = ok and met
        rows.append(
            [
                label,
                us(wall["plain"]),
                us(wall["celery"]),
                us(wall["celery"] - wall["plain"], sign=True),
                f"{ratio:.3f}x",
                f"{quartiles[0]:.3f}-{quartiles[2]:.3f}",
                "OK" if met else "MISSED",
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
    print(table([*header, f"<= {TARGET}x"], rows))
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
    print(f"\n{'target met' if ok else 'TARGET MISSED'}")
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
    run = runner(handler, environ(path, VISITORS[label]), args.requests)

    def one_round() -> None:
        run()
        publisher.flush()
        if kind == "locmem" and len(testing.outbox) != args.requests:
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
    """Instructions per request, counted by callgrind; 1 when a queue was wrong, else 0.

    The count does not move with the machine's load, so a change of one percent shows
    up run after run. Each variant runs twice, with one and with three rounds; the
    difference is what two rounds of requests cost, without start-up and warm-up. The
    ratio is printed against the target for reference: the timed run judges it.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("--instructions needs valgrind (Debian: apt-get install valgrind)")
        return 2
    n: int = args.requests
    print("benchmarks/request.py --instructions: one km.record per request, counted by callgrind")
    print(_common.machine())
    print(f"CONSENT: {'a function reading the banner cookie' if args.consent else 'None'}")
    print(
        f"middleware ({args.stack}), view ({args.view}) and broker as in the timed run; "
        f"{n} requests per round, one Celery message per round"
    )

    import redis

    client = redis.Redis.from_url(args.redis)
    client.ping()
    queue = f"km-bench-request-{os.getpid()}"

    ok = True

    def count(kind: str, visitor: str, rounds: int) -> int:
        nonlocal ok
        command = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        command += [sys.executable, __file__, "--child", f"{kind}:{visitor}:{rounds}"]
        command += ["--requests", str(n), "--redis", args.redis, "--stack", args.stack]
        command += ["--view", args.view]
        command += ["--queue", queue, *(["--consent"] if args.consent else [])]
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

    rows = []
    for label in VISITORS:
        visitor = label.split()[0]
        per = {
            kind: (count(kind, visitor, 3) - count(kind, visitor, 1)) / (2 * n)
            for kind in ("plain", "tracked", "locmem")
        }
        ratio = per["tracked"] / per["plain"]
        rows.append(
            [
                label,
                f"{per['plain']:,.0f}",
                f"{per['tracked']:,.0f}",
                f"{per['tracked'] - per['plain']:+,.0f}",
                f"{per['locmem'] - per['plain']:+,.0f}",
                f"{per['tracked'] - per['locmem']:+,.0f}",
                f"{ratio:.3f}x",
                "yes" if ratio <= TARGET else "no",
            ]
        )
    print(
        "\ninstructions per request (all threads; 'request path' as in the timed run, "
        "with the locmem backend; 'publishing' the rest)"
    )
    header = ["visitor", "plain", "tracked", "added", "request path", "publishing", "ratio"]
    print(table([*header, f"<= {TARGET}x"], rows))
    if not ok:
        print("\nERROR: a queue did not hold exactly one command per tracked request")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Measure; 0 when the target is met, else 1."""
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.consent:  # Both sites get the banner's cookie; only the tracked one reads it.
        for label, cookie in VISITORS.items():
            VISITORS[label] = "; ".join(c for c in (cookie, CONSENT_COOKIE) if c)
    if args.child:
        return child(args)
    if args.instructions:
        return instructions(args)
    return wall_time(args)


if __name__ == "__main__":
    sys.exit(main())
