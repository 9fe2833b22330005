"""The km_ai cookie and the current person, through the real middleware stack."""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import quote, unquote

import pytest
from django.contrib.auth.models import User
from django.test import Client
from hypothesis import given
from hypothesis import strategies as st

from django_kissmetrics.commands import Command
from django_kissmetrics.identity import (
    cookie_domain,
    decode_cookie,
    encode_cookie,
    is_anonymous_id,
    new_anonymous_id,
)

pytestmark = pytest.mark.django_db


def raw_set_cookie(response: object, name: str = "km_ai") -> str:
    header = response.cookies[name].output(header="")  # type: ignore[attr-defined]
    return str(header).strip()


def test_new_ids_are_base64_of_20_random_bytes() -> None:
    ids = {new_anonymous_id() for _ in range(200)}
    assert len(ids) == 200
    for value in ids:
        assert len(value) == 28
        assert len(base64.b64decode(value, validate=True)) == 20


LONG = "Ab0" * 7  # 21 characters of the Base64 alphabet: long enough for an anonymous id.


def test_cookie_encoding_is_encode_uri_component() -> None:
    assert encode_cookie("ab+/=") == "ab%2B%2F%3D"
    assert encode_cookie("a!~*'()b") == "a!~*'()b"
    assert decode_cookie(LONG + "ab%2B%2F%3D") == LONG + "ab+/="
    assert decode_cookie(LONG + "ab+c") == LONG + "ab+c"  # "+" is data, not a space.


# Cookie values as a browser may send them: the Base64 alphabet, escapes (upper and
# lower case, valid or not) and anything else.
cookie_text = st.lists(
    st.sampled_from(["%2B", "%2F", "%3D", "%2b", "%2f", "%3d", "%25", "%", "%2", "%41", "%ZZ"])
    | st.text(alphabet="ABCxyz019+/=", min_size=1, max_size=4)
    | st.text(max_size=3),
    max_size=12,
).map("".join)


@given(raw=cookie_text)
def test_decoding_agrees_with_unquote(raw: str) -> None:
    # The hand-written fast path must give what unquote() gives, or reject the value.
    expected = unquote(raw) if raw and len(raw) <= 1024 else None
    if expected is not None and not is_anonymous_id(expected):
        expected = None
    assert decode_cookie(raw) == expected


@given(value=st.text(alphabet="ABCxyz019+/=", min_size=1) | st.text())
def test_encoding_agrees_with_quote(value: str) -> None:
    assert encode_cookie(value) == quote(value, safe="!~*'()")
    if is_anonymous_id(value):
        assert decode_cookie(encode_cookie(value)) == value


@pytest.mark.parametrize(
    "raw",
    ["", '"abc="', "abc def", "<script>", "a" * 256, quote("ab;c"), "%ZZ", "abc%00", "é"],
)
def test_implausible_cookie_values_are_rejected(raw: str) -> None:
    assert decode_cookie(raw) is None


def test_anonymous_id_alphabet() -> None:
    assert is_anonymous_id("Az09+/=" * 3)
    assert not is_anonymous_id("Az-_" * 6)


@pytest.mark.parametrize(
    "value",
    [
        "1",  # A primary key: with the default IDENTITY, user 1.
        "42",
        "9" * 30,  # Digits only, however long: a number is someone's key or phone.
        "ann",  # A username.
        "averyshortusername",  # 18 characters.
        "A" * 19,
        "x" * 256,
    ],
)
def test_values_that_could_name_someone_are_not_anonymous_ids(value: str) -> None:
    assert not is_anonymous_id(value)
    assert decode_cookie(value) is None


@pytest.mark.parametrize("value", ["A" * 20, "1" * 19 + "a", "x" * 255, new_anonymous_id()])
def test_twenty_to_255_characters_not_all_digits_are_anonymous_ids(value: str) -> None:
    assert is_anonymous_id(value)


