"""Triggers (``km.js.track_*`` and the template tags) and the library's ``KM_*`` switches.

The Chromium tests load the demo's stand-in library (``example_project/shop/static/shop/
kmq.js``), which sends to a :class:`StandInTracker` as the real library sends to
Kissmetrics: clicking, submitting and leaving by an outbound link must arrive there under
the visitor's ``km_ai``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.template import Context, Template
from django.test import Client, RequestFactory

from django_kissmetrics import km
from django_kissmetrics.conf import load
from django_kissmetrics.testing import StandInTracker
from tests.browser import BrowserPage, browser, km_page, site, wait_for_library

__all__ = ["browser", "km_page", "site"]  # Fixtures, used by name.

KMQ_JS = Path(__file__).parent.parent / "example_project" / "shop" / "static" / "shop" / "kmq.js"


def pushes(body: str) -> list[Any]:
    """Every ``_kmq.push([...])`` of a page, decoded."""
    return [json.loads(m) for m in re.findall(r"_kmq\.push\((\[.*?\])\);", body)]


# Declared from templates and from Python.


@pytest.mark.django_db
def test_the_tags_declare_each_trigger_where_the_element_is(client: Client) -> None:
    body = client.get("/browser/triggers/").content.decode()
    assert pushes(body) == [
        ["trackClick", "#buy", "Clicked Buy", {"plan": "pro", "seats": 3}],
        ["trackSubmit", "#signup", "Submitted Signup", {"form": "signup"}],
        ["trackClickOnOutboundLink", ".outbound", "Left For Partner", {}],
    ]
    # Each right after its element, a script of its own that works before or after the loader.
    assert (
        '<button id="buy" type="button">Buy</button>\n<script>var _kmq = _kmq || [];'
        '_kmq.push(["trackClick"'
    ) in body


@pytest.mark.django_db
def test_km_js_triggers_queue_like_record_through_a_redirect(client: Client) -> None:
    body = client.get("/browser/triggers/", {"python": 1}).content.decode()
    assert ["trackClick", "buy", "Pressed Buy", {"from": "view"}] in pushes(body)


@pytest.mark.django_db
def test_trigger_values_are_escaped_like_record(client: Client, rf: RequestFactory) -> None:
    client.get("/browser/page/")  # A tracked visitor with a tracker on request.km.
    request = rf.get("/")
    from django_kissmetrics.tracker import RequestTracker

    request.km = RequestTracker(request)  # type: ignore[attr-defined]
    html = Template(
        '{% load kissmetrics %}{% kissmetrics_track_click "#buy" "</script><b>" note="<!--" %}'
    ).render(Context({"request": request}))
    assert "</script><b>" not in html
    assert "<!--" not in html
    assert "\\u003C/script\\u003E\\u003Cb\\u003E" in html
    assert request.km.triggers == [  # type: ignore[attr-defined]
        ["trackClick", "#buy", "</script><b>", {"note": "<!--"}]
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("overrides", "headers"),
    [
        pytest.param({"API_KEY": None}, {}, id="no-key"),
        pytest.param({}, {"DNT": "1"}, id="dnt"),
        pytest.param({}, {"User-Agent": "Mozilla/5.0 (compatible; Googlebot/2.1)"}, id="bot"),
        pytest.param({"CONSENT": "tests.views.banner_consent"}, {}, id="before-consent"),
    ],
)
def test_no_trigger_for_a_visitor_who_is_not_tracked(
    client: Client, km_settings: Any, overrides: dict[str, Any], headers: dict[str, str]
) -> None:
    km_settings(**overrides)
    body = client.get("/browser/triggers/", {"python": 1}, headers=headers).content.decode()
    assert "track" not in "".join(re.findall(r"<script[^>]*>(.*?)</script>", body, re.S))


@pytest.mark.parametrize(
    "selector", ["form#signup", "button.buy", "#a b", "[data-buy]", "", "a > b", 7]
)
def test_a_selector_the_library_cannot_read_is_refused(rf: RequestFactory, selector: Any) -> None:
    from django_kissmetrics.tracker import RequestTracker

    request = rf.get("/")
    tracker = RequestTracker(request)
    with pytest.raises(ValueError, match="element id"):
        tracker.js.track_submit(selector, "Submitted")
    with pytest.raises(ValueError, match="element id"):
        Template("{% load kissmetrics %}{% kissmetrics_track_click selector 'Clicked' %}").render(
            Context({"request": request, "selector": selector})
        )


def test_a_trigger_needs_an_event_name(rf: RequestFactory) -> None:
    from django_kissmetrics.tracker import RequestTracker

    tracker = RequestTracker(rf.get("/"))
    with pytest.raises(ValueError, match="must not be empty"):
        tracker.js.track_click("#buy", " ")


def test_km_js_triggers_need_a_request() -> None:
    with pytest.raises(ValueError, match="needs a request"):
        km.js.track_click("#buy", "Clicked Buy")


# The library's switches.


@pytest.mark.django_db
def test_the_tag_sets_the_library_switches_before_the_loader(
    client: Client, km_settings: Any
) -> None:
    body = client.get("/browser/tag/").content.decode()
    # Form fields are never captured unless the site asks for it.
    assert "var KM_SKIP_FORM_FIELDS = 1;\nfunction _kms(u)" in body
    km_settings(LIBRARY_SETTINGS={"KM_SKIP_FORM_FIELDS": False, "KM_SKIP_PAGE_VIEW": True})
    body = client.get("/browser/tag/").content.decode()
    assert "var KM_SKIP_FORM_FIELDS = 0;\nvar KM_SKIP_PAGE_VIEW = 1;\nfunction _kms(u)" in body


@pytest.mark.django_db
def test_the_inert_loader_carries_the_switches_too(client: Client, km_settings: Any) -> None:
    km_settings(CONSENT="tests.views.banner_consent", AUTO_EVENTS=["Visited Site"])
    body = client.get("/browser/tag/").content.decode()
    assert 'type="text/plain"' in body
    assert "var KM_SKIP_VISITED_SITE = 1;" in body


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"KM_SKIP_EVERYTHING": True}, "'KM_SKIP_EVERYTHING', which the library does not read"),
        ({"KM_COOKIE_DOMAIN": ".shop.test"}, "from COOKIE_DOMAIN"),
        ({"KM_SKIP_URL": "yes"}, "must be True or False"),
        ({"KM_SKIP_URL": 2}, "must be True or False"),
        ("KM_SKIP_URL", "must be dict"),
    ],
)
def test_library_settings_are_checked_against_what_the_library_reads(
    value: Any, message: str
) -> None:
    with pytest.raises(Exception, match=r"\['LIBRARY_SETTINGS'\].*" + re.escape(message)):
        load({"LIBRARY_SETTINGS": value})


def test_a_switch_may_not_undo_an_auto_event() -> None:
    with pytest.raises(Exception, match="would count it a second time"):
        load({"AUTO_EVENTS": ["Referrer"], "LIBRARY_SETTINGS": {"KM_SKIP_REFERRER": False}})


# In Chromium, with the demo's stand-in library sending to a stand-in tracker.


@pytest.fixture
def kmq_page(
    km_page: BrowserPage, tracker: StandInTracker, km_settings: Any, request: Any
) -> BrowserPage:
    """A page whose tag loads ``kmq.js``, sending to ``tracker``; server events go there too."""
    km_settings(
        BACKEND="sync",
        TRACKING_URL=tracker.url,
        SCRIPT_URLS=[f"/km/kmq.js?url={quote(tracker.url, safe='')}", "/km/site.js"],
    )
    script = KMQ_JS.read_text()
    km_page.page.route(
        "**/km/kmq.js*",
        lambda route: route.fulfill(content_type="application/javascript", body=script),
    )
    km_page.page.route(
        "**/km/site.js", lambda route: route.fulfill(content_type="application/javascript")
    )
    return km_page


def open_triggers(page: BrowserPage, query: str = "") -> None:
    """The triggers page, loaded and its triggers bound."""
    page.goto(f"/browser/triggers/{query}")
    page.page.wait_for_load_state("load")
    wait_for_library(page.page)


def submit(page: BrowserPage) -> None:
    """Submit the sign-up form and wait for the page it goes to."""
    with page.page.expect_navigation():
        page.page.click("#signup button")


def browser_hits(tracker: StandInTracker, name: str, count: int = 1) -> list[Any]:
    """The events called ``name`` once ``count`` of them arrived (or the wait ran out)."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [hit for hit in tracker.hits if hit.name == name]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    return [hit for hit in tracker.hits if hit.name == name]


