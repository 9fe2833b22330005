"""``CONSENT``: no cookie and nothing sent before the visitor agrees; withdrawal deletes them.

Each state (no gate, not agreed, agreed, withdrawn, a gate that raises) through the test
client, the middleware on a RequestFactory request, and ASGI; the django-cookie-consent
adapter with that package's own accept and decline views.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import cookie_consent.conf  # Its defaults join settings now, not inside an override.
import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.template import Context, Template
from django.test import Client, RequestFactory, modify_settings

from django_kissmetrics.browser import SESSION_BROWSER
from django_kissmetrics.commands import Command
from django_kissmetrics.conf import ConfigurationError, load
from django_kissmetrics.identity import encode_cookie, new_anonymous_id
from django_kissmetrics.middleware import KissmetricsMiddleware
from django_kissmetrics.person import SESSION_IDENTITY

pytestmark = pytest.mark.django_db

BANNER = "tests.views.banner_consent"
AGREED = {"analytics_consent": "yes"}


@pytest.fixture
def gate(km_settings: Callable[..., None]) -> Callable[..., None]:
    """``gate(**keys)``: ``CONSENT`` is the banner-cookie function, plus any other keys."""

    def apply(**overrides: Any) -> None:
        km_settings(**{"CONSENT": BANNER, **overrides})

    apply()
    return apply


def agree(client: Client) -> None:
    client.cookies["analytics_consent"] = "yes"


def decline(client: Client) -> None:
    client.cookies["analytics_consent"] = "no"


def km_cookies(response: HttpResponse) -> dict[str, Any]:
    return {name: m for name, m in response.cookies.items() if name.startswith("km_")}


def explicit_only(outbox: list[Command]) -> list[tuple[str, str, str | None]]:
    return [(c.kind, c.person, c.name) for c in outbox]


EXPLICIT = [
    ("record", "customer-7", "Refunded"),
    ("set", "customer-7", None),
    ("alias", "customer-7", "c7@example.com"),
]


# No gate.


def test_without_a_gate_every_visitor_is_tracked(client: Client, km_outbox: list[Command]) -> None:
    response = client.get("/consent/explicit/")
    person = unquote(response.cookies["km_ai"].value)
    assert [(c.person, c.name) for c in km_outbox][:2] == [(person, "Viewed Page"), (person, None)]


# Not agreed.


@pytest.mark.parametrize("answer", ["none", "declined"])
def test_not_agreed_sets_no_cookie_and_sends_only_explicit_calls(
    client: Client, km_outbox: list[Command], gate: Any, answer: str
) -> None:
    if answer == "declined":
        decline(client)
    response = client.get("/consent/explicit/")
    assert response.status_code == 200
    assert km_cookies(response) == {}
    assert explicit_only(km_outbox) == EXPLICIT


def test_not_agreed_login_and_signup_send_nothing(
    client: Client, km_outbox: list[Command], gate: Any
) -> None:
    User.objects.create_user("ann", password="a-long-password-1")
    response = client.post("/login/", {"username": "ann", "password": "a-long-password-1"})
    assert response.status_code == 302
    assert km_cookies(response) == {}
    client.post("/logout/")
    response = client.post("/signup/", {"username": "bob", "password": "a-long-password-2"})
    assert response.status_code == 302
    assert km_cookies(response) == {}
    assert km_outbox == []  # No alias, no "Logged In", no "Signed Up".


NAMED_OTHERS = [("record", "customer-7", "Refunded")]


@pytest.mark.parametrize("path", ["/consent/named/", "/consent/async-named/"])
def test_not_agreed_calls_naming_the_visitor_are_dropped(
    client: Client, km_outbox: list[Command], gate: Any, path: str
) -> None:
    user = User.objects.create_user("ann", password="a-long-password-1")
    client.force_login(user)
    # The logged-in user's own identity, by hand: dropped like an implicit call.
    client.get(path, {"who": str(user.pk)})
    assert explicit_only(km_outbox) == NAMED_OTHERS
    # Their km_ai (the browser still holds one: the response deletes it).
    km_outbox.clear()
    anonymous = new_anonymous_id()
    client.cookies["km_ai"] = encode_cookie(anonymous)
    response = client.get(path, {"who": anonymous})
    assert response.cookies["km_ai"]["max-age"] == 0
    assert explicit_only(km_outbox) == NAMED_OTHERS
    # Someone else: the site's own dealings with a customer still go.
    km_outbox.clear()
    client.get(path, {"who": "bob@example.com"})
    assert explicit_only(km_outbox) == [
        ("record", "bob@example.com", "Viewed Page"),
        ("set", "bob@example.com", None),
        ("alias", "bob@example.com", "someone@example.com"),
        ("alias", "customer-7", "bob@example.com"),
        *NAMED_OTHERS,
    ]
    # Once agreed, the visitor's own identity goes like any other.
    km_outbox.clear()
    agree(client)
    client.get(path, {"who": str(user.pk)})
    assert ("record", str(user.pk), "Viewed Page") in explicit_only(km_outbox)


def test_not_agreed_explicit_calls_cost_no_query_for_an_anonymous_visitor(
    client: Client, km_outbox: list[Command], gate: Any, django_assert_num_queries: Any
) -> None:
    with django_assert_num_queries(0):
        client.get("/consent/named/", {"who": "bob@example.com"})
    assert len(km_outbox) == 5


def test_dnt_drops_explicit_calls_naming_the_visitor_too(
    client: Client, km_outbox: list[Command], gate: Any
) -> None:
    user = User.objects.create_user("ann", password="a-long-password-1")
    client.force_login(user)
    agree(client)
    client.get("/consent/named/", {"who": str(user.pk)}, headers={"DNT": "1"})
    assert km_outbox == []


def test_not_agreed_identify_and_browser_commands_are_not_kept(
    client: Client, km_outbox: list[Command], gate: Any
) -> None:
    client.get("/consent/identify/")
    session = client.session
    assert SESSION_IDENTITY not in session
    assert SESSION_BROWSER not in session
    assert km_outbox == []


def test_not_agreed_the_tag_renders_the_loader_inert(client: Client, gate: Any) -> None:
    User.objects.create_user("ann", password="pw")
    client.login(username="ann", password="pw")
    body = client.get("/browser/tag/", {"js": 1}).content.decode()
    inert, starter = body.strip("[]\n").split("</script>", 1)
    assert inert.startswith('<script type="text/plain" data-category="analytics">\n')
    assert "var _kmq = _kmq || [];" in inert
    assert '_kms("//scripts.kissmetrics.io/"+_kmk+".2.js");' in inert
    assert "_kmq.push" not in body  # No identify and no event before consent.
    assert "Saw Tag" not in body
    assert starter.startswith("<script>(function(c){")
    assert "window.kissmetricsStart=function()" in starter


def test_the_inert_loader_attributes_and_the_nonce(client: Client, gate: Any) -> None:
    gate(
        CONSENT_SCRIPT_ATTRIBUTES={
            "type": "text/plain",
            "data-type": "application/javascript",
            "data-name": 'kiss"metrics',
        }
    )
    body = client.get("/browser/csp/", {"nonce": "abc"}).content.decode()
    assert (
        '<script type="text/plain" data-type="application/javascript" '
        'data-name="kiss&quot;metrics" nonce="abc">\n'
    ) in body
    assert '</script><script nonce="abc">(function(c){' in body


@pytest.mark.parametrize(
    ("attributes", "problem"),
    [
        ({"data-category": "analytics"}, '"type"'),
        ({"type": "text/javascript"}, '"type"'),
        ({"type": " Module "}, '"type"'),
        ({"type": "text/plain", 'x"><b': "1"}, "not an HTML attribute name"),
        ({"type": "text/plain", "data-n": 1}, "must be str"),
        ((("type",),), "must be a dict"),
    ],
)
def test_the_inert_loader_must_stay_inert(attributes: Any, problem: str) -> None:
    with pytest.raises(ConfigurationError, match="CONSENT_SCRIPT_ATTRIBUTES"):
        load({"CONSENT_SCRIPT_ATTRIBUTES": attributes})
    with pytest.raises(ConfigurationError, match=problem):
        load({"CONSENT_SCRIPT_ATTRIBUTES": attributes})


def test_not_agreed_costs_no_query(
    client: Client, km_outbox: list[Command], gate: Any, django_assert_num_queries: Any
) -> None:
    with django_assert_num_queries(0):
        client.get("/record/")
    agree(client)
    with django_assert_num_queries(0):
        client.get("/record/")
    assert len(km_outbox) == 1


# A gate that fails.


@pytest.mark.parametrize("path", ["tests.views.broken_consent", "tests.views.no_such_function"])
def test_a_failing_gate_counts_as_not_agreed_and_is_logged_once(
    client: Client,
    km_outbox: list[Command],
    km_settings: Any,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    km_settings(CONSENT=path)
    with caplog.at_level(logging.ERROR, logger="django_kissmetrics"):
        for _ in range(3):
            response = client.get("/consent/explicit/")
            assert response.status_code == 200
            assert km_cookies(response) == {}
    assert explicit_only(km_outbox) == EXPLICIT * 3
    (record,) = [r for r in caplog.records if "CONSENT" in r.getMessage()]
    assert path in record.getMessage()
    assert record.exc_info is not None


# Agreed.


def test_agreed_tracks_as_without_a_gate(
    client: Client, km_outbox: list[Command], gate: Any
) -> None:
    agree(client)
    response = client.get("/consent/explicit/")
    person = unquote(response.cookies["km_ai"].value)
    assert [(c.person, c.name) for c in km_outbox][:2] == [(person, "Viewed Page"), (person, None)]
    body = client.get("/browser/tag/").content.decode()
    assert body.startswith("[<script>\nvar _kmq = _kmq || [];\n")
    assert "kissmetricsStart" not in body


def test_agreed_in_the_page_the_server_adopts_the_library_id(
    client: Client, km_outbox: list[Command], gate: Any
) -> None:
    client.get("/browser/page/")  # Not agreed yet: the inert loader.
    # The banner sets its cookie and starts the library, which writes its own km_ai.
    library_id = new_anonymous_id()
    agree(client)
    client.cookies["km_ai"] = encode_cookie(library_id)
    response = client.get("/record/")
    assert "km_ai" not in response.cookies  # Adopted, not replaced.
    (command,) = km_outbox
    assert command.person == library_id


# Withdrawn.


@pytest.mark.parametrize(
    ("host", "configured", "domain"),
    [
        ("localhost", None, ""),
        ("www.shop.test", None, "www.shop.test"),
        ("www.shop.test", ".shop.test", ".shop.test"),
    ],
    ids=["host-only", "host", "setting"],
)
def test_withdrawn_deletes_the_cookies_with_their_domain(
    client: Client,
    km_outbox: list[Command],
    gate: Any,
    host: str,
    configured: str | None,
    domain: str,
) -> None:
    gate(COOKIE_DOMAIN=configured)
    agree(client)
    client.get("/consent/identify/", headers={"Host": host})  # km.js.record kept in the session.
    assert SESSION_BROWSER in client.session
    client.cookies["km_ni"] = "ann%40example.com"  # As the library writes them.
    client.cookies["km_lv"] = "x"
    km_outbox.clear()

    decline(client)
    response = client.get("/consent/explicit/", headers={"Host": host})
    deleted = km_cookies(response)
    assert sorted(deleted) == ["km_ai", "km_lv", "km_ni"]
    for morsel in deleted.values():
        assert morsel.value == ""
        assert morsel["max-age"] == 0
        assert morsel["path"] == "/"
        assert morsel["domain"] == domain
    assert SESSION_BROWSER not in client.session
    assert explicit_only(km_outbox) == EXPLICIT

    # Gone from the browser: the next request is a visitor who has not agreed, no more.
    response = client.get("/consent/explicit/", headers={"Host": host})
    assert km_cookies(response) == {}
    agree(client)
    response = client.get("/record/", headers={"Host": host})
    assert km_outbox[-1].person == unquote(response.cookies["km_ai"].value)


# The middleware on a bare request.


def test_the_middleware_decides_once_per_request(rf: RequestFactory, gate: Any) -> None:
    calls: list[HttpRequest] = []

    def view(request: HttpRequest) -> HttpResponse:
        calls.append(request)
        request.km.record("One")  # type: ignore[attr-defined]
        request.km.record("Two")  # type: ignore[attr-defined]
        return HttpResponse(
            Template("{% load kissmetrics %}{% kissmetrics_js %}").render(
                Context({"request": request})
            )
        )

    middleware = KissmetricsMiddleware(view)
    request = rf.get("/")
    response = middleware(request)
    tracker = request.km  # type: ignore[attr-defined]
    assert (tracker.active, tracker.allow_explicit, tracker.awaiting_consent) == (False, True, True)
    assert tracker.withdrawn is False
    assert tracker.identity is None
    assert 'type="text/plain"' in response.content.decode()

    request = rf.get("/", HTTP_COOKIE="analytics_consent=yes")
    middleware(request)
    tracker = request.km  # type: ignore[attr-defined]
    assert tracker.active
    assert tracker.identity == tracker.anonymous_id

    request = rf.get("/", HTTP_COOKIE=f"km_ai={encode_cookie(new_anonymous_id())}")
    response = middleware(request)
    assert request.km.withdrawn  # type: ignore[attr-defined]
    assert response.cookies["km_ai"]["max-age"] == 0


def test_a_gated_page_varies_on_the_cookie(client: Client, km_settings: Any) -> None:
    """A shared cache must not give one visitor's loader (live or inert) to another."""
    client.get("/nothing/")  # The first visit sets km_ai, and varies for that.
    assert "Vary" not in client.get("/nothing/")  # No gate: nothing on the package's account.
    km_settings(CONSENT=BANNER)
    assert "Cookie" in client.get("/nothing/")["Vary"]
    agree(client)
    assert "Cookie" in client.get("/nothing/")["Vary"]


