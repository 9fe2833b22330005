"""Bounded, serialisable input: what a visitor or a view hands over is capped and typed.

The browser queue in the session, ``km.js`` values of any Python type, hundreds of forged
``km_*`` cookies at consent withdrawal, ``_t`` from a query string, a ``Host`` that
``ALLOWED_HOSTS = ["*"]`` lets through, a connection error that would carry the URL,
64 KB user agents and commands whose URL would pass 8 KB.

The module is also the URLconf of its views (``pytest.mark.urls``).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import quote_plus

import pytest
from django.contrib.auth import logout
from django.core.management import call_command
from django.core.management.base import CommandError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.test import Client, override_settings
from django.urls import path

from django_kissmetrics import km, middleware
from django_kissmetrics.browser import MAX_SESSION_BYTES, MAX_SESSION_COMMANDS, SESSION_BROWSER
from django_kissmetrics.checks import check_settings
from django_kissmetrics.client import KissmetricsClient
from django_kissmetrics.commands import MAX_URL_BYTES, Command, make_record, make_set
from django_kissmetrics.exceptions import TrackingError
from django_kissmetrics.person import SESSION_IDENTITY
from tests.conftest import free_port

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.test_bounds")]

SIGNED_COOKIES = "django.contrib.sessions.backends.signed_cookies"


def paid_then_redirect(request: HttpRequest) -> HttpResponse:
    km.js.record(
        "Paid",
        {
            "amount": Decimal("9.99"),
            "at": dt.datetime(2026, 12, 7, 12, 30, tzinfo=dt.timezone.utc),
            "day": dt.date(2026, 12, 7),
            "items": [Decimal("1.5"), {"sku": object.__name__}],
            "ratio": float("nan"),
            "other": object(),
        },
    )
    return HttpResponseRedirect("/page/")


def click_then_redirect(request: HttpRequest) -> HttpResponse:
    km.js.record("Clicked", {"n": int(request.GET["n"]), "text": "x" * 40})
    return HttpResponseRedirect("/nothing/")


def page(request: HttpRequest) -> HttpResponse:
    return render(request, "page.html")


def nothing(request: HttpRequest) -> HttpResponse:
    return HttpResponse("nothing")


def search(request: HttpRequest) -> HttpResponse:
    km.record("Searched", request.GET.dict())
    return HttpResponse("ok")


def logout_then_redirect(request: HttpRequest) -> HttpResponse:
    logout(request)
    return HttpResponseRedirect("/nothing/")


def identify(request: HttpRequest) -> HttpResponse:
    km.identify("ann@example.com")
    km.js.record("Viewed", {"plan": "pro"})
    return HttpResponse("ok")


urlpatterns = [
    path("paid/", paid_then_redirect),
    path("click/", click_then_redirect),
    path("page/", page),
    path("nothing/", nothing),
    path("search/", search),
    path("identify/", identify),
    path("logout/", logout_then_redirect),
]


def pushed(html: str) -> list[Any]:
    """The ``_kmq.push([...])`` commands of a rendered page."""
    return [json.loads(x) for x in re.findall(r"_kmq\.push\((\[.*?\])\);", html)]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# km.js values and the browser queue in the session.


@pytest.mark.parametrize("engine", ["django.contrib.sessions.backends.db", SIGNED_COOKIES])
def test_a_decimal_then_a_redirect_is_a_number_on_the_next_page(engine: str) -> None:
    with override_settings(SESSION_ENGINE=engine):
        client = Client()
        response = client.get("/paid/")
        assert response.status_code == 302
        html = client.get("/page/").content.decode()
    (paid,) = [c for c in pushed(html) if c[:2] == ["record", "Paid"]]
    assert paid[2] == {
        "amount": 9.99,
        "at": "2026-12-07T12:30:00Z",  # ISO text, UTC, as the server side sends it.
        "day": "2026-12-07",
        "items": [1.5, {"sku": "object"}],
        "ratio": "nan",  # No JSON form: its text, as the server side sends it.
        "other": paid[2]["other"],
    }
    assert paid[2]["other"].startswith("<object object at")


@pytest.mark.parametrize("engine", ["django.contrib.sessions.backends.db", SIGNED_COOKIES])
def test_the_session_keeps_only_the_newest_browser_commands(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    with override_settings(SESSION_ENGINE=engine):
        client = Client()
        client.get("/identify/")  # The session holds the identity too.
        for n in range(200):  # Redirects that never reach a page with the tag.
            assert client.get("/click/", {"n": n}).status_code == 302
        queued = client.session[SESSION_BROWSER]
        assert client.session[SESSION_IDENTITY] == "ann@example.com"  # Not lost.
        if engine == SIGNED_COOKIES:
            assert len(client.cookies["sessionid"].OutputString()) < 4096
        html = client.get("/page/").content.decode()
    assert len(queued) <= MAX_SESSION_COMMANDS
    assert len(json.dumps(queued, separators=(",", ":"))) <= MAX_SESSION_BYTES
    clicks = [c[2]["n"] for c in pushed(html) if c[:2] == ["record", "Clicked"]]
    assert clicks == list(range(200 - len(clicks), 200))  # The newest, in order.
    assert any("browser command(s) dropped" in w for w in warnings(caplog))


def test_a_logout_is_never_dropped_from_the_queue(django_user_model: Any) -> None:
    user = django_user_model.objects.create_user("ann", password="pw")
    client = Client()
    client.force_login(user)
    client.get("/nothing/")
    client.get("/logout/")  # clearIdentity, waiting in the session for a page.
    for n in range(100):
        client.get("/click/", {"n": n})
    commands = pushed(client.get("/page/").content.decode())
    assert commands[0] == ["clearIdentity"]  # First, though it is the oldest.
    clicks = [c[2]["n"] for c in commands if c[:2] == ["record", "Clicked"]]
    assert clicks == list(range(100 - len(clicks), 100))
    assert len(commands) <= 1 + MAX_SESSION_COMMANDS


# Consent withdrawn with forged cookies.


def test_withdrawal_with_an_illegal_name_and_900_cookies(
    km_settings: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    km_settings(CONSENT="tests.views.banner_consent")
    client = Client()
    client.cookies["analytics_consent"] = "yes"
    client.get("/identify/")
    assert SESSION_BROWSER in client.session
    client.cookies["analytics_consent"] = "no"
    for n in range(900):
        client.cookies[f"km_{n}"] = "x"
    header = "; ".join(f"{k}={m.value}" for k, m in client.cookies.items())
    # A name a Set-Cookie header cannot carry, as a sibling subdomain can plant it.
    response = client.get("/nothing/", HTTP_COOKIE=f"km_(=x; {header}")
    assert response.status_code == 200
    deleted = {k: m for k, m in response.cookies.items() if k.startswith("km_")}
    assert len(deleted) == middleware.MAX_DELETED_COOKIES
    assert {"km_ai", "km_ni"} <= set(deleted)
    assert all(m["max-age"] == 0 for m in deleted.values())
    assert "km_(" not in deleted
    session = client.session
    assert SESSION_BROWSER not in session
    assert SESSION_IDENTITY not in session
    assert errors(caplog) == []


# _t from properties.


def test_t_from_a_query_string_is_dropped_not_a_500(
    km_outbox: list[Command], caplog: pytest.LogCaptureFixture
) -> None:
    before = int(time.time())
    for value in ["notanumber", "1234567890", "nan", "1e999"]:
        assert Client().get("/search/", {"_t": value, "q": "shoes"}).status_code == 200
    assert [c.properties for c in km_outbox] == [{"q": "shoes"}] * 4
    assert all(c.timestamp >= before for c in km_outbox)  # Not back-dated.
    assert sum("_t dropped" in w for w in warnings(caplog)) == 4


def test_t_as_a_finite_number_back_dates() -> None:
    assert make_record("ann", "Signed Up", {"_d": 1, "_t": 1234567890}).timestamp == 1234567890
    assert make_record("ann", "Paid", {"_t": Decimal("1234567890.5")}).timestamp == 1234567890
    for value in [float("inf"), float("nan"), True, "1234567890", [1]]:
        assert make_record("ann", "Paid", {"_t": value}).timestamp >= time.time() - 5


# The cookie's Domain and the host.


def domain_of(response: HttpResponse) -> str:
    return str(response.cookies["km_ai"]["domain"])


@pytest.mark.parametrize("forwarded", [False, True])
def test_a_host_that_only_star_allows_gets_a_host_only_cookie(forwarded: bool) -> None:
    hosts = {"HTTP_X_FORWARDED_HOST": "github.io"} if forwarded else {"HTTP_HOST": "github.io"}
    with override_settings(ALLOWED_HOSTS=["*"], USE_X_FORWARDED_HOST=forwarded):
        response = Client().get("/page/", **hosts)  # type: ignore[arg-type]
    assert response.status_code == 200
    assert domain_of(response) == ""
    assert "KM_COOKIE_DOMAIN" not in response.content.decode()


def test_a_named_host_gets_its_domain() -> None:
    with override_settings(ALLOWED_HOSTS=["*", ".shop.test"]):
        response = Client().get("/page/", HTTP_HOST="www.shop.test")
        assert domain_of(response) == "www.shop.test"
        assert 'var KM_COOKIE_DOMAIN = "www.shop.test";' in response.content.decode()
        # The configured domain is used whatever the host.
        with override_settings(KISSMETRICS={"API_KEY": "k", "COOKIE_DOMAIN": ".shop.test"}):
            assert domain_of(Client().get("/page/", HTTP_HOST="github.io")) == ".shop.test"


def test_star_without_a_cookie_domain_is_a_warning() -> None:
    def ids(**more: Any) -> list[str]:
        with override_settings(**more):
            return [m.id or "" for m in check_settings()]

    assert "django_kissmetrics.W005" in ids(ALLOWED_HOSTS=["*"])
    assert "django_kissmetrics.W005" not in ids(ALLOWED_HOSTS=[".shop.test"])
    configured = {"API_KEY": "k", "BACKEND": "locmem", "COOKIE_DOMAIN": ".shop.test"}
    assert "django_kissmetrics.W005" not in ids(ALLOWED_HOSTS=["*"], KISSMETRICS=configured)


# Errors never carry the URL (the key, the person, the properties).

SECRET_KEY = "sk-0123456789abcdef"


@pytest.fixture
def through_a_dead_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call goes through a proxy that refuses connections (read as a client is made)."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("NO_PROXY", "")


def leaks(text: str) -> list[str]:
    return [s for s in (SECRET_KEY, "_k=", "ann%40example.com", "ann@example", "4242") if s in text]


@pytest.mark.parametrize("proxy", [False, True])
def test_a_connection_error_says_its_type_not_its_url(
    proxy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("NO_PROXY", "")
    api = KissmetricsClient(SECRET_KEY, url=f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(TrackingError) as caught:
        api.record("ann@example.com", "Paid", {"card": "4242"})
    text = str(caught.value)
    assert "ConnectionRefusedError" in text
    assert ("ProxyConnectionError" in text) is proxy
    assert leaks(text) == []
    # Nothing chained either, which a traceback (or an error tracker) would print.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None


def test_logs_and_ping_never_carry_the_url(
    through_a_dead_proxy: None,
    km_settings: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    km_settings(
        API_KEY=SECRET_KEY,
        BACKEND="sync",
        TRACKING_URL=f"http://127.0.0.1:{free_port()}",
        TIMEOUT=2.0,
    )
    caplog.set_level(logging.DEBUG)
    km.record("Paid", {"plan": "pro"}, identity="bob")
    assert errors(caplog)  # Logged as not delivered.
    out = io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command("kissmetrics_ping", stdout=out)
    formatter = logging.Formatter()
    logged = "\n".join(formatter.format(r) for r in caplog.records if r.levelno >= logging.WARNING)
    printed = out.getvalue() + str(failed.value)
    for text in (logged, printed):
        assert SECRET_KEY not in text
        assert "_k=" not in text
    assert "ProxyConnectionError" in printed


# Caches and lengths that visitors drive.


def test_the_user_agent_cache_keeps_512_characters() -> None:
    middleware._bots.clear()
    for n in range(20):
        agent = f"Mozilla/5.0 {n} " + "A" * 65_536
        assert Client().get("/nothing/", HTTP_USER_AGENT=agent).status_code == 200
    assert middleware._bots
    assert max(len(k) for k in middleware._bots) == 512
    # A bot named past the first 512 characters is a visitor like any other.
    assert Client().get("/nothing/", HTTP_USER_AGENT="A" * 600 + " Googlebot").status_code == 200


def url_length(command: Command) -> int:
    api = KissmetricsClient("k" * 40, url="https://trk.kissmetrics.io")
    return len(api.url_for(command))


def test_a_command_over_8_kb_has_its_longest_values_cut(caplog: pytest.LogCaptureFixture) -> None:
    props = {f"field {n}": "é" * 2000 for n in range(10)}
    props.update(plan="pro", note="short text")
    command = make_record("ann@example.com", "Filled Form", props)
    assert url_length(command) <= MAX_URL_BYTES
    assert command.properties["plan"] == "pro"  # Short values are kept whole.
    assert command.properties["note"] == "short text"
    long_ones = [command.properties[f"field {n}"] for n in range(10)]
    assert len(set(long_ones)) == 1  # Cut to one common length...
    assert 0 < len(long_ones[0]) < 2000  # ...and that is all they lost.
    assert long_ones[0] == "é" * len(long_ones[0])
    # As long as could fit: one character more each would not.
    grown = {
        **command.properties,
        **{f"field {n}": "é" * (len(long_ones[0]) + 1) for n in range(10)},
    }
    assert len("&".join(f"{quote_plus(k)}={quote_plus(v)}" for k, v in grown.items())) > (
        len("&".join(f"{quote_plus(k)}={quote_plus(v)}" for k, v in command.properties.items()))
    )
    assert any("cut to" in w for w in warnings(caplog))


def test_thousands_of_properties_are_cut_to_fit(caplog: pytest.LogCaptureFixture) -> None:
    props = {f"p{n:05d}" + "x" * 200: "v" for n in range(5000)}
    command = make_set("ann", props)
    assert url_length(command) <= MAX_URL_BYTES
    assert 0 < len(command.properties) < 5000
    assert list(command.properties) == list(props)[: len(command.properties)]  # The first.
    assert any("properties" in w and "cut" in w for w in warnings(caplog))


def test_an_ordinary_command_is_untouched(caplog: pytest.LogCaptureFixture) -> None:
    props = {"plan": "pro", "amount": 49, "text": "x" * 5000}
    command = make_record("ann", "Paid", props)
    assert command.properties == {"plan": "pro", "amount": "49", "text": "x" * 5000}
    assert warnings(caplog) == []
    assert url_length(command) <= MAX_URL_BYTES
