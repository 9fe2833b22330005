"""One person from the anonymous visit to the signed-up customer, through real views.

The ``sync`` backend sends each request's commands over real HTTP to a stand-in
tracker, so these tests see exactly what Kissmetrics would receive.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db.models.signals import post_save
from django.test import Client

from django_kissmetrics import km
from django_kissmetrics.commands import Command
from django_kissmetrics.receivers import on_user_created
from django_kissmetrics.testing import Hit, StandInTracker

pytestmark = pytest.mark.django_db


@pytest.fixture
def live(tracker: StandInTracker, km_settings: Callable[..., None]) -> StandInTracker:
    km_settings(BACKEND="sync", TRACKING_URL=tracker.url)
    return tracker


def anonymous_id(client: Client) -> str:
    client.get("/nothing/")
    return unquote(client.cookies["km_ai"].value)


def summary(hits: list[Hit]) -> list[tuple[str, str, str | None]]:
    return [(h.path, h.person, h.name) for h in hits]


def test_login_through_the_real_login_view(client: Client, live: StandInTracker) -> None:
    user = User.objects.create_user("ann", password="secret-pw")
    anon = anonymous_id(client)
    client.get("/record/?event=Viewed+Pricing")
    response = client.post("/login/", {"username": "ann", "password": "secret-pw"})
    assert response.status_code == 302
    client.get("/record/?event=Bought")
    me = str(user.pk)
    assert summary(live.hits) == [
        ("/e", anon, "Viewed Pricing"),
        ("/a", anon, me),
        ("/e", me, "Logged In"),
        ("/e", me, "Bought"),
    ]
    assert all(h.params["_d"] == "1" for h in live.hits if h.path == "/e")


def test_second_login_in_the_same_session_does_not_alias_again(
    client: Client, live: StandInTracker
) -> None:
    User.objects.create_user("ann", password="secret-pw")
    anonymous_id(client)
    client.post("/login/", {"username": "ann", "password": "secret-pw"})
    client.post("/login/", {"username": "ann", "password": "secret-pw"})
    assert [h.path for h in live.hits] == ["/a", "/e", "/e"]


def test_login_event_can_be_turned_off(
    client: Client, live: StandInTracker, km_settings: Callable[..., None]
) -> None:
    km_settings(BACKEND="sync", TRACKING_URL=live.url, LOGIN_EVENT=None)
    User.objects.create_user("ann", password="secret-pw")
    anonymous_id(client)
    client.post("/login/", {"username": "ann", "password": "secret-pw"})
    assert [h.path for h in live.hits] == ["/a"]


def test_allauth_signup_aliases_once_and_records_signed_up_once(
    client: Client, live: StandInTracker
) -> None:
    anon = anonymous_id(client)
    response = client.post(
        "/accounts/signup/",
        {
            "username": "newbie",
            "password1": "a-long-pass-phrase-42",
            "password2": "a-long-pass-phrase-42",
        },
    )
    assert response.status_code == 302, response.content[:500]
    user = User.objects.get(username="newbie")
    me = str(user.pk)
    aliases = [h for h in live.hits if h.path == "/a"]
    events = [h.name for h in live.hits if h.path == "/e"]
    assert [(h.person, h.name) for h in aliases] == [(anon, me)]
    assert events == ["Signed Up"]  # And no "Logged In" for the login that completes it.
    assert all(h.person == me for h in live.hits if h.path == "/e")
    client.get("/record/?event=Bought")
    assert live.hits[-1].person == me


@pytest.fixture
def plain_signup() -> Any:
    """Sites without allauth: a user created in a visitor's request is a signup."""
    from django.contrib.auth import get_user_model

    post_save.connect(on_user_created, sender=get_user_model(), dispatch_uid="test-signup")
    yield
    post_save.disconnect(sender=get_user_model(), dispatch_uid="test-signup")


