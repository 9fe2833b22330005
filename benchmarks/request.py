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
request path and publishing.

Two visitors: a returning one (a valid ``km_ai`` cookie: every request after the first)
and a first visit (no cookie: the request that writes it, once per browser).

Afterwards the commands are counted in the Redis queue (every tracked request must have
queued exactly one) and the benchmark's keys are deleted. Target: tracked <= 1.15x plain.
Exits 1 when the target is missed. Run: ``python benchmarks/request.py``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import _common
from _common import interleave, median, table
from django.http import HttpRequest, HttpResponse
from django.urls import path

from django_kissmetrics import km
from django_kissmetrics.commands import Command

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


def tracked_view(request: HttpRequest) -> HttpResponse:
    """The page, recording one event about the current visitor."""
    km.record("Viewed Pricing", {"plan": "pro", "source": "benchmark"})
    return HttpResponse(PAGE)


def plain_view(request: HttpRequest) -> HttpResponse:
    """The same page without tracking."""
    return HttpResponse(PAGE)


#: This module is the URLconf (``ROOT_URLCONF = "__main__"``).
urlpatterns = [path("tracked/", tracked_view), path("plain/", plain_view)]


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
    args = parser.parse_args(argv)

    queue = f"km-bench-request-{os.getpid()}"
    base_middleware = STACKS[args.stack]
    tracked_middleware = [*base_middleware, "django_kissmetrics.middleware.KissmetricsMiddleware"]
    km_settings = {
        "API_KEY": KEY,
        "BACKEND": "celery",
        "CELERY_QUEUE": queue,
        # Never contacted: no worker consumes the queue.
        "TRACKING_URL": "http://127.0.0.1:9",
    }
    _common.setup_django(
        ROOT_URLCONF="__main__", MIDDLEWARE=tracked_middleware, KISSMETRICS=km_settings
    )
    import redis
    from celery import Celery
    from django.conf import settings
    from django.core.signals import setting_changed

    from django_kissmetrics import publisher, testing
    from django_kissmetrics.conf import get_settings
    from django_kissmetrics.identity import encode_cookie

    app = Celery("benchmark", broker=args.redis)
    app.conf.task_ignore_result = True
    app.set_default()
    app.set_current()
    client = redis.Redis.from_url(args.redis)
    client.ping()
    clean_up(client, queue)

    tracked, plain = build_handlers(tracked_middleware, base_middleware)
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
        value = {**km_settings, "BACKEND": backend}
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

    visitors = {
        "returning visitor": f"km_ai={encode_cookie(RETURNING_ID)}",
        "first visit": None,
    }
    variants: dict[str, Callable[[], float]] = {}
    for label, cookie in visitors.items():
        tracked_run = runner(tracked, environ("/tracked/", cookie), n)
        for name, run in (
            (f"{label}|plain", runner(plain, environ("/plain/", cookie), n)),
            (f"{label}|celery", tracked_run),
        ):
            variants[name] = timed_round(name, run, flush=name.endswith("celery"))
        variants[f"{label}|locmem"] = locmem_round(f"{label}|locmem", tracked_run)

    print("benchmarks/request.py: one km.record per request, celery backend, real Redis broker")
    print(_common.machine())
    conf = get_settings()
    print(
        f"middleware ({args.stack}): {', '.join(m.rsplit('.', 1)[1] for m in tracked_middleware)}"
    )
    print(
        f"publisher: {conf.PUBLISH}, window {conf.PUBLISH_WINDOW * 1000:g} ms; broker "
        f"{args.redis}, queue {queue}; {n} requests per round, {args.rounds} rounds interleaved"
    )
    try:
        results = interleave(variants, args.rounds)
        publisher.flush()
        commands = queued_commands(client, queue)
        messages = client.llen(queue)
    finally:
        clean_up(client, queue)

    def us(seconds: float, sign: bool = False) -> str:
        return f"{seconds * 1e6:+,.0f}" if sign else f"{seconds * 1e6:,.0f}"

    ok = True
    rows, where = [], []
    for label in visitors:
        wall = {kind: median(results[f"{label}|{kind}"]) for kind in ("plain", "celery", "locmem")}
        # The first entry is the warm-up round's.
        used = {kind: median(cpu[f"{label}|{kind}"][1:]) for kind in ("plain", "celery", "locmem")}
        ratio = wall["celery"] / wall["plain"]
        met = ratio <= TARGET
        ok = ok and met
        rows.append(
            [
                label,
                us(wall["plain"]),
                us(wall["celery"]),
                us(wall["celery"] - wall["plain"], sign=True),
                f"{ratio:.3f}x",
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
    print("\nwall time per request (median of the rounds)")
    print(
        table(
            ["visitor", "plain us", "tracked us", "added us", "ratio", f"<= {TARGET}x"],
            rows,
        )
    )
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
    expected = len(visitors) * n * (args.rounds + 1)  # The warm-up round included.
    good = [c for c in commands if c.kind == "record" and c.name == "Viewed Pricing"]
    print(
        f"\nqueued: {len(good)} commands in {messages} Celery messages for {expected} tracked "
        f"requests (celery rounds; {len(good) / max(messages, 1):.0f} commands per message); "
        "queue deleted"
    )
    if len(good) != expected or len(commands) != len(good):
        print("ERROR: the queue does not hold exactly one command per tracked request")
        ok = False
    print(f"\n{'target met' if ok else 'TARGET MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
