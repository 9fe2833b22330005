"""``{% kissmetrics_js %}`` in Chromium: the loader, ``_kmq``, one ``km_ai`` shared with the server.

The live server delivers with the ``sync`` backend to a :class:`StandInTracker`, so the
id the server records really travels over HTTP and can be compared with the one the
browser holds. The Kissmetrics library itself is the stand-in in ``tests/browser.py``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.template.loader import render_to_string
from django.test import Client, RequestFactory

from django_kissmetrics.testing import StandInTracker
from tests.browser import BrowserPage, browser, km_page, site

__all__ = ["browser", "km_page", "site"]  # Fixtures, used by name.

KEY = "test-key"
LIBRARY_REQUESTS = ["http://i.kissmetrics.io/i.js", f"http://scripts.kissmetrics.io/{KEY}.2.js"]


@pytest.fixture
def over_http(km_settings: Any, tracker: StandInTracker) -> StandInTracker:
    """The live server delivers synchronously to the stand-in tracker."""
    km_settings(BACKEND="sync", TRACKING_URL=tracker.url)
    return tracker


def hits_named(tracker: StandInTracker, name: str, count: int = 1) -> list[Any]:
    """The tracker's hits whose ``_n`` is ``name``, once ``count`` of them arrived."""
    tracker.wait_for(count)
    return [hit for hit in tracker.hits if hit.name == name]


def log_out(km_page: BrowserPage) -> None:
    """POST /logout/ from the page, as a logout button would, and follow the redirect."""
    with km_page.page.expect_navigation():
        km_page.page.evaluate(
            """() => {
                const token = document.cookie.split("; ")
                    .find((c) => c.startsWith("csrftoken=")).slice("csrftoken=".length);
                const form = document.createElement("form");
                form.method = "post";
                form.action = "/logout/";
                const input = document.createElement("input");
                input.name = "csrfmiddlewaretoken";
                input.value = token;
                form.append(input);
                document.body.append(form);
                form.submit();
            }"""
        )


# The tag without a browser: when it must render nothing.


@pytest.mark.django_db
def test_a_tracked_visitor_gets_the_loader(client: Client) -> None:
    body = client.get("/browser/tag/").content.decode()
    assert body.startswith("[<script>\nvar _kmq = _kmq || [];\n")
    assert f'var _kmk = _kmk || "{KEY}";' in body
    assert '_kms("//scripts.kissmetrics.io/"+_kmk+".2.js");' in body
    assert body.rstrip().endswith("</script>]")


@pytest.mark.django_db
def test_the_loader_loads_the_script_urls(client: Client, km_settings: Any) -> None:
    km_settings(SCRIPT_URLS=["/km/i.js", 'https://cdn.shop.test/km/{key}.2.js?v="2"'])
    body = client.get("/browser/tag/").content.decode()
    assert '_kms("/km/i.js");\n' in body
    assert '_kms("https://cdn.shop.test/km/"+_kmk+".2.js?v=\\"2\\"");\n' in body
    assert "kissmetrics.io" not in body


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("overrides", "headers"),
    [
        pytest.param({"API_KEY": None}, {}, id="no-key"),
        pytest.param({"BACKEND": "disabled"}, {}, id="disabled"),
        pytest.param({"EXCLUDE_PATHS": ["/browser/"]}, {}, id="excluded-path"),
        pytest.param({}, {"DNT": "1"}, id="dnt"),
        pytest.param({}, {"Sec-GPC": "1"}, id="gpc"),
        pytest.param({}, {"User-Agent": "Mozilla/5.0 (compatible; Googlebot/2.1)"}, id="bot"),
    ],
)
def test_the_tag_renders_nothing_for_an_untracked_visitor(
    client: Client, km_settings: Any, overrides: dict[str, Any], headers: dict[str, str]
) -> None:
    km_settings(**overrides)
    response = client.get("/browser/tag/", headers=headers)
    assert response.status_code == 200
    assert response.content.decode().strip() == "[]"


@pytest.mark.django_db
def test_the_tag_renders_nothing_outside_a_request(rf: RequestFactory) -> None:
    assert render_to_string("browser_tag.html").strip() == "[]"
    # A request the middleware never saw (an e-mail rendered with a request in hand).
    assert render_to_string("browser_tag.html", request=rf.get("/")).strip() == "[]"