@pytest.mark.usefixtures("plain_signup")
def test_signup_then_automatic_login(client: Client, live: StandInTracker) -> None:
    anon = anonymous_id(client)
    client.post("/signup/", {"username": "zed", "password": "pw"})
    me = str(User.objects.get(username="zed").pk)
    # One request's events are delivered concurrently, after its aliases.
    assert summary(live.hits) == [("/a", anon, me), ("/e", me, "Signed Up")]


@pytest.mark.usefixtures("plain_signup")
def test_the_login_after_a_signup_is_recorded_with_the_setting(
    client: Client, live: StandInTracker, km_settings: Callable[..., None]
) -> None:
    km_settings(LOGIN_EVENT_ON_SIGNUP=True)
    anon = anonymous_id(client)
    client.post("/signup/", {"username": "zed", "password": "pw"})
    me = str(User.objects.get(username="zed").pk)
    # One request's events are delivered concurrently, after its aliases.
    assert summary(live.hits)[0] == ("/a", anon, me)
    assert sorted(summary(live.hits)[1:]) == [("/e", me, "Logged In"), ("/e", me, "Signed Up")]


@pytest.fixture
def slow_signup() -> Any:
    """The user row is written 3 s before the signup's request ends (a slow mail server,
    say): the live event must still carry the row's time, as a backfill would."""
    from django.db.models.signals import pre_save

    def earlier(sender: Any, instance: Any, **kwargs: Any) -> None:
        if instance.pk is None:
            instance.date_joined -= dt.timedelta(seconds=3)

    pre_save.connect(earlier, sender=User, dispatch_uid="test-slow-signup")
    yield
    pre_save.disconnect(sender=User, dispatch_uid="test-slow-signup")


@pytest.mark.usefixtures("slow_signup")
@pytest.mark.parametrize("path", ["/accounts/signup/", "/signup/"])
def test_a_backfill_after_a_live_signup_sends_the_identical_record(
    client: Client, live: StandInTracker, path: str, request: pytest.FixtureRequest
) -> None:
    if path == "/signup/":
        request.getfixturevalue("plain_signup")
    password = "a-long-pass-phrase-42"
    fields = {"username": "newbie", "password1": password, "password2": password}
    client.post(path, {**fields, "password": password})
    user = User.objects.get(username="newbie")
    live_records = [h for h in live.hits if h.name == "Signed Up"]
    call_command("kissmetrics_backfill", "signups", stdout=io.StringIO(), stderr=io.StringIO())
    backfilled = [h for h in live.hits if h.name == "Signed Up"][len(live_records) :]
    assert len(live_records) == len(backfilled) == 1
    record = ("/e", str(user.pk), "Signed Up", str(int(user.date_joined.timestamp())))
    for hit in (*live_records, *backfilled):
        assert (hit.path, hit.person, hit.name, hit.params["_t"]) == record
        assert hit.params["_d"] == "1"
    # The same person, event and time: Kissmetrics keeps one of them.
    assert live_records[0].params == backfilled[0].params


@pytest.mark.usefixtures("plain_signup")
def test_staff_creating_a_user_is_not_a_signup(client: Client, live: StandInTracker) -> None:
    staff = User.objects.create_user("boss", password="pw")
    client.force_login(staff)
    live.hits.clear()
    client.post("/invite/", {"usernames": "employee"})
    assert summary(live.hits) == [("/e", str(staff.pk), "Sent Invitations")]


@pytest.mark.usefixtures("plain_signup")
def test_an_anonymous_visitor_inviting_two_people_stays_anonymous(
    client: Client, live: StandInTracker
) -> None:
    anon = anonymous_id(client)
    response = client.post("/invite/", {"usernames": "guest-1,guest-2"})
    assert response.status_code == 200
    assert User.objects.filter(username__startswith="guest-").count() == 2
    client.get("/record/?event=Later")
    # No alias, no identify, no "Signed Up": the accounts are other people's.
    assert summary(live.hits) == [("/e", anon, "Sent Invitations"), ("/e", anon, "Later")]
    page = client.get("/")
    assert b'"identify"' not in page.content