def test_dnt_wins_over_consent(client: Client, gate: Any, km_outbox: list[Command]) -> None:
    agree(client)
    response = client.get("/browser/tag/", headers={"DNT": "1"})
    assert response.content.decode().strip() == "[]"
    assert km_cookies(response) == {}


# ASGI.


def fetch(async_client: Any, path: str) -> Any:
    async def get() -> Any:
        return await async_client.get(path)

    return async_to_sync(get)()


def test_asgi_not_agreed_agreed_and_withdrawn(
    async_client: Any, km_outbox: list[Command], gate: Any
) -> None:
    response = fetch(async_client, "/async-record/")
    assert km_cookies(response) == {}
    assert km_outbox == []

    async_client.cookies["analytics_consent"] = "yes"
    response = fetch(async_client, "/async-record/")
    person = unquote(response.cookies["km_ai"].value)
    assert [(c.person, c.name) for c in km_outbox] == [(person, "Async Event")]

    # Withdrawn, with a session holding browser commands: the session is written off
    # the event loop.
    User.objects.create_user("asy", password="pw")
    async_client.force_login(User.objects.get(username="asy"))
    session = async_client.session
    session[SESSION_BROWSER] = [["record", "Kept"]]
    session.save()
    async_client.cookies["analytics_consent"] = "no"
    response = fetch(async_client, "/async-record/")
    assert response.cookies["km_ai"]["max-age"] == 0
    assert response.cookies["km_ni"]["max-age"] == 0
    assert SESSION_BROWSER not in async_client.session
    assert len(km_outbox) == 1


