"""The site the request benchmarks measure: its views, its middleware, its visitors, its broker.

Shared by ``request.py`` and ``peers.py``. It is also the sites' URLconf (``ROOT_URLCONF =
"_site"``), so that a process of its own (``peers.py`` runs one per variant) builds the same
site from this module alone.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import _common
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from django_kissmetrics import km
from django_kissmetrics.commands import Command
from django_kissmetrics.identity import encode_cookie

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
#: The ``TEMPLATES`` setting of every site here.
TEMPLATE_SETTINGS = [
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
]
CONTEXT = {
    "title": "Pricing",
    "links": [{"url": f"/{name}/", "label": name.title()} for name in ("home", "pricing", "help")],
    "plans": [
        {"name": name, "price": price, "features": [f"Feature {i}" for i in range(8)]}
        for name, price in (("basic", 9), ("pro", 29), ("team", 99))
    ],
}


#: The event every tracked view records, whatever the library.
EVENT = "Viewed Pricing"
PROPERTIES = {"plan": "pro", "source": "benchmark"}


def tracked_view(request: HttpRequest) -> HttpResponse:
    """The page, recording one event about the current visitor."""
    km.record(EVENT, PROPERTIES)
    return HttpResponse(PAGE)


def plain_view(request: HttpRequest) -> HttpResponse:
    """The same page without tracking."""
    return HttpResponse(PAGE)


def tracked_page(request: HttpRequest) -> HttpResponse:
    """The templated page, recording one event; its template has the tag."""
    km.record(EVENT, PROPERTIES)
    return render(request, "tracked.html", CONTEXT)


def plain_page(request: HttpRequest) -> HttpResponse:
    """The same templated page, without tracking or the tag."""
    return render(request, "plain.html", CONTEXT)


#: ``--view``: (tracked path, plain path).
VIEWS = {"empty": ("/tracked/", "/plain/"), "page": ("/tracked-page/", "/plain-page/")}
#: This module is the URLconf.
urlpatterns = [
    path("tracked/", tracked_view),
    path("plain/", plain_view),
    path("tracked-page/", tracked_page),
    path("plain-page/", plain_page),
]


def environ(path: str, cookie: str | None, visitor: str = "") -> dict[str, Any]:
    """A browser's GET as a WSGI server hands it over (``visitor``: see VISITOR_ENVIRON)."""
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
    env.update(VISITOR_ENVIRON.get(visitor, {}))
    return env


def runner(handler: Any, env: dict[str, Any], count: int) -> Callable[[], None]:
    """Serve ``count`` requests through ``handler`` as a WSGI server would.

    A visit cookie (``--auto-events``) is stamped afresh each round, as the browser of a
    visitor inside a visit would hold it.
    """
    statuses: list[str] = []
    visiting = f"{VISIT_COOKIE}=" in env.get("HTTP_COOKIE", "")

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)
        return None

    def run() -> None:
        statuses.clear()
        if visiting:
            stamp = f"{VISIT_COOKIE}={int(time.time())}"
            env["HTTP_COOKIE"] = _VISIT.sub(stamp, env["HTTP_COOKIE"])
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


def events_in(commands: list[Command]) -> int:
    """How many of ``commands`` are the benchmark's event (not an acquisition event)."""
    return sum(c.kind == "record" and c.name == EVENT for c in commands)


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


#: ``--hooks``: SITES (this host and another), TRACK (staff and an office range kept out)
#: and BEFORE_SEND (a hook that looks at each command and keeps it); ``--hooks sites``
#: (or ``track``, ``before_send``, comma-separated) sets only those.
HOOKS: dict[str, dict[str, Any]] = {
    "sites": {"SITES": {"www.shop.test": KEY, ".other.test": "other-key"}},
    "track": {
        "TRACK": "django_kissmetrics.track.not_staff_or_internal",
        "INTERNAL_IPS": ["192.0.2.0/24"],
    },
    "before_send": {"BEFORE_SEND": "_site.before_send"},
}
ALL_HOOKS = ",".join(HOOKS)