@pytest.mark.parametrize(
    ("host", "configured", "expected"),
    [
        ("www.shop.test", None, "www.shop.test"),
        ("www.shop.test:8000", None, "www.shop.test"),
        ("www.shop.test", ".shop.test", ".shop.test"),
        ("localhost:8000", None, None),
        ("app.localhost", None, None),
        ("127.0.0.1:8000", None, None),
        ("[::1]:8000", None, None),
        ("testserver", None, None),
    ],
)
def test_cookie_domain(host: str, configured: str | None, expected: str | None) -> None:
    assert cookie_domain(host, configured) == expected


def test_first_visit_gets_km_ai_in_the_library_form(client: Client) -> None:
    response = client.get("/nothing/", HTTP_HOST="www.shop.test")
    header = raw_set_cookie(response)
    value = header.split(";")[0].split("=", 1)[1]
    assert '"' not in header
    assert re.fullmatch(r"[A-Za-z0-9%]+", value)
    anonymous = unquote(value)
    assert len(anonymous) == 28
    assert is_anonymous_id(anonymous)
    assert "Domain=www.shop.test" in header
    assert "Path=/" in header
    assert "SameSite=Lax" in header
    assert "HttpOnly" not in header
    assert "Secure" not in header
    assert f"Max-Age={5 * 365 * 24 * 3600}" in header


def test_https_cookie_is_secure(client: Client) -> None:
    response = client.get("/nothing/", secure=True, HTTP_HOST="www.shop.test")
    assert "Secure" in raw_set_cookie(response)


def test_each_first_visit_gets_its_own_hosts_attributes(client: Client, settings: Any) -> None:
    # The prepared cookie is kept per Host header and scheme: one request's Domain or
    # Secure must never leak into another's.
    settings.USE_X_FORWARDED_HOST = True
    visits = [
        ({"HTTP_HOST": "www.shop.test"}, False, "Domain=www.shop.test"),
        ({"HTTP_HOST": "www.shop.test"}, True, "Domain=www.shop.test"),
        ({"HTTP_HOST": "shop.test:8443"}, True, "Domain=shop.test"),
        ({"HTTP_HOST": "localhost:8000"}, False, None),
        (
            {"HTTP_HOST": "localhost:8000", "HTTP_X_FORWARDED_HOST": "eu.shop.test"},
            False,
            "Domain=eu.shop.test",
        ),
        ({"HTTP_HOST": "www.shop.test"}, False, "Domain=www.shop.test"),
    ]
    values = set()
    for headers, secure, domain in visits * 2:  # The second pass comes from the caches.
        client.cookies.clear()
        header = raw_set_cookie(client.get("/nothing/", secure=secure, **headers))
        assert ("Secure" in header.split("; ")) is secure, header
        if domain is None:
            assert "Domain=" not in header, header
        else:
            assert domain in header.split("; "), header
        values.add(header.split(";")[0])
    assert len(values) == len(visits) * 2  # A new id each time.


def test_localhost_gets_a_host_only_cookie(client: Client) -> None:
    response = client.get("/nothing/", HTTP_HOST="localhost:8000")
    assert "Domain" not in raw_set_cookie(response)


def test_valid_cookie_is_kept_and_used(client: Client, km_outbox: list[Command]) -> None:
    anonymous = new_anonymous_id()
    client.cookies["km_ai"] = encode_cookie(anonymous)
    response = client.get("/record/?event=Viewed")
    assert "km_ai" not in response.cookies
    (command,) = km_outbox
    assert command.person == anonymous


@pytest.mark.parametrize(
    "garbage", ["", "<script>alert(1)</script>", "x" * 4000, "%E0%A4%A", "a b"]
)
def test_garbage_cookie_is_replaced_without_a_500(
    client: Client, km_outbox: list[Command], garbage: str
) -> None:
    client.cookies["km_ai"] = garbage
    response = client.get("/record/")
    assert response.status_code == 200
    fresh = unquote(response.cookies["km_ai"].value)
    assert is_anonymous_id(fresh)
    assert fresh != garbage
    assert km_outbox[0].person == fresh