@pytest.mark.django_db(transaction=True)
def test_clicking_records_under_the_visitors_km_ai(
    kmq_page: BrowserPage, tracker: StandInTracker
) -> None:
    open_triggers(kmq_page, "?python=1")
    kmq_page.page.click("#buy")
    clicked = browser_hits(tracker, "Clicked Buy")
    pressed = browser_hits(tracker, "Pressed Buy")
    assert len(clicked) == len(pressed) == 1
    visitor = kmq_page.cookie("km_ai")
    assert visitor
    assert clicked[0].person == pressed[0].person == visitor
    assert clicked[0].properties == {"plan": "pro", "seats": "3"}
    assert pressed[0].properties == {"from": "view"}
    assert browser_hits(tracker, "Submitted Signup", 0) == []  # Only what was clicked.
    assert kmq_page.errors == []


@pytest.mark.django_db(transaction=True)
def test_submitting_records_without_the_form_fields_by_default(
    kmq_page: BrowserPage, tracker: StandInTracker
) -> None:
    open_triggers(kmq_page)
    submit(kmq_page)
    (hit,) = browser_hits(tracker, "Submitted Signup")
    assert hit.person == kmq_page.cookie("km_ai")
    assert hit.properties == {"form": "signup"}


@pytest.mark.django_db(transaction=True)
def test_asked_for_fields_never_include_passwords_or_cards(
    kmq_page: BrowserPage, tracker: StandInTracker, km_settings: Any
) -> None:
    km_settings(LIBRARY_SETTINGS={"KM_SKIP_FORM_FIELDS": False})
    open_triggers(kmq_page)
    submit(kmq_page)
    (hit,) = browser_hits(tracker, "Submitted Signup")
    assert hit.properties == {"form": "signup", "nickname": "ann", "plan": "team"}
    assert "hunter2" not in str(hit.params)
    assert "4111111111111111" not in str(hit.params)