@pytest.mark.django_db
def test_the_nonce_attribute_is_configurable_and_escaped(client: Client, km_settings: Any) -> None:
    body = client.get("/browser/csp/", {"nonce": 'n"><b>'}).content.decode()
    assert '<script nonce="n&quot;&gt;&lt;b&gt;">' in body
    km_settings(CSP_NONCE_ATTRIBUTE="script_nonce")
    body = client.get("/browser/csp/", {"nonce": "abc", "attr": "script_nonce"}).content.decode()
    assert '<script nonce="abc">' in body
    body = client.get("/browser/csp/", {"nonce": "abc"}).content.decode()  # As csp_nonce.
    assert "<script>" in body
    assert "nonce=" not in body


@pytest.mark.django_db
def test_each_command_is_emitted_once_even_if_the_tag_renders_twice(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    body = client.get("/browser/tag/", {"js": 1, "twice": 1}).content.decode()
    first, second = body.strip().split("\n[")
    assert first.count('_kmq.push(["record","Saw Tag",{"n":1}]);') == 1
    assert "Saw Tag" not in second
    # A value JSON cannot hold is queued as its text: no command is lost, none fails.
    assert first.count('_kmq.push(["record","Not JSON",{"value":"\\u003Cobject object at') == 1
    assert "Not JSON" not in second
    assert "not JSON" not in caplog.text


# In Chromium.


@pytest.mark.django_db(transaction=True)
def test_loader_queue_and_cookie_match_the_server(
    km_page: BrowserPage, over_http: StandInTracker
) -> None:
    km_page.goto("/browser/commands/")
    library = km_page.library()

    assert sorted(km_page.library_requests) == LIBRARY_REQUESTS
    assert sorted(library.loads) == LIBRARY_REQUESTS
    assert library.key == KEY
    assert library.queued_json == [
        '["record","Viewed Pricing",{"plan":"pro","seats":3,"price":49.5,"trial":true,'
        '"code":"049"}]',
        '["set",{"Plan":"pro","Seats":3}]',
    ]
    assert library.commands == library.queued
    types = km_page.page.evaluate(
        """() => Object.fromEntries(Object.entries(JSON.parse(window.__km.queued[0])[2])
            .map(([name, value]) => [name, typeof value]))"""
    )
    assert types == {
        "plan": "string",
        "seats": "number",
        "price": "number",
        "trial": "boolean",
        "code": "string",
    }

    (hit,) = hits_named(over_http, "Viewed Pricing")
    raw = next(c["value"] for c in km_page.cookies("km_ai"))
    assert raw.endswith("%3D")  # Percent-encoded like encodeURIComponent, never quoted.
    assert '"' not in raw
    assert km_page.cookie("km_ai") == hit.person
    assert library.adopted == hit.person  # The library kept the server's id...
    assert library.identity == hit.person  # ...and tracks as it.
    assert len(km_page.cookies("km_ai")) == 1


@pytest.mark.django_db(transaction=True)
def test_login_identifies_and_logout_clears(
    km_page: BrowserPage, over_http: StandInTracker
) -> None:
    user = User.objects.create_user("ann", password="a-long-password-1")
    km_page.goto("/browser/page/")
    assert km_page.library().queued == []
    anonymous = km_page.cookie("km_ai")
    assert anonymous

    km_page.goto("/login/")
    km_page.page.fill("#id_username", "ann")
    km_page.page.fill("#id_password", "a-long-password-1")
    with km_page.page.expect_navigation():
        km_page.page.click("button[type=submit]")
    assert km_page.page.url == km_page.url("/")
    library = km_page.library()
    assert library.queued_json == [f'["identify","{user.pk}"]']
    assert library.identity == str(user.pk)
    (login,) = hits_named(over_http, "Logged In", 2)
    assert login.person == str(user.pk)
    (alias,) = [hit for hit in over_http.hits if hit.path == "/a"]
    assert {alias.person, alias.name} == {anonymous, str(user.pk)}

    log_out(km_page)
    assert km_page.page.url == km_page.url("/")
    library = km_page.library()
    assert library.queued_json == ['["clearIdentity"]']
    assert library.identity not in (str(user.pk), anonymous)
    assert km_page.cookie("km_ni") is None
    assert len(km_page.cookies("km_ai")) == 1

    km_page.goto("/browser/page/")
    assert km_page.library().queued == []  # Emitted once, and no identify any more.
    km_page.goto("/record/?event=After+Logout")
    (after,) = hits_named(over_http, "After Logout", 3)
    assert after.person == km_page.cookie("km_ai") == library.identity


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("configured", "domain"),
    [(None, "www.shop.test"), (".shop.test", ".shop.test")],
    ids=["host", "setting"],
)
def test_one_km_ai_on_a_real_host(
    km_page: BrowserPage,
    over_http: StandInTracker,
    km_settings: Any,
    configured: str | None,
    domain: str,
) -> None:
    km_settings(COOKIE_DOMAIN=configured)
    response = km_page.goto("/browser/commands/", host="www.shop.test")
    set_cookie = response.header_value("set-cookie") or ""
    assert re.search(rf"km_ai=[^;]+;.*Domain={re.escape(domain)};", set_cookie)
    assert f'var KM_COOKIE_DOMAIN = "{domain}";' in response.text()

    library = km_page.library()
    assert library.cookie_domain == domain
    assert re.fullmatch(
        rf"km_ai=[^;]+; path=/; expires=[^;]+; domain={re.escape(domain)}", library.writes[0]
    )

    (cookie,) = km_page.cookies("km_ai")
    assert cookie["domain"] == "." + domain.lstrip(".")
    assert cookie["path"] == "/"
    (hit,) = hits_named(over_http, "Viewed Pricing")
    assert km_page.cookie("km_ai") == hit.person == library.identity