@pytest.mark.usefixtures("plain_signup")
def test_a_user_created_in_one_request_and_logged_in_later_is_a_login(
    client: Client, live: StandInTracker
) -> None:
    # The signup counts only when the visitor becomes the new user in the request that
    # made it; a later login (after an e-mail confirmation, say) is a login.
    anon = anonymous_id(client)
    client.post("/invite/", {"usernames": "later"})
    user = User.objects.get(username="later")
    user.set_password("secret-pw")
    user.save()
    client.post("/login/", {"username": "later", "password": "secret-pw"})
    me = str(user.pk)
    assert summary(live.hits) == [
        ("/e", anon, "Sent Invitations"),
        ("/a", anon, me),
        ("/e", me, "Logged In"),
    ]


def log_in(client: Client, username: str = "ann") -> None:
    response = client.post("/login/", {"username": username, "password": "secret-pw"})
    assert response.status_code == 302


def cookie_id(response: Any) -> str:
    return unquote(response.cookies["km_ai"].value)


@pytest.mark.parametrize(
    "kind", ["victim-pk", "encoded-pk", "short", "digits", "victim-username-in-km-ni"]
)
def test_a_forged_km_ai_never_joins_anyone_at_login(
    client: Client, live: StandInTracker, km_settings: Callable[..., None], kind: str
) -> None:
    victim = User.objects.create_user("victimwithaverylongname", password="secret-pw")
    me = User.objects.create_user("ann", password="secret-pw")
    if kind == "victim-username-in-km-ni":
        # A username identity of 20+ characters passes for an anonymous id, except where
        # the library wrote it into km_ai after identify (km_ni holds it too): a
        # browser the victim used, then left without logging out.
        km_settings(
            BACKEND="sync", TRACKING_URL=live.url, IDENTITY="tests.backends.username_identity"
        )
        forged = victim.username
        client.cookies["km_ni"] = forged
    else:
        forged = {
            "victim-pk": str(victim.pk),
            "encoded-pk": "%" + str(victim.pk).encode().hex(),
            "short": "abc",
            "digits": "12345678901234567890123",
        }[kind]
        if kind == "encoded-pk":
            assert unquote(forged) == str(victim.pk)
    client.cookies["km_ai"] = forged
    response = client.get("/record/?event=Browsed")
    fresh = cookie_id(response)
    assert fresh not in (forged, unquote(forged))
    log_in(client)
    named = "ann" if kind == "victim-username-in-km-ni" else str(me.pk)
    assert summary(live.hits) == [
        ("/e", fresh, "Browsed"),
        ("/a", fresh, named),
        ("/e", named, "Logged In"),
    ]


def test_a_logged_in_users_own_identity_in_km_ai_is_theirs(
    client: Client, live: StandInTracker
) -> None:
    user = User.objects.create_user("ann", password="secret-pw")
    me = str(user.pk)
    anon = anonymous_id(client)
    log_in(client)
    # From the second identified page on, the library writes the named identity into
    # km_ai (and km_ni): the server neither replaces it nor aliases it.
    client.cookies["km_ni"] = me
    client.cookies["km_ai"] = me
    for _ in range(3):
        response = client.get("/record/?event=Browsed")
        assert "km_ai" not in response.cookies
        assert "Cache-Control" not in response
    assert summary(live.hits) == [
        ("/a", anon, me),
        ("/e", me, "Logged In"),
        *[("/e", me, "Browsed")] * 3,
    ]
    # Logging in again (as the same person) aliases nothing.
    live.hits.clear()
    log_in(client)
    assert summary(live.hits) == [("/e", me, "Logged In")]
    # Logout still issues a fresh km_ai and deletes km_ni: the next visitor is new.
    live.hits.clear()
    response = client.post("/logout/")
    fresh = cookie_id(response)
    assert fresh not in (me, anon)
    assert response.cookies["km_ni"].value == ""
    client.get("/record/?event=Next+Visitor")
    assert summary(live.hits) == [("/e", fresh, "Next Visitor")]


