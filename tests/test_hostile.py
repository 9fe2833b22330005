"""Hostile input: whatever a visitor can type or forge, through the middleware and ``km``.

Arbitrary text (control characters, the neighbours of the surrogate block U+D7FF and
U+E000, U+FFFF, lone surrogates, text far over every limit) as cookie values, identities,
event names, property names and values. A visitor never gets a 500 for it, ``km`` never
raises in a view for it, and what reaches the tracker decodes back to exactly what was sent
after the normalisation the README documents, which ``expected_*`` below restate on their
own: lone surrogates become U+FFFD; names and identities are stripped of surrounding
whitespace and cut to 255 characters (and never end in whitespace after the cut); commas
and colons in property names become spaces, and a property whose name then is a transport
field (``_k _p _n _t _d``) is dropped; values are cut to 8192 UTF-8 bytes (never in the
middle of a character).

The module is also the URLconf of its views (``pytest.mark.urls``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_plus, unquote, urlencode

import pytest
from django.contrib.auth import login
from django.contrib.auth.models import User
from django.core.handlers.wsgi import get_str_from_wsgi
from django.http import HttpRequest, HttpResponse, HttpResponseBase, parse_cookie
from django.test import Client
from django.urls import path
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from django_kissmetrics import km
from django_kissmetrics.client import KissmetricsClient
from django_kissmetrics.commands import Command
from django_kissmetrics.conf import get_settings
from django_kissmetrics.testing import StandInTracker

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.test_hostile")]

KEY = "test-key"
HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    # The outbox, tracker and settings fixtures are reset by hand for every example.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# The views: visitor input, decoded from JSON (which can carry lone surrogates), handed
# to km exactly as a site would hand it form fields.


def _body(request: HttpRequest) -> Any:
    return json.loads(request.body)


def record_view(request: HttpRequest) -> HttpResponse:
    data = _body(request)
    km.record(data["event"], data["properties"])
    return HttpResponse("ok")


def identify_view(request: HttpRequest) -> HttpResponse:
    data = _body(request)
    km.identify(data["identity"])
    km.record(data["event"])
    km.set(data["properties"])
    return HttpResponse("ok")


def explicit_view(request: HttpRequest) -> HttpResponse:
    data = _body(request)
    km.record(data["event"], data["properties"], identity=data["identity"])
    km.alias(data["identity"], data["other"])
    return HttpResponse("ok")


def page_view(request: HttpRequest) -> HttpResponse:
    km.record("Viewed Page")
    return HttpResponse("ok")


def login_view(request: HttpRequest) -> HttpResponse:
    user = User.objects.get(username=_body(request)["username"])
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return HttpResponse("ok")


urlpatterns = [
    path("record/", record_view),
    path("identify/", identify_view),
    path("explicit/", explicit_view),
    path("page/", page_view),
    path("login/", login_view),
]

# The documented normalisation, restated independently of the package.

_SURROGATE = re.compile("[\ud800-\udfff]")
TRANSPORT = {"_k", "_p", "_n", "_t", "_d"}


def expected_name(text: str) -> str:
    """An identity or an event name as sent."""
    return _SURROGATE.sub("\ufffd", text).strip()[:255].rstrip()


def expected_property_name(text: str) -> str:
    return re.sub("[,:]", " ", _SURROGATE.sub("\ufffd", text)).strip()[:255].rstrip()


def expected_value(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text).encode()[:8192].decode("utf-8", "ignore")


def expected_properties(
    properties: dict[str, str | None], person: str = "", event: str | None = None
) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw, value in properties.items():
        name = expected_property_name(raw)
        if name in TRANSPORT or value is None or not name:
            continue  # Transport fields (also once normalised), no value, no name: dropped.
        out[name] = expected_value(value)
    return within_url(out, expected_name(person) if person else "", event)


def within_url(props: dict[str, str], person: str, event: str | None) -> dict[str, str]:
    """The URL limit: 8192 bytes less 320 for the tracking URL, the key and the time.

    Names take at most half of what is left (the first ones are kept); the values
    longer than a common length are cut to it, the largest length that fits.
    """
    event = expected_name(event) if event else ""
    budget = 8192 - 320 - len(quote_plus(person)) - len(quote_plus(event))
    names = {k: len(quote_plus(k)) + 2 for k in props}
    if sum(names.values()) + sum(len(quote_plus(v)) for v in props.values()) <= budget:
        return props
    kept: dict[str, str] = {}
    for k, v in props.items():
        if sum(names[n] for n in kept) + names[k] > budget // 2:
            break
        kept[k] = v
    room = budget - sum(names[n] for n in kept)
    sizes = {k: len(quote_plus(v)) for k, v in kept.items()}
    if sum(sizes.values()) <= room:
        return kept
    cap = max(c for c in range(room + 1) if sum(min(n, c) for n in sizes.values()) <= room)

    def cut(text: str) -> str:
        text = text[:cap]  # Each character takes one byte or more.
        while len(quote_plus(text)) > cap:
            text = text[:-1]
        return text

    return {k: cut(v) if sizes[k] > cap else v for k, v in kept.items()}


# Strategies: what a visitor can send.

SPECIAL = [
    *"\x00\t\n\r\x0b\x1f\x7f\x85\xa0\u2028\u3000\ufeff",
    "\ud7ff",
    "\ue000",
    "\uffff",
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    "\U0001f600",
    *"é%+&=#?/;,:\"'<>\\ ",
]
char = st.one_of(st.sampled_from(SPECIAL), st.characters(exclude_categories=()))


def strings(min_size: int = 0, max_size: int = 20) -> st.SearchStrategy[str]:
    # Joined from single characters: st.text() itself seldom, if ever, draws a surrogate.
    return st.lists(char, min_size=min_size, max_size=max_size).map("".join)


short_text = strings()
# Far over the limits (255 characters, 8192 bytes) and cheap to draw: a repeated unit.
long_text = st.builds(
    lambda head, unit, times: head + unit * times,
    short_text,
    strings(1, 3),
    st.integers(200, 3000),
)
text = st.one_of(short_text, short_text, long_text)


def _usable_name(value: str) -> bool:
    # Blank names and identities are a developer error (ValueError, tested below).
    return bool(expected_name(value))


names = text.filter(_usable_name)
# Transport fields, as they are and in disguise (they must never reach the wire as such).
# Exactly "_t" is left out: it is the documented back-dating field, its value a timestamp.
FORGED = ["_k", "_p", "_n", "_d", " _p", "_k:", "_n,", "_t ", "\t_d", ":_t"]
property_names = st.one_of(st.sampled_from(FORGED), text).filter(lambda name: name != "_t")
properties = st.dictionaries(property_names, st.one_of(text, st.none()), max_size=4)
header_bytes = st.binary(max_size=300).map(lambda b: b.decode("latin-1"))


def over_json(value: Any) -> Any:
    """``value`` as a view decodes it from a JSON body.

    JSON escapes a lone surrogate as ``\\udXXX``, and the view gets it back as it was; but
    a high surrogate followed by a low one decodes as the single character they encode.
    """
    return json.loads(json.dumps(value))


def post(client: Client, url: str, **data: Any) -> tuple[HttpResponseBase, int, int]:
    """POST ``data`` as JSON; the response and the second range of the call."""
    before = int(time.time())
    response = client.post(url, json.dumps(data), content_type="application/json")
    return response, before, int(time.time())


def anonymous_id(response: HttpResponseBase) -> str:
    return unquote(response.cookies["km_ai"].value)


# Through the middleware.


@HYPOTHESIS
@given(event=names, props=properties)
def test_event_names_and_properties_in_a_view(
    km_outbox: list[Command], event: str, props: dict[str, str | None]
) -> None:
    event, props = over_json(event), over_json(props)
    km_outbox.clear()
    response, before, after = post(Client(), "/record/", event=event, properties=props)
    assert response.status_code == 200
    (command,) = km_outbox
    assert command.kind == "record"
    assert command.person == anonymous_id(response)
    assert command.name == expected_name(event)
    assert command.properties == expected_properties(props, command.person, event)
    assert before <= command.timestamp <= after


@HYPOTHESIS
@given(identity=names, event=names, props=properties)
def test_identities_in_a_view(
    km_outbox: list[Command], identity: str, event: str, props: dict[str, str | None]
) -> None:
    identity, event, props = over_json(identity), over_json(event), over_json(props)
    km_outbox.clear()
    client = Client()
    response, _, _ = post(client, "/identify/", identity=identity, event=event, properties=props)
    assert response.status_code == 200
    named = expected_name(identity)
    anonymous = anonymous_id(response)
    got = [(c.kind, c.person, c.name, c.properties) for c in km_outbox]
    alias: list[tuple[str, str, str | None, dict[str, str]]] = []
    if named != anonymous:
        alias.append(("alias", anonymous, named, {}))
    kept = expected_properties(props, identity)
    # A set whose properties were all dropped is not sent.
    person_set = [("set", named, None, kept)] if kept else []
    assert got == [*alias, ("record", named, expected_name(event), {}), *person_set]
    # The session remembers the identity as normalised: the next page is the same person.
    km_outbox.clear()
    assert client.get("/page/").status_code == 200
    assert [c.person for c in km_outbox] == [named]


@HYPOTHESIS
@given(identity=names, other=names, event=names, props=properties)
def test_explicit_identities_in_a_view(
    km_outbox: list[Command], identity: str, other: str, event: str, props: dict[str, str | None]
) -> None:
    identity, other, event = over_json(identity), over_json(other), over_json(event)
    props = over_json(props)
    km_outbox.clear()
    response, _, _ = post(
        Client(), "/explicit/", identity=identity, other=other, event=event, properties=props
    )
    assert response.status_code == 200
    got = [(c.kind, c.person, c.name, c.properties) for c in km_outbox]
    expected_props = expected_properties(props, identity, event)
    assert got == [
        ("record", expected_name(identity), expected_name(event), expected_props),
        ("alias", expected_name(identity), expected_name(other), {}),
    ]


@HYPOTHESIS
@given(
    cookie=st.one_of(
        header_bytes,
        # Percent-encoded, as the JavaScript library writes it: any bytes, valid UTF-8 or not.
        st.binary(max_size=300).map(lambda b: "".join(f"%{x:02X}" for x in b)),
        st.from_regex(r"[A-Za-z0-9+/=%]{0,300}", fullmatch=True),
    ),
    agent=header_bytes,
)
def test_forged_cookie_and_user_agent(km_outbox: list[Command], cookie: str, agent: str) -> None:
    km_outbox.clear()
    header = f"km_ai={cookie}"
    response = Client().get("/page/", HTTP_COOKIE=header, HTTP_USER_AGENT=agent)
    assert response.status_code == 200
    bots = get_settings().IGNORE_USER_AGENTS
    if bots is not None and bots.search(agent):
        assert km_outbox == []  # A bot: not tracked.
        return
    # Read as Django reads it: WSGI's Latin-1 text taken back to UTF-8, then parsed.
    sent = parse_cookie(get_str_from_wsgi({"HTTP_COOKIE": header}, "HTTP_COOKIE", "")).get(
        "km_ai", ""
    )
    kept = unquote(sent) if len(sent) <= 1024 else ""
    (command,) = km_outbox
    if re.fullmatch(r"[A-Za-z0-9+/=]{20,255}", kept) and not kept.isdigit():
        # A plausible id (Base64 alphabet, 20 to 255 characters, not a number) is the
        # visitor's.
        assert command.person == kept
        assert "km_ai" not in response.cookies
    else:
        # Anything else is replaced, never trusted, never echoed back.
        fresh = anonymous_id(response)
        assert re.fullmatch(r"[A-Za-z0-9+/]{27}=", fresh)
        assert command.person == fresh


@HYPOTHESIS
@given(
    forged=st.one_of(
        st.just("<the other user>"),
        st.integers(0, 10**40).map(str),
        st.from_regex(r"[A-Za-z0-9+/=]{1,19}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9+/=%]{1,60}", fullmatch=True),
    ),
    with_ni=st.booleans(),
)
def test_a_forged_km_ai_never_joins_two_people_at_login(
    km_outbox: list[Command], forged: str, with_ni: bool
) -> None:
    other, _ = User.objects.get_or_create(username="other")
    ann, _ = User.objects.get_or_create(username="ann")
    if forged == "<the other user>":
        forged = str(other.pk)
    header = f"km_ai={forged}" + (f"; km_ni={forged}" if with_ni else "")
    km_outbox.clear()
    client = Client(HTTP_COOKIE=header)
    response = client.post("/login/", json.dumps({"username": "ann"}), "application/json")
    assert response.status_code == 200
    sent = unquote(parse_cookie(header).get("km_ai", ""))
    aliases = [(c.person, c.name) for c in km_outbox if c.kind == "alias"]
    trusted = re.fullmatch(r"[A-Za-z0-9+/=]{20,255}", sent) and not sent.isdigit()
    if trusted and not with_ni:
        # An unguessable id: the visitor's own anonymous history, joined at login.
        assert aliases == [(sent, str(ann.pk))]
    else:
        # Anything else (a number, a short value, the library's named km_ai) is replaced:
        # the alias joins the fresh id, never the forged value or another user.
        assert aliases == [(anonymous_id(response), str(ann.pk))]
        assert sent not in aliases[0]
    assert str(other.pk) not in {side for pair in aliases for side in pair}


@pytest.mark.parametrize("blank", ["", " ", "\t\n", "\u3000\xa0"])
def test_blank_names_are_a_developer_error(blank: str) -> None:
    if blank:  # record("", ...) is set(...), as the Kissmetrics docs have it.
        with pytest.raises(ValueError, match="must not be empty"):
            km.record(blank, identity="ann")
    with pytest.raises(ValueError, match="must not be empty"):
        km.record("Event", identity=blank)


# Through the HTTP client to the stand-in tracker: every value URL-escaped on the wire,
# decoded back by the server to what was sent.

WHEN = 1_700_000_000


Record = Callable[[str, str, dict[str, str | None]], None]


@pytest.fixture(params=["client", "km"])
def record(
    request: pytest.FixtureRequest, tracker: StandInTracker, km_settings: Callable[..., None]
) -> Record:
    """``KissmetricsClient.record``, or ``km.record`` outside a request (``sync`` backend)."""
    if request.param == "client":
        client = KissmetricsClient(KEY, url=tracker.url, timeout=5.0)
        return lambda person, event, props: client.record(person, event, props, timestamp=WHEN)
    km_settings(API_KEY=KEY, BACKEND="sync", TRACKING_URL=tracker.url)
    return lambda person, event, props: km.record(event, props, identity=person, timestamp=WHEN)


@HYPOTHESIS
@given(person=names, event=names, props=properties)
def test_values_reach_the_tracker_escaped_and_intact(
    tracker: StandInTracker, record: Record, person: str, event: str, props: dict[str, str | None]
) -> None:
    expected = {
        "_k": KEY,
        "_p": expected_name(person),
        "_n": expected_name(event),
        "_t": str(WHEN),
        "_d": "1",
        **expected_properties(props, person, event),
    }
    # The stand-in (http.server) refuses a request line over 64 KiB; the real tracker's
    # limit is lower still, which is the site's concern, not the escaping's.
    assume(len(urlencode(expected)) < 60_000)
    tracker.reset()
    record(person, event, props)
    (hit,) = tracker.hits
    assert hit.path == "/e"
    assert hit.params == expected


@HYPOTHESIS
@given(person=names, identity=names)
def test_alias_reaches_the_tracker_intact(
    tracker: StandInTracker, person: str, identity: str
) -> None:
    tracker.reset()
    KissmetricsClient(KEY, url=tracker.url).alias(person, identity)
    (hit,) = tracker.hits
    assert (hit.path, hit.params) == (
        "/a",
        {"_k": KEY, "_p": expected_name(person), "_n": expected_name(identity)},
    )


@pytest.mark.parametrize("name", [" _p", "_k:", "_n,", "_t ", "\t_d"])
def test_property_names_never_override_transport_fields(tracker: StandInTracker, name: str) -> None:
    KissmetricsClient(KEY, url=tracker.url).record("ann", "Signed Up", {name: "forged"}, WHEN)
    (hit,) = tracker.hits
    assert (hit.person, hit.name, hit.params["_k"], hit.params["_t"], hit.params["_d"]) == (
        "ann",
        "Signed Up",
        KEY,
        str(WHEN),
        "1",
    )


def test_identify_and_explicit_identity_agree(km_outbox: list[Command]) -> None:
    identity = "a" * 254 + " b"  # Character 255 is a space.
    client = Client()
    post(client, "/identify/", identity=identity, event="E", properties={})
    post(client, "/explicit/", identity=identity, other="x", event="E", properties={})
    assert len({c.person for c in km_outbox if c.kind == "record"}) == 1