def hook_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``KISSMETRICS`` keys ``--hooks`` sets."""
    chosen = getattr(args, "hooks", None)
    if not chosen:
        return {}
    out: dict[str, Any] = {}
    for name in chosen.split(","):
        if name not in HOOKS:
            raise SystemExit(f"--hooks: {name!r} is not one of {ALL_HOOKS}")
        out.update(HOOKS[name])
    return out


def before_send(command: Command) -> Command | None:
    """``BEFORE_SEND`` for ``--hooks``: drops a health check's events, keeps the rest."""
    return None if command.name == "Checked Health" else command


def hooks_label(args: argparse.Namespace) -> str:
    """What ``--hooks`` set, for the report's header."""
    chosen = hook_settings(args)
    return ", ".join(
        f"{key}: {chosen.get(key)!r}" for key in ("SITES", "TRACK", "INTERNAL_IPS", "BEFORE_SEND")
    )


def banner_consent(request: HttpRequest) -> bool:
    """``CONSENT`` for ``--consent``: the visitor agreed in the banner."""
    return request.COOKIES.get("analytics_consent") == "yes"


def add_consent_cookie() -> None:
    """``--consent``: every visitor has the banner's cookie; only the tracked site reads it."""
    for label, cookie in VISITORS.items():
        VISITORS[label] = "; ".join(c for c in (cookie, CONSENT_COOKIE) if c)


#: ``--auto-events``: every ``AUTO_EVENTS`` item on. The returning visitor is inside a visit
#: (the visit cookie), the first visit comes straight in (one ``Visited Site``), and a third
#: visitor, a first visit from a Google search by a campaign link, records all four.
AUTO_EVENTS = ["Visited Site", "Ad Campaign Hit", "Search Engine Hit", "Referrer"]
VISIT_COOKIE = "km_visit"
#: ``--auto-events``: the visitor arriving by a campaign link from a search (not judged:
#: five commands against the peers' one event).
CAMPAIGN_VISIT = "campaign first visit"
_VISIT = re.compile(rf"{VISIT_COOKIE}=\d+")
#: Visitor -> the headers and query string of their requests besides the cookie.
VISITOR_ENVIRON: dict[str, dict[str, str]] = {}


def add_auto_events() -> None:
    """``--auto-events``: the visitors of the acquisition events (the plain site ignores them)."""
    VISITORS["returning visitor"] = f"{VISITORS['returning visitor']}; {VISIT_COOKIE}=0"
    VISITORS[CAMPAIGN_VISIT] = None
    VISITOR_ENVIRON[CAMPAIGN_VISIT] = {
        "QUERY_STRING": "utm_source=newsletter&utm_medium=email&utm_campaign=launch",
        "HTTP_REFERER": "https://www.google.com/search?q=kanban+for+small+teams",
    }


@dataclasses.dataclass
class Site:
    """The two handlers and the broker the tracked one publishes to."""

    tracked: Any
    plain: Any
    km_settings: dict[str, Any]
    middleware: list[str]
    client: Any
    queue: str


def build_site(
    args: argparse.Namespace, *, django_settings: dict[str, Any] | None = None, **km_overrides: Any
) -> Site:
    """Configure Django (plus ``django_settings``), a Celery app on the Redis broker, and the
    two handlers."""
    queue = km_overrides.get("CELERY_QUEUE", f"km-bench-request-{os.getpid()}")
    base_middleware = STACKS[args.stack]
    tracked_middleware = [*base_middleware, "django_kissmetrics.middleware.KissmetricsMiddleware"]
    km_settings = {
        "API_KEY": KEY,
        "BACKEND": "celery",
        "CELERY_QUEUE": queue,
        # Never contacted: no worker consumes the queue.
        "TRACKING_URL": "http://127.0.0.1:9",
        **({"CONSENT": "_site.banner_consent"} if args.consent else {}),
        **({"AUTO_EVENTS": AUTO_EVENTS} if getattr(args, "auto_events", False) else {}),
        **hook_settings(args),
        **km_overrides,
    }
    _common.setup_django(
        ROOT_URLCONF="_site",
        MIDDLEWARE=tracked_middleware,
        KISSMETRICS=km_settings,
        TEMPLATES=TEMPLATE_SETTINGS,
        **(django_settings or {}),
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
    good = [c for c in commands if c.kind == "record" and c.name == EVENT]
    # --auto-events: the acquisition events of first visits come on top.
    commands = [c for c in commands if c.name not in AUTO_EVENTS and c.kind != "set"]
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