# django-cookie-consent.


@pytest.fixture
def cookie_consent(gate: Callable[..., None]) -> Iterator[Any]:
    """The ``analytics`` and ``stats`` cookie groups; ``CONSENT`` is the adapter."""
    from cookie_consent.cache import delete_cache
    from cookie_consent.models import Cookie, CookieGroup

    for varname in ("analytics", "stats"):
        group = CookieGroup.objects.create(varname=varname, name=varname.title())
        Cookie.objects.create(cookiegroup=group, name=f"{varname}-1", domain="")

    def apply(**overrides: Any) -> None:
        gate(CONSENT="django_kissmetrics.consent.django_cookie_consent", **overrides)

    apply()
    yield apply
    delete_cache()  # Its cache outlives this test's database.


def post_consent(client: Client, action: str, group: str = "analytics") -> None:
    response = client.post(f"/cookies/{action}/", {"cookie_groups": group})
    assert response.status_code == 302, response.content
    assert "cookie_consent" in response.cookies


def test_django_cookie_consent_accept_and_decline(
    client: Client, km_outbox: list[Command], cookie_consent: Any
) -> None:
    response = client.get("/record/")
    assert km_cookies(response) == {}
    assert km_outbox == []

    post_consent(client, "accept")
    response = client.get("/record/")
    person = unquote(response.cookies["km_ai"].value)
    assert [c.person for c in km_outbox] == [person]

    post_consent(client, "decline")
    response = client.get("/record/")
    assert response.cookies["km_ai"]["max-age"] == 0
    assert len(km_outbox) == 1


