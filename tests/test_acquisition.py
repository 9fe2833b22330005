"""``AUTO_EVENTS``: Visited Site, Ad Campaign Hit, Search Engine Hit and Referrer, by the server.

Through the real middleware stack with the ``locmem`` backend; the visit's time is moved by
replacing the clock of ``django_kissmetrics.acquisition`` (the cookie's stamp is read
against it), as a browser coming back 10 or 31 minutes later would find it.
"""

from __future__ import annotations

import time
import types
from typing import Any
from urllib.parse import unquote

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.test import Client

from django_kissmetrics import acquisition
from django_kissmetrics.acquisition import VISIT_COOKIE, search_engine
from django_kissmetrics.commands import Command

ALL = ["Visited Site", "Ad Campaign Hit", "Search Engine Hit", "Referrer"]
CAMPAIGN = (
    "utm_source=newsletter&utm_medium=email&utm_campaign=launch&utm_term=red+shoes&utm_content=top"
)
GOOGLE = "https://www.google.com/search?q=red+shoes"

pytestmark = pytest.mark.django_db


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``clock.now``: the acquisition module's time, in Unix seconds; move it with ``+=``."""
    state = types.SimpleNamespace(now=time.time())
    monkeypatch.setattr(acquisition, "time", types.SimpleNamespace(time=lambda: state.now))
    return state


@pytest.fixture
def auto(km_settings: Any, km_outbox: list[Command]) -> list[Command]:
    """Every AUTO_EVENTS item on; the outbox of what was sent."""
    km_settings(BACKEND="locmem", AUTO_EVENTS=ALL)
    return km_outbox


def sent(outbox: list[Command]) -> list[tuple[str, str | None, dict[str, str]]]:
    """(kind, event name, properties) of every command sent, and empty the outbox."""
    out = [(c.kind, c.name, dict(c.properties)) for c in outbox]
    outbox.clear()
    return out


def names(outbox: list[Command]) -> list[str | None]:
    return [name for _kind, name, _props in sent(outbox)]


def test_a_first_visit_from_a_campaign_and_google_records_each_once(
    client: Client, auto: list[Command], clock: Any
) -> None:
    url = f"http://testserver/nothing/?{CAMPAIGN}"
    response = client.get(f"/nothing/?{CAMPAIGN}", headers={"Referer": GOOGLE})
    person = unquote(response.cookies["km_ai"].value)
    assert {c.person for c in auto} == {person}
    assert {c.timestamp for c in auto} == {int(clock.now)}
    assert sent(auto) == [
        ("record", "Visited Site", {"URL": url, "Referrer": GOOGLE}),
        ("record", "Search Engine Hit", {"Search Engine": "Google", "Search Terms": "red shoes"}),
        (
            "record",
            "Ad Campaign Hit",
            {
                "Campaign Source": "newsletter",
                "Campaign Medium": "email",
                "Campaign Name": "launch",
                "Campaign Terms": "red shoes",
                "Campaign Content": "top",
                "URL": url,
            },
        ),
        ("set", None, {"Referrer": GOOGLE}),
    ]
    visit = response.cookies[VISIT_COOKIE]
    assert visit["max-age"] == 1800
    assert visit["path"] == "/"
    assert visit.value.startswith(f"{int(clock.now)}.")

    # Ten minutes later, the same landing page again (a reload, a back button): nothing new.
    clock.now += 600
    client.get(f"/nothing/?{CAMPAIGN}", headers={"Referer": GOOGLE})
    client.get("/nothing/")
    assert sent(auto) == []

    # 31 minutes after the last request the visit is over: a new one starts.
    clock.now += 31 * 60
    client.get("/nothing/", headers={"Referer": "http://testserver/pricing/"})
    assert sent(auto) == [
        (
            "record",
            "Visited Site",
            {"URL": "http://testserver/nothing/", "Referrer": "http://testserver/pricing/"},
        )
    ]


def test_a_visit_lasts_while_the_visitor_is_active(
    client: Client, auto: list[Command], clock: Any
) -> None:
    client.get("/nothing/")
    assert names(auto) == ["Visited Site"]
    for _ in range(4):  # Two hours of a request every 25 minutes: one visit.
        clock.now += 25 * 60
        response = client.get("/nothing/")
        # Seen again: the cookie is moved on, so the visit ends 30 minutes from now.
        assert response.cookies[VISIT_COOKIE].value == str(int(clock.now))
    assert names(auto) == []
    clock.now += 30  # The cookie is rewritten at most once a minute.
    assert VISIT_COOKIE not in client.get("/nothing/").cookies