@pytest.mark.django_db(transaction=True)
def test_a_library_cookie_on_another_domain_would_be_a_second_km_ai(
    km_page: BrowserPage,
) -> None:
    """Why KM_COOKIE_DOMAIN matters: without it the library writes for the whole site."""
    km_page.goto("/browser/page/", host="www.shop.test")
    km_page.library()
    assert len(km_page.cookies("km_ai")) == 1
    km_page.page.evaluate("() => { document.cookie = 'km_ai=other; path=/; domain=.shop.test'; }")
    assert sorted(c["domain"] for c in km_page.cookies("km_ai")) == [".shop.test", ".www.shop.test"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_one_host_only_km_ai_on_localhost_and_ip_hosts(
    km_page: BrowserPage, over_http: StandInTracker, host: str
) -> None:
    response = km_page.goto("/browser/commands/", host=host)
    set_cookie = response.header_value("set-cookie") or ""
    assert "km_ai=" in set_cookie
    assert "Domain=" not in set_cookie
    assert "KM_COOKIE_DOMAIN" not in response.text()

    library = km_page.library()
    assert library.cookie_domain is None
    assert "domain=" not in library.writes[0]
    (cookie,) = km_page.cookies("km_ai")
    assert cookie["domain"] == host  # Host-only.
    (hit,) = hits_named(over_http, "Viewed Pricing")
    assert km_page.cookie("km_ai") == hit.person == library.identity


@pytest.mark.django_db(transaction=True)
def test_browser_commands_before_a_redirect_are_emitted_once(km_page: BrowserPage) -> None:
    km_page.goto("/js/")
    assert km_page.page.url == km_page.url("/")
    library = km_page.library()
    assert library.queued_json == ['["record","Clicked Buy",{"plan":"pro","amount":49}]']
    assert library.commands == library.queued

    km_page.goto("/")
    assert km_page.library().queued == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("policy", ["strict-dynamic", "hosts"])
def test_the_inline_script_runs_under_a_nonce_csp(km_page: BrowserPage, policy: str) -> None:
    response = km_page.goto(f"/browser/csp/?policy={policy}")
    header = response.header_value("content-security-policy") or ""
    match = re.search(r"'nonce-([^']+)'", header)
    assert match
    assert f'<script nonce="{match[1]}">' in response.text()

    library = km_page.library()
    assert sorted(km_page.library_requests) == LIBRARY_REQUESTS
    assert library.key == KEY
    assert not [m for m in km_page.console if "Content Security Policy" in m]


@pytest.mark.django_db(transaction=True)
def test_without_the_nonce_the_policy_blocks_the_script(km_page: BrowserPage) -> None:
    """The control for the CSP test: the same policy, but the request has no nonce."""
    response = km_page.goto("/browser/csp/?nonce=0")
    assert "<script>" in response.text()
    km_page.page.wait_for_load_state("load")
    assert km_page.page.evaluate("() => typeof window._kmq") == "undefined"
    assert km_page.library_requests == []
    assert [m for m in km_page.console if "Content Security Policy" in m]


@pytest.mark.django_db(transaction=True)
def test_one_km_ai_and_one_person_through_login_later_pages_and_logout(
    km_page: BrowserPage, over_http: StandInTracker
) -> None:
    """With the library writing the named identity into km_ai, as the real one does."""
    host = "www.shop.test"
    user = User.objects.create_user("ann", password="a-long-password-1")
    me = str(user.pk)
    documents: list[Any] = []
    km_page.page.on(
        "response", lambda r: documents.append(r) if r.request.resource_type == "document" else None
    )

    def km_ai_set_since(start: int) -> list[str]:
        return [
            value
            for response in documents[start:]
            for value in response.header_values("set-cookie")
            if value.startswith("km_ai=")
        ]

    km_page.goto("/browser/page/", host)
    km_page.library()
    anonymous = km_page.cookie("km_ai")
    assert anonymous

    km_page.goto("/login/", host)
    km_page.page.fill("#id_username", "ann")
    km_page.page.fill("#id_password", "a-long-password-1")
    with km_page.page.expect_navigation():
        km_page.page.click("button[type=submit]")
    library = km_page.library()
    assert library.aliases == [[anonymous, me]]  # The same pair the server sent.
    assert km_page.cookie("km_ni") == me

    # Later pages: from the second identified page on, km_ai holds the named identity.
    later = len(documents)
    for n in range(4):
        km_page.goto(f"/record/?event=Page+{n}", host)
        km_page.goto("/browser/page/", host)
        library = km_page.library()
        assert library.identity == me
        assert library.aliases == []
        assert len(km_page.cookies("km_ai")) == 1
    assert km_page.cookie("km_ai") == me
    assert km_ai_set_since(later) == []  # No tug of war with the library.
    pages = hits_named(over_http, "Page 3", 6)
    assert {h.person for h in over_http.hits if h.path == "/e"} == {me}
    assert [(h.person, h.name) for h in over_http.hits if h.path == "/a"] == [(anonymous, me)]
    assert pages[0].person == me

    log_out(km_page)
    library = km_page.library()
    fresh = km_page.cookie("km_ai")
    assert fresh not in (None, me, anonymous)
    assert library.identity == fresh  # clearIdentity found no km_ni: the server's id stays.
    assert km_page.cookie("km_ni") is None
    assert len(km_page.cookies("km_ai")) == 1

    after = len(documents)
    km_page.goto("/record/?event=Next+Visitor", host)
    km_page.goto("/browser/page/", host)
    assert km_page.library().identity == fresh
    (hit,) = hits_named(over_http, "Next Visitor", 7)
    assert hit.person == fresh
    assert km_ai_set_since(after) == []
    assert len(km_page.cookies("km_ai")) == 1
    assert [h.path for h in over_http.hits].count("/a") == 1


@pytest.mark.django_db(transaction=True)
def test_the_next_visitor_after_a_session_ends_without_logout_is_someone_new(
    km_page: BrowserPage, over_http: StandInTracker
) -> None:
    """The session expires while km_ai and km_ni hold the user's identity."""
    host = "www.shop.test"
    user = User.objects.create_user("ann", password="a-long-password-1")
    me = str(user.pk)
    km_page.goto("/login/", host)
    km_page.page.fill("#id_username", "ann")
    km_page.page.fill("#id_password", "a-long-password-1")
    with km_page.page.expect_navigation():
        km_page.page.click("button[type=submit]")
    km_page.library()
    km_page.goto("/browser/page/", host)
    km_page.library()
    assert km_page.cookie("km_ai") == km_page.cookie("km_ni") == me

    kept = [c for c in km_page.context.cookies() if c["name"] != "sessionid"]
    km_page.context.clear_cookies()
    km_page.context.add_cookies(kept)  # type: ignore[arg-type]
    km_page.goto("/record/?event=Someone+Else", host)
    km_page.goto("/browser/page/", host)
    library = km_page.library()
    fresh = km_page.cookie("km_ai")
    assert fresh not in (None, me)
    assert km_page.cookie("km_ni") is None
    assert library.identity == fresh  # The library no longer tracks this browser as ann.
    (hit,) = hits_named(over_http, "Someone Else", 3)
    assert hit.person == fresh
    assert len(km_page.cookies("km_ai")) == 1
    assert [(h.person, h.name) for h in over_http.hits if h.path == "/a"] == [
        (over_http.hits[0].person, me)
    ]