def test_another_users_identity_in_km_ai_is_replaced(client: Client, live: StandInTracker) -> None:
    victim = User.objects.create_user("victim", password="secret-pw")
    user = User.objects.create_user("ann", password="secret-pw")
    client.force_login(user)
    client.cookies["km_ni"] = client.cookies["km_ai"] = str(victim.pk)
    response = client.get("/record/?event=Browsed")
    fresh = cookie_id(response)
    assert fresh != str(victim.pk)
    assert response.cookies["km_ni"]["max-age"] == 0  # The library must not go on as him.
    assert summary(live.hits) == [("/e", str(user.pk), "Browsed")]
    assert all(str(victim.pk) not in (h.person, h.name) for h in live.hits)


def test_logout_renews_the_anonymous_id(client: Client, live: StandInTracker) -> None:
    user = User.objects.create_user("ann", password="secret-pw")
    first = anonymous_id(client)
    client.post("/login/", {"username": "ann", "password": "secret-pw"})
    client.cookies["km_ni"] = str(user.pk)
    response = client.post("/logout/")
    fresh = unquote(response.cookies["km_ai"].value)
    assert fresh != first
    assert response.cookies["km_ni"].value == ""  # Deleted.
    page = client.get("/")
    assert b'_kmq.push(["clearIdentity"]);' in page.content
    assert b'"identify"' not in page.content
    client.get("/record/?event=Next+Visitor")
    assert live.hits[-1].person == fresh
    assert b"clearIdentity" not in client.get("/").content  # Once.


def test_identify_holds_for_the_session(client: Client, live: StandInTracker) -> None:
    from django.urls import path

    anon = anonymous_id(client)
    from tests import urls

    def newsletter(request: Any) -> Any:
        from django.http import HttpResponse

        km.identify("reader@example.com")
        km.record("Subscribed")
        return HttpResponse("ok")

    urls.urlpatterns.append(path("newsletter/", newsletter))
    from django.urls import clear_url_caches

    clear_url_caches()
    try:
        client.get("/newsletter/")
        client.get("/record/?event=Later")
    finally:
        urls.urlpatterns.pop()
        clear_url_caches()
    assert summary(live.hits) == [
        ("/a", anon, "reader@example.com"),
        ("/e", "reader@example.com", "Subscribed"),
        ("/e", "reader@example.com", "Later"),
    ]


def test_identity_change_is_aliased(km_outbox: list[Command], km_settings: Any) -> None:
    km_settings(BACKEND="locmem", IDENTITY="tests.backends.email_identity")
    user = User.objects.create_user("ann", email="old@example.com")
    user = User.objects.get(pk=user.pk)
    user.email = "new@example.com"
    user.save()
    user.first_name = "Ann"
    user.save()
    assert [(c.kind, c.person, c.name) for c in km_outbox] == [
        ("alias", "old@example.com", "new@example.com")
    ]


class TestOutsideRequests:
    def test_identity_is_required(self, km_outbox: list[Command]) -> None:
        with pytest.raises(ValueError, match="pass identity="):
            km.record("Renewed")
        with pytest.raises(ValueError, match="identify"):
            km.identify("x")
        with pytest.raises(ValueError, match="needs a request"):
            km.js.record("x")

    def test_with_identity_each_call_is_sent(self, km_settings: Any) -> None:
        from tests.backends import CountingBackend

        km_settings(BACKEND="tests.backends.CountingBackend")
        CountingBackend.calls.clear()
        km.record("Renewed", {"plan": "pro"}, identity="42", timestamp=1234567890)
        km.set({"plan": "pro"}, identity="42")
        km.alias("42", "ann@example.com")
        assert [[(c.kind, c.person) for c in call] for call in CountingBackend.calls] == [
            [("record", "42")],
            [("set", "42")],
            [("alias", "42")],
        ]
        assert CountingBackend.calls[0][0].timestamp == 1234567890

    def test_batch_is_one_delivery(self, km_settings: Any) -> None:
        from tests.backends import CountingBackend

        km_settings(BACKEND="tests.backends.CountingBackend")
        CountingBackend.calls.clear()
        with km.batch():
            for n in range(5):
                km.record("Renewed", identity=str(n))
            with km.batch():
                km.set({"x": 1}, identity="9")
        assert [len(call) for call in CountingBackend.calls] == [6]

    def test_no_api_key_sends_nothing_and_raises_nothing(self, km_settings: Any) -> None:
        from django_kissmetrics.testing import outbox

        km_settings(API_KEY=None)
        km.record("Renewed", identity="42")
        assert outbox == []