def test_a_campaign_link_that_redirects_is_counted_on_its_first_url(
    client: Client, auto: list[Command], clock: Any
) -> None:
    response = client.get("/js/?utm_source=ads&gclid=abc123", headers={"Referer": GOOGLE})
    assert response.status_code == 302
    recorded = sent(auto)
    assert [name for _kind, name, _props in recorded] == [
        "Visited Site",
        "Ad Campaign Hit",
        None,
    ]
    # A Google click with gclid is a paid one: part of the campaign hit, as the library has it.
    assert recorded[1][2] == {
        "Campaign Source": "ads",
        "gclid": "abc123",
        "URL": "http://testserver/js/?utm_source=ads&gclid=abc123",
        "Search Engine": "Google",
        "Search Terms": "red shoes",
    }
    client.get("/", headers={"Referer": GOOGLE})  # The redirect's target keeps the Referer.
    assert sent(auto) == []


def test_a_new_campaign_inside_a_visit_is_a_campaign_hit_not_a_visit(
    client: Client, auto: list[Command], clock: Any
) -> None:
    client.get("/nothing/")
    assert names(auto) == ["Visited Site"]
    clock.now += 60
    client.get("/nothing/?utm_source=twitter")
    assert names(auto) == ["Ad Campaign Hit"]
    client.get("/nothing/?utm_source=twitter")
    assert names(auto) == []


@pytest.mark.parametrize(
    ("referrer", "expected"),
    [
        (None, [("Visited Site", {"Referrer": "Direct"})]),
        (
            "http://testserver/pricing/",
            [("Visited Site", {"Referrer": "http://testserver/pricing/"})],
        ),
        (
            "https://news.example/story",
            [
                ("Visited Site", {"Referrer": "https://news.example/story"}),
                (None, {"Referrer": "https://news.example/story"}),
            ],
        ),
        (
            "https://duckduckgo.com/",
            [
                ("Visited Site", {"Referrer": "https://duckduckgo.com/"}),
                ("Search Engine Hit", {"Search Engine": "DuckDuckGo"}),
                (None, {"Referrer": "https://duckduckgo.com/"}),
            ],
        ),
    ],
    ids=["direct", "this-site", "another-site", "search-engine-without-terms"],
)
def test_where_a_visitor_came_from(
    client: Client, auto: list[Command], referrer: str | None, expected: list[Any]
) -> None:
    headers = {"Referer": referrer} if referrer else {}
    client.get("/nothing/", headers=headers)
    got = [(name, {k: v for k, v in props.items() if k != "URL"}) for _k, name, props in sent(auto)]
    assert got == expected


@pytest.mark.parametrize(
    ("referrer", "engine"),
    [
        ("https://www.google.co.uk/search?q=shoes", ("Google", "shoes")),
        ("https://google.de/", ("Google", "")),
        ("https://www.bing.com/search?q=shoes", ("Bing", "shoes")),
        ("https://search.yahoo.com/search?p=shoes", ("Yahoo", "shoes")),
        ("https://duckduckgo.com/?q=shoes", ("DuckDuckGo", "shoes")),
        ("https://yandex.ru/search/?text=shoes", ("Yandex", "shoes")),
        ("https://www.baidu.com/s?wd=shoes", ("Baidu", "shoes")),
        ("https://www.ecosia.org/search?q=shoes", ("Ecosia", "shoes")),
        ("https://www.google.com.evil.example/?q=x", None),
        ("https://notgoogle.com/?q=x", None),
        ("https://news.example/", None),
        ("not a url at all", None),
        ("http://[::1/", None),
    ],
)
def test_search_engines(referrer: str, engine: tuple[str, str] | None) -> None:
    assert search_engine(referrer) == engine


@pytest.mark.parametrize("item", ALL)
def test_each_item_is_separate(
    client: Client, km_settings: Any, km_outbox: list[Command], item: str
) -> None:
    km_settings(BACKEND="locmem", AUTO_EVENTS=[item])
    client.get(f"/nothing/?{CAMPAIGN}", headers={"Referer": GOOGLE})
    expected = None if item == "Referrer" else item
    assert names(km_outbox) == [expected]
    body = client.get("/browser/tag/").content.decode()
    switches = {
        "Visited Site": "KM_SKIP_VISITED_SITE",
        "Ad Campaign Hit": "KM_SKIP_UTM",
        "Search Engine Hit": "KM_SKIP_SEARCH_ENGINE",
        "Referrer": "KM_SKIP_REFERRER",
    }
    for other, switch in switches.items():
        assert (f"var {switch} = 1;" in body) == (other == item)


def test_the_tag_tells_the_library_to_skip_what_the_server_records(
    client: Client, auto: list[Command]
) -> None:
    body = client.get(f"/browser/tag/?{CAMPAIGN}", headers={"Referer": GOOGLE}).content.decode()
    assert names(auto) == ["Visited Site", "Search Engine Hit", "Ad Campaign Hit", None]
    for switch in ("VISITED_SITE", "UTM", "SEARCH_ENGINE", "REFERRER", "FORM_FIELDS"):
        assert f"var KM_SKIP_{switch} = 1;\n" in body
    assert body.index("KM_SKIP_VISITED_SITE") < body.index("function _kms")


