"""Page caches in front of the site: no visitor ever receives another visitor's ``km_ai``.

A response that sets or deletes a Kissmetrics cookie is ``Cache-Control: private`` with
``Vary: Cookie``; one that sets none stays as cacheable as the view made it. Proven with
Django's per-site cache (``UpdateCacheMiddleware``/``FetchFromCacheMiddleware``) and with
a real nginx ``proxy_cache`` in front of a real gunicorn, three visitors each.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client, override_settings

from django_kissmetrics import cookies
from django_kissmetrics.commands import Command
from django_kissmetrics.identity import encode_cookie, new_anonymous_id
from django_kissmetrics.testing import StandInTracker
from tests.conftest import free_port, need
from tests.servers import SiteProcess

pytestmark = pytest.mark.django_db

NGINX = os.environ.get("NGINX", "/usr/sbin/nginx")


def received_ids(response: Any) -> list[str]:
    """The ``km_ai`` values a response sets (deletions aside)."""
    morsel = response.cookies.get("km_ai")
    return [unquote(morsel.value)] if morsel is not None and morsel.value else []


# The headers, through the test client.


def test_a_first_visit_is_private_and_varies_on_cookie(client: Client) -> None:
    response = client.get("/cached/")
    assert received_ids(response)
    assert response["Cache-Control"] == "max-age=60, private"  # The view's max-age stays.
    assert "Cookie" in response["Vary"]


def test_a_returning_visitor_stays_cacheable(client: Client) -> None:
    client.cookies["km_ai"] = encode_cookie(new_anonymous_id())
    response = client.get("/cached/")
    assert received_ids(response) == []
    assert response["Cache-Control"] == "max-age=60"
    assert "Vary" not in response


def test_logout_and_a_replaced_cookie_are_private(client: Client) -> None:
    User.objects.create_user("ann", password="secret-pw")
    client.cookies["km_ai"] = "1"  # Not an anonymous id: replaced.
    response = client.get("/cached/")
    assert received_ids(response)
    assert "private" in response["Cache-Control"]
    client.post("/login/", {"username": "ann", "password": "secret-pw"})
    response = client.post("/logout/")
    assert response.cookies["km_ni"]["max-age"] == 0  # Deleted...
    assert "private" in response["Cache-Control"]  # ...in a response no cache keeps.
    assert "Cookie" in response["Vary"]


def test_a_public_view_becomes_private_when_it_sets_km_ai(client: Client) -> None:
    response = client.get("/cached/?public=1")
    assert received_ids(response)
    assert response["Cache-Control"] == "max-age=60, private"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Cache-Control": "max-age=60"},
        {"Cache-Control": "public, max-age=60", "Vary": "Accept-Encoding"},
        {"Cache-Control": "private", "Vary": "Cookie"},
        {"Vary": "*"},
        {"Vary": "accept-language, cookie"},
    ],
)
def test_the_headers_are_what_djangos_functions_write(headers: dict[str, str]) -> None:
    from django.http import HttpResponse
    from django.utils.cache import patch_cache_control, patch_vary_headers

    ours, django = HttpResponse(headers=headers), HttpResponse(headers=headers)
    cookies._not_shared(ours)
    patch_cache_control(django, private=True)
    patch_vary_headers(django, ("Cookie",))
    assert dict(ours.items()) == dict(django.items())


# Django's per-site cache.

PER_SITE_CACHE = [
    "django.middleware.cache.UpdateCacheMiddleware",
    *settings.MIDDLEWARE,
    "django.middleware.cache.FetchFromCacheMiddleware",
]


class Visitor:
    """One browser: its cookies, its own id, and every km_ai it was ever sent."""

    def __init__(self, name: str, own: str | None = None) -> None:
        self.name = name
        self.client = Client()
        self.own = own
        self.received: list[str] = []
        if own is not None:
            self.client.cookies["km_ai"] = encode_cookie(own)

    def visit(self, path: str) -> Any:
        response = self.client.get(path)
        assert response.status_code == 200
        got = received_ids(response)
        self.received += got
        if self.own is None and got:
            self.own = got[0]  # A new visitor's id: the first one it was given.
        return response

    @property
    def holds(self) -> str:
        return unquote(self.client.cookies["km_ai"].value)


def three_visitors_through_a_cache() -> tuple[list[Visitor], list[Command]]:
    from django_kissmetrics.testing import outbox

    new = Visitor("new")
    returning = [Visitor(f"returning {n}", new_anonymous_id()) for n in (1, 2)]
    visitors = [new, *returning]
    for _ in range(3):
        for visitor in visitors:
            visitor.visit("/cached/")
    return visitors, list(outbox)


@pytest.mark.usefixtures("km_outbox")
def test_django_per_site_cache_three_visitors_keep_their_own_ids() -> None:
    with override_settings(
        MIDDLEWARE=PER_SITE_CACHE,
        CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
        CACHE_MIDDLEWARE_SECONDS=60,
        CACHE_MIDDLEWARE_KEY_PREFIX=f"km-{new_anonymous_id()}",
    ):
        visitors, sent = three_visitors_through_a_cache()
        late = Visitor("late")  # Served from the cache: still gets an id of its own.
        late.visit("/cached/")
    ids = [v.own for v in [*visitors, late]]
    assert None not in ids
    assert len(set(ids)) == 4
    for visitor in [*visitors, late]:
        assert set(visitor.received) <= {visitor.own}, visitor.name
        assert visitor.holds == visitor.own
    # What ran the view was recorded under that visitor's own id; the rest came from the
    # cache (the returning visitors' cookie-less answer is cached, as before).
    assert {c.person for c in sent} <= set(ids)
    assert len(sent) < 3 * len(visitors)


@pytest.mark.usefixtures("km_outbox")
def test_without_the_headers_the_per_site_cache_would_mix_visitors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: the same visitors, the headers turned off, and one id reaches another."""
    monkeypatch.setattr(cookies, "_not_shared", lambda response: None)
    with override_settings(
        MIDDLEWARE=PER_SITE_CACHE,
        CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
        CACHE_MIDDLEWARE_SECONDS=60,
        CACHE_MIDDLEWARE_KEY_PREFIX=f"km-{new_anonymous_id()}",
    ):
        visitors, _ = three_visitors_through_a_cache()
    assert any(set(v.received) - {v.own} for v in visitors)