def test_django_cookie_consent_reads_the_configured_group(
    client: Client, km_outbox: list[Command], cookie_consent: Any
) -> None:
    post_consent(client, "accept")  # analytics
    cookie_consent(CONSENT_COOKIE_GROUP="stats")
    client.get("/record/")
    assert km_outbox == []
    post_consent(client, "accept", "stats")
    client.get("/record/")
    assert len(km_outbox) == 1


def test_django_cookie_consent_asks_again_when_the_group_changes(
    client: Client, km_outbox: list[Command], cookie_consent: Any
) -> None:
    from cookie_consent.models import Cookie, CookieGroup

    post_consent(client, "accept")
    client.get("/record/")
    assert len(km_outbox) == 1
    # A cookie added to the group after the visitor accepted it: their consent is stale.
    Cookie.objects.create(
        cookiegroup=CookieGroup.objects.get(varname="analytics"), name="km_ni", domain="x"
    )
    client.get("/record/")
    assert len(km_outbox) == 1


def test_django_cookie_consent_costs_no_query_before_consent(
    client: Client, cookie_consent: Any, django_assert_num_queries: Any
) -> None:
    with django_assert_num_queries(0):
        client.get("/record/")
    post_consent(client, "decline")
    with django_assert_num_queries(0):
        client.get("/record/")