@pytest.mark.parametrize(
    ("overrides", "headers"),
    [
        pytest.param({}, {"User-Agent": "Mozilla/5.0 (compatible; Googlebot/2.1)"}, id="bot"),
        pytest.param({}, {"DNT": "1"}, id="dnt"),
        pytest.param({}, {"Sec-GPC": "1"}, id="gpc"),
        pytest.param({"EXCLUDE_PATHS": ["/nothing/"]}, {}, id="excluded-path"),
        pytest.param({"CONSENT": "tests.views.banner_consent"}, {}, id="before-consent"),
    ],
)
def test_none_for_a_visitor_who_is_not_tracked(
    client: Client,
    auto: list[Command],
    km_settings: Any,
    overrides: dict[str, Any],
    headers: dict[str, str],
) -> None:
    km_settings(**overrides)
    response = client.get(f"/nothing/?{CAMPAIGN}", headers={"Referer": GOOGLE, **headers})
    assert auto == []
    assert VISIT_COOKIE not in response.cookies


def test_after_consent_the_next_request_starts_the_visit(
    client: Client, auto: list[Command], km_settings: Any
) -> None:
    km_settings(CONSENT="tests.views.banner_consent")
    client.get("/nothing/")
    assert auto == []
    client.cookies["analytics_consent"] = "yes"
    client.get("/nothing/?utm_source=banner")
    assert names(auto) == ["Visited Site", "Ad Campaign Hit"]
    # Withdrawn: the visit cookie goes with the library's other km_* cookies.
    client.cookies["analytics_consent"] = "no"
    response = client.get("/nothing/")
    assert response.cookies[VISIT_COOKIE]["max-age"] == 0


@pytest.mark.parametrize("value", ["", "abc", "1.", "99999999999", "-5", "1" * 40, "12.zz"])
def test_a_visit_cookie_the_visitor_wrote_is_not_trusted(
    client: Client, auto: list[Command], clock: Any, value: str
) -> None:
    client.cookies[VISIT_COOKIE] = value
    response = client.get("/nothing/")
    assert response.status_code == 200
    assert names(auto) == ["Visited Site"]
    assert response.cookies[VISIT_COOKIE].value == str(int(clock.now))


def test_a_web_server_whose_clock_is_behind_continues_the_visit(
    client: Client, auto: list[Command], clock: Any
) -> None:
    client.get("/nothing/")
    assert names(auto) == ["Visited Site"]
    clock.now -= 5  # The next request lands on a server five seconds behind.
    response = client.get("/nothing/")
    assert names(auto) == []
    assert VISIT_COOKIE not in response.cookies


@pytest.mark.parametrize("referrer", ["http://[::1/", "not a url", "https://", "\x00\xff"])
def test_a_referrer_that_is_not_a_url_is_kept_as_sent(
    client: Client, auto: list[Command], referrer: str, caplog: pytest.LogCaptureFixture
) -> None:
    response = client.get("/nothing/", headers={"Referer": referrer})
    assert response.status_code == 200
    (visit,) = [props for _kind, name, props in sent(auto) if name == "Visited Site"]
    assert visit["Referrer"] == referrer
    assert "Kissmetrics" not in caplog.text


def test_a_host_django_refuses_costs_no_error_log(
    client: Client, auto: list[Command], caplog: pytest.LogCaptureFixture
) -> None:
    from django.conf import settings
    from django.test import override_settings

    # Without CommonMiddleware nothing asks Django about the host before this package does.
    stack = [m for m in settings.MIDDLEWARE if not m.endswith("CommonMiddleware")]
    with override_settings(ALLOWED_HOSTS=["shop.test"], MIDDLEWARE=stack):
        response = client.get("/nothing/", headers={"Host": "evil.example"})
    assert response.status_code == 200
    assert names(auto) == []  # No URL to record: nothing, rather than a wrong one.
    assert "could not work out" not in caplog.text


def test_recorded_for_the_logged_in_user(client: Client, auto: list[Command]) -> None:
    user = User.objects.create_user("ann", password="pw")
    client.force_login(user)
    client.get("/nothing/", headers={"Referer": GOOGLE})
    assert {c.person for c in auto} == {str(user.pk)}


def test_no_query_for_an_anonymous_visitor(
    client: Client, auto: list[Command], django_assert_num_queries: Any
) -> None:
    with django_assert_num_queries(0):
        client.get(f"/nothing/?{CAMPAIGN}", headers={"Referer": GOOGLE})
    assert len(auto) == 4


def test_asgi(async_client: Any, auto: list[Command]) -> None:
    async def get() -> Any:
        return await async_client.get("/async-record/?utm_source=asgi", headers={"Referer": GOOGLE})

    response = async_to_sync(get)()
    person = unquote(response.cookies["km_ai"].value)
    assert sorted((c.person, c.name or "") for c in auto) == [
        (person, ""),
        (person, "Ad Campaign Hit"),
        (person, "Async Event"),
        (person, "Search Engine Hit"),
        (person, "Visited Site"),
    ]
    assert VISIT_COOKIE in response.cookies