# nginx proxy_cache in front of gunicorn.

NGINX_CONF = """
{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    proxy_cache_path {tmp}/cache keys_zone=pages:1m;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_cache pages;
            # As page caches are often set up: whole pages are kept even when they set
            # cookies, and Cache-Control and Vary are honoured.
            proxy_ignore_headers Set-Cookie;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_in_front_of(upstream: int) -> Iterator[str]:
    """A real nginx caching proxy for ``127.0.0.1:upstream``; yields its URL."""
    if not Path(NGINX).exists():
        need(f"nginx not found at {NGINX} (apt-get install nginx)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="km-nginx-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""  # Workers write the cache here.
        conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, port=port, upstream=upstream))
        process = subprocess.Popen(
            [NGINX, "-p", tmp, "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    urllib.request.urlopen(f"{url}/nothing/", timeout=2).read()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log = (Path(tmp) / "error.log").read_text() if process.poll() else ""
                        raise RuntimeError(f"nginx did not start: {log}") from None
                    time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def proxied_site(tracker: StandInTracker) -> Iterator[str]:
    """gunicorn serving the test site (delivering to ``tracker``), nginx caching in front."""
    config = {"BACKEND": "sync", "TRACKING_URL": tracker.url}
    with (
        SiteProcess("gunicorn", config, settings.REDIS_URL, workers=1) as site,
        nginx_in_front_of(site.port) as url,
    ):
        yield url


class Browser:
    """A visitor with a cookie jar of its own, through the proxy."""

    def __init__(self, base: str, own: str | None = None) -> None:
        self.base = base
        self.cookies: dict[str, str] = {}
        self.own = own
        self.received: list[str] = []
        self.cache: list[str] = []
        if own is not None:
            self.cookies["km_ai"] = encode_cookie(own)

    def visit(self, path: str) -> None:
        request = urllib.request.Request(self.base + path)
        if self.cookies:
            request.add_header("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            response.read()
            headers = response.headers
        self.cache.append(headers.get("X-Cache-Status", ""))
        got = []
        for header in headers.get_all("Set-Cookie") or []:
            jar = SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                    continue
                self.cookies[name] = morsel.value
                if name == "km_ai":
                    got.append(unquote(morsel.value))
        self.received += got
        if self.own is None and got:
            self.own = got[0]


@pytest.mark.timeout(120)
def test_nginx_proxy_cache_three_visitors_keep_their_own_ids(
    proxied_site: str, tracker: StandInTracker
) -> None:
    new = Browser(proxied_site)
    returning = [Browser(proxied_site, new_anonymous_id()) for _ in (1, 2)]
    visitors = [new, *returning]
    for _ in range(3):
        for visitor in visitors:
            visitor.visit("/cached/")
    late = Browser(proxied_site)
    late.visit("/cached/")

    statuses = [s for v in [*visitors, late] for s in v.cache]
    assert "HIT" in statuses  # The cache is really there and serving pages.
    for visitor in visitors:
        assert visitor.own is not None
        assert set(visitor.received) <= {visitor.own}
        assert unquote(visitor.cookies["km_ai"]) == visitor.own
    # A visitor served from the cache gets no km_ai at all (the library makes one),
    # never someone else's.
    assert set(late.received) - {late.own} == set()
    assert len({v.own for v in visitors}) == 3
    tracker.wait_for(1)
    owners = {v.own for v in visitors} | {late.own}
    assert {hit.person for hit in tracker.hits} <= owners


@pytest.mark.timeout(120)
def test_nginx_proxy_cache_replays_a_cookie_that_is_not_private(proxied_site: str) -> None:
    """The control: this nginx does hand one visitor's cookie to the next, when the
    response allows it; what keeps km_ai out of it is the response's own headers."""
    first, second = (Browser(proxied_site, new_anonymous_id()) for _ in (1, 2))
    first.visit("/cached/?cookie=leaky")
    second.visit("/cached/?cookie=leaky")
    assert second.cache[-1] == "HIT"
    assert second.cookies["leaky"] == first.cookies["leaky"]