def test_km_ni_from_the_browser_is_never_trusted(client: Client, km_outbox: list[Command]) -> None:
    client.cookies["km_ni"] = "ceo@bank.example"
    client.get("/record/")
    assert km_outbox[0].person != "ceo@bank.example"


@pytest.mark.parametrize("header", [{"HTTP_DNT": "1"}, {"HTTP_SEC_GPC": "1"}])
def test_do_not_track(client: Client, km_outbox: list[Command], header: dict[str, str]) -> None:
    response = client.get("/record/", **header)
    assert response.status_code == 200
    assert "km_ai" not in response.cookies
    assert km_outbox == []
    page = client.get("/", **header)
    assert b"_kmq" not in page.content


def test_do_not_track_can_be_ignored(
    client: Client, km_outbox: list[Command], km_settings: object
) -> None:
    km_settings(HONOR_DNT=False, BACKEND="locmem")  # type: ignore[operator]
    client.get("/record/", HTTP_DNT="1")
    assert len(km_outbox) == 1


def test_excluded_paths_and_bots(client: Client, km_outbox: list[Command]) -> None:
    response = client.get("/admin/thing/")
    assert "km_ai" not in response.cookies
    response = client.get("/record/", HTTP_USER_AGENT="Mozilla/5.0 (compatible; Googlebot/2.1)")
    assert "km_ai" not in response.cookies
    assert km_outbox == []


def test_no_api_key_no_cookie_no_tracking(client: Client, km_settings: object) -> None:
    from django_kissmetrics.testing import outbox

    km_settings(API_KEY=None)  # type: ignore[operator]
    response = client.get("/record/")
    assert "km_ai" not in response.cookies
    assert outbox == []


def test_one_request_is_one_delivery(client: Client, km_settings: object) -> None:
    km_settings(BACKEND="tests.backends.CountingBackend")  # type: ignore[operator]
    from tests.backends import CountingBackend

    CountingBackend.calls.clear()
    client.get("/record/?event=A")
    client.get("/nothing/")
    assert [len(c) for c in CountingBackend.calls] == [1]


@pytest.mark.django_db(transaction=True)
def test_only_committed_transactions_are_tracked(client: Client, km_outbox: list[Command]) -> None:
    client.get("/atomic/")
    assert [c.name for c in km_outbox] == ["Before", "Committed"]


def test_view_error_still_delivers_and_answers_500(km_outbox: list[Command]) -> None:
    client = Client(raise_request_exception=False)
    assert client.get("/boom/").status_code == 500
    assert [c.name for c in km_outbox] == ["Before Error"]


def test_logged_in_user_is_their_identity(client: Client, km_outbox: list[Command]) -> None:
    user = User.objects.create_user("ann", password="pw")
    client.force_login(user)
    km_outbox.clear()
    client.get("/record/")
    assert km_outbox[-1].person == str(user.pk)


def test_identity_function_setting(
    client: Client, km_outbox: list[Command], km_settings: object
) -> None:
    km_settings(BACKEND="locmem", IDENTITY="tests.backends.email_identity")  # type: ignore[operator]
    user = User.objects.create_user("bea", email="bea@example.com", password="pw")
    client.force_login(user)
    km_outbox.clear()
    client.get("/record/")
    assert km_outbox[-1].person == "bea@example.com"


def test_anonymous_identity_costs_no_query(
    client: Client, km_outbox: list[Command], django_assert_num_queries: object
) -> None:
    with django_assert_num_queries(0):  # type: ignore[operator]
        client.get("/record/")
        client.get("/")
    assert len(km_outbox) == 1