# The system check.


def consent_check_ids(**overrides: Any) -> list[str]:
    from django.conf import settings
    from django.test import override_settings

    from django_kissmetrics.checks import check_settings

    with override_settings(KISSMETRICS={**settings.KISSMETRICS, **overrides}):
        return [m.id or "" for m in check_settings()]


def test_the_check_names_a_gate_that_cannot_work() -> None:
    assert consent_check_ids(CONSENT=BANNER) == []
    assert consent_check_ids(CONSENT="django_kissmetrics.consent.django_cookie_consent") == []
    assert consent_check_ids(CONSENT="tests.views.no_such_function") == ["django_kissmetrics.E004"]
    with modify_settings(INSTALLED_APPS={"remove": "cookie_consent"}):
        assert consent_check_ids(CONSENT="django_kissmetrics.consent.django_cookie_consent") == [
            "django_kissmetrics.E004"
        ]


def test_asgi_a_gate_that_queries_runs_off_the_event_loop(
    client: Client, async_client: Any, km_outbox: list[Command], cookie_consent: Any
) -> None:
    from cookie_consent.cache import delete_cache

    post_consent(client, "accept")
    async_client.cookies["cookie_consent"] = client.cookies["cookie_consent"].value
    delete_cache()  # The adapter must read the cookie groups from the database.
    response = fetch(async_client, "/async-record/")
    person = unquote(response.cookies["km_ai"].value)
    assert [(c.person, c.name) for c in km_outbox] == [(person, "Async Event")]