@pytest.mark.django_db(transaction=True)
def test_an_outbound_link_records_then_still_navigates(
    kmq_page: BrowserPage, tracker: StandInTracker
) -> None:
    import time

    open_triggers(kmq_page)
    started = time.monotonic()
    with kmq_page.page.expect_navigation():
        kmq_page.page.click("#partner")
    # The library holds the navigation back about 250 ms, so that the hit leaves first.
    assert time.monotonic() - started >= 0.25
    assert kmq_page.page.url == kmq_page.url("/browser/page/?from=partner")
    (hit,) = browser_hits(tracker, "Left For Partner")
    assert hit.person == kmq_page.cookie("km_ai")


# The debug-toolbar panel.


@pytest.mark.django_db
def test_the_toolbar_panel_shows_triggers_and_automatic_events(
    client: Client, km_settings: Any
) -> None:
    from django.test import override_settings

    from tests.panel_site import TOOLBAR_SETTINGS
    from tests.test_panel import panel_after

    km_settings(AUTO_EVENTS=["Visited Site", "Ad Campaign Hit", "Referrer"])
    with override_settings(**TOOLBAR_SETTINGS):
        shown = panel_after(
            client,
            "/browser/triggers/?python=1&utm_source=demo",
            HTTP_REFERER="https://news.example/story",
        )
        assert (
            "Triggers declared Declared on this request with km.js.track_* or the trigger tags; "
            "the library records each when its element is pressed, submitted or followed. "
            '_kmq.push(...) ["trackClick","buy","Pressed Buy",{"from":"view"}] '
            '["trackClick","#buy","Clicked Buy",{"plan":"pro","seats":3}] '
            '["trackSubmit","#signup","Submitted Signup",{"form":"signup"}] '
            '["trackClickOnOutboundLink",".outbound","Left For Partner",{}]'
        ) in shown
        url = "http://testserver/browser/triggers/?python=1&utm_source=demo"
        assert (
            "Automatic events (AUTO_EVENTS) Recorded by the middleware on this request, the "
            "first of a visit or one carrying a campaign. Kind Event Properties "
            f"record Visited Site URL={url} Referrer=https://news.example/story "
            f"record Ad Campaign Hit Campaign Source=demo URL={url} "
            "set Referrer=https://news.example/story Person"
        ) in shown
        # Inside the visit: nothing automatic, and the panel says so.
        shown = panel_after(client, "/browser/page/")
        assert "Triggers declared None. Automatic events (AUTO_EVENTS) None. Person" in shown


# Counted once: the server's acquisition events and the library's own.


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("server_side", [False, True], ids=["library", "server"])
def test_a_visit_is_counted_once_whoever_records_it(
    kmq_page: BrowserPage, tracker: StandInTracker, km_settings: Any, server_side: bool
) -> None:
    if server_side:
        km_settings(AUTO_EVENTS=["Visited Site"])
    for _ in range(3):  # Three pages of one visit.
        kmq_page.goto("/browser/page/")
        kmq_page.page.wait_for_function(
            "() => document.cookie.includes('km_vs=') || window.KM_SKIP_VISITED_SITE"
        )
    kmq_page.goto("/record/?event=Done")
    hits = browser_hits(tracker, "Done")
    assert hits
    visits = browser_hits(tracker, "Visited Site")  # The library's fetch may come last.
    assert len(visits) == 1
    assert visits[0].person == kmq_page.cookie("km_ai")
    assert visits[0].properties["URL"] == kmq_page.url("/browser/page/")
    assert visits[0].properties["Referrer"] == "Direct"