def test_logged_in_identity_costs_nothing_beyond_auth(
    client: Client, km_outbox: list[Command], django_assert_num_queries: object
) -> None:
    user = User.objects.create_user("cy", password="pw")
    client.force_login(user)
    client.get("/user/")  # Warm up: last_login and the like.
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as baseline:
        client.get("/user/")
    with django_assert_num_queries(len(baseline)):  # type: ignore[operator]
        client.get("/record/?event=X")
    assert km_outbox[-1].person == str(user.pk)


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("domain", [None, "www.shop.test"])
def test_prepared_cookie_is_what_django_writes(secure: bool, domain: str | None) -> None:
    from django.http import HttpResponse

    from django_kissmetrics.cookies import anonymous_cookie

    value = encode_cookie(new_anonymous_id())
    ours = HttpResponse()
    ours.cookies["km_ai"] = anonymous_cookie(
        "km_ai", value, max_age=3600, domain=domain, secure=secure
    )
    django = HttpResponse()
    django.set_cookie("km_ai", value, max_age=3600, domain=domain, secure=secure, samesite="Lax")
    ours_text, django_text = ours.cookies["km_ai"].output(), django.cookies["km_ai"].output()
    # Both may straddle a second boundary: compare without the expiry date.
    strip = re.compile(r"expires=[^;]+; ")
    assert strip.sub("", ours_text) == strip.sub("", django_text)
    assert "expires=" in ours_text
    assert dict(ours.cookies["km_ai"]) | {"expires": ""} == dict(django.cookies["km_ai"]) | {
        "expires": ""
    }
    assert ours.cookies["km_ai"].value == value


def test_prepared_cookie_can_still_be_changed_and_pickled() -> None:
    import pickle

    from django_kissmetrics.cookies import anonymous_cookie

    cookie = anonymous_cookie("km_ai", "abc%3D", max_age=60, domain=None, secure=False)
    cookie["path"] = "/shop/"
    assert "Path=/shop/" in cookie.output()
    cookie.set("km_ai", "other", "other")
    assert cookie.output().startswith("Set-Cookie: km_ai=other;")
    copy = pickle.loads(pickle.dumps(cookie))
    assert copy.output() == cookie.output()


def test_anonymous_request_leaves_session_and_user_unread(client: Client) -> None:
    # Without a session cookie, AuthenticationMiddleware's user can only be anonymous:
    # neither it nor the session is loaded, and a returning visitor's response (no
    # cookie set) gets no "Vary: Cookie".
    client.cookies["km_ai"] = encode_cookie(new_anonymous_id())
    response = client.get("/record/?event=Viewed")
    request = response.wsgi_request
    from django.utils.functional import empty

    assert request.user._wrapped is empty  # type: ignore[attr-defined]
    assert not request.session.accessed  # type: ignore[attr-defined]
    assert "Vary" not in response


def test_error_while_starting_is_logged_and_the_page_served(
    client: Client, km_outbox: list[Command], monkeypatch: pytest.MonkeyPatch, caplog: object
) -> None:
    from django_kissmetrics import middleware

    def broken(raw: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(middleware, "decode_cookie", broken)
    response = client.get("/record/")
    assert response.status_code == 200
    assert km_outbox == []
    assert "error while starting a request" in caplog.text  # type: ignore[attr-defined]


def test_broken_identity_function_falls_back_to_the_anonymous_id(
    client: Client, km_outbox: list[Command], km_settings: object, caplog: object
) -> None:
    km_settings(BACKEND="locmem", IDENTITY="tests.backends.empty_identity")  # type: ignore[operator]
    client.cookies["km_ai"] = encode_cookie(anonymous := new_anonymous_id())
    client.force_login(User.objects.create_user("dee", password="pw"))
    km_outbox.clear()
    response = client.get("/record/")
    assert response.status_code == 200
    assert km_outbox[-1].person == anonymous
    assert "IDENTITY failed" in caplog.text  # type: ignore[attr-defined]