def test_km_outbox_fixture_for_users_tests(client: Client, km_outbox: list[Command]) -> None:
    client.get('/record/?event=Viewed+Pricing&props={"plan":"pro"}')
    (command,) = km_outbox
    assert command.name == "Viewed Pricing"
    assert command.properties == {"plan": "pro"}


class TestAsync:
    """Async views, the async test client and a bare ASGI application."""

    @staticmethod
    def fetch(async_client: Any, path: str) -> Any:
        """``async_client.get(path)`` from sync code."""

        # A coroutine function, not the bound method: Django 4.2's AsyncClient.get is a
        # plain function returning a coroutine, which async_to_sync() warns about.
        async def get() -> Any:
            return await async_client.get(path)

        return async_to_sync(get)()

    def test_async_view_under_async_client(self, async_client: Any, km_outbox: Any) -> None:
        response = self.fetch(async_client, "/async-record/")
        assert response.status_code == 200
        (command,) = km_outbox
        assert command.name == "Async Event"
        assert command.person == unquote(response.cookies["km_ai"].value)

    def test_logged_in_async_view(self, async_client: Any, km_outbox: Any) -> None:
        user = User.objects.create_user("asy", password="pw")
        async_client.force_login(user)
        km_outbox.clear()
        self.fetch(async_client, "/async-record/")
        assert km_outbox[-1].person == str(user.pk)

    @pytest.mark.parametrize("path", ["/async-record/", "/nothing/"])
    def test_the_library_named_km_ai_under_the_async_client(
        self, async_client: Any, km_outbox: Any, caplog: pytest.LogCaptureFixture, path: str
    ) -> None:
        # Whether km_ai is the user's own identity needs the user: off the event loop.
        user = User.objects.create_user("asy", password="pw")
        async_client.force_login(user)
        async_client.cookies["km_ai"] = async_client.cookies["km_ni"] = str(user.pk)
        km_outbox.clear()
        response = self.fetch(async_client, path)
        assert "km_ai" not in response.cookies
        assert [c.person for c in km_outbox] == [str(user.pk)] * (path == "/async-record/")
        assert "Kissmetrics" not in caplog.text
        # Someone else's identity in km_ai is replaced, under ASGI too.
        async_client.cookies["km_ai"] = async_client.cookies["km_ni"] = "1234"
        response = self.fetch(async_client, path)
        assert response.cookies["km_ai"].value not in ("", "1234")
        assert "Kissmetrics" not in caplog.text

    def test_asgi_application(self, km_outbox: Any) -> None:
        import asyncio

        from django.core.asgi import get_asgi_application

        app = get_asgi_application()
        sent: list[dict[str, Any]] = []

        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # The client never disconnects early.
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/record/",
            "raw_path": b"/record/",
            "query_string": b"event=ASGI",
            "root_path": "",
            "headers": [(b"host", b"www.shop.test")],
            "client": ("127.0.0.1", 1234),
            "server": ("www.shop.test", 80),
        }
        asyncio.run(app(scope, receive, send))
        start = sent[0]
        assert start["status"] == 200
        cookies = [v.decode() for k, v in start["headers"] if k == b"Set-Cookie"]
        (cookie,) = [c for c in cookies if c.startswith("km_ai=")]
        assert "Domain=www.shop.test" in cookie
        (command,) = km_outbox
        assert command.name == "ASGI"
        assert command.person == unquote(cookie.split(";")[0].split("=", 1)[1])
