"""Keeping traffic out with ``TRACK``: staff, internal addresses, and functions of the site's own.

The ``sync`` backend sends to a stand-in tracker over real HTTP: "no hit" means nothing
reached it. A visitor who is kept out gets no cookie and no loader, as on an excluded path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.test import AsyncClient, Client
from django.utils.functional import empty

from django_kissmetrics import km
from django_kissmetrics.testing import StandInTracker
from tests.hooks import office

pytestmark = pytest.mark.django_db

OFFICE = "192.0.2.0/24"


@pytest.fixture
def live(tracker: StandInTracker, km_settings: Callable[..., None]) -> Callable[..., None]:
    """``live(**keys)``: the sync backend to the stand-in, with these keys."""

    def apply(**keys: object) -> None:
        km_settings(BACKEND="sync", TRACKING_URL=tracker.url, **keys)

    return apply


def kept_out(client: Client, tracker: StandInTracker, **extra: str) -> None:
    """A page and an event: no cookie, no loader, no hit."""
    page = client.get("/", **extra)
    event = client.get("/record/?event=Viewed", **extra)
    assert page.status_code == event.status_code == 200
    assert "km_ai" not in page.cookies
    assert "km_ai" not in event.cookies
    assert "_kmq" not in page.content.decode()
    assert tracker.hits == []


def tracked(client: Client, tracker: StandInTracker, **extra: str) -> None:
    page = client.get("/", **extra)
    assert "km_ai" in page.cookies
    assert "_kmq" in page.content.decode()
    client.get("/record/?event=Viewed", **extra)
    assert [h.name for h in tracker.hits] == ["Viewed"]


@pytest.mark.parametrize("flag", ["is_staff", "is_superuser"])
def test_staff_are_not_tracked(
    client: Client, tracker: StandInTracker, live: Callable[..., None], flag: str
) -> None:
    live(TRACK="django_kissmetrics.track.not_staff", SIGNUP_EVENT=None, LOGIN_EVENT=None)
    user = User.objects.create_user("ann", password="pw", **{flag: True})
    client.force_login(user)
    kept_out(client, tracker)


def test_other_users_and_anonymous_visitors_are_tracked(
    client: Client, tracker: StandInTracker, live: Callable[..., None]
) -> None:
    live(TRACK="django_kissmetrics.track.not_staff", LOGIN_EVENT=None)
    tracked(client, tracker)
    tracker.reset()
    client.force_login(User.objects.create_user("bob", password="pw"))
    client.get("/record/?event=Viewed")
    assert [h.name for h in tracker.hits if h.path == "/e"] == ["Viewed"]


def test_calls_that_name_someone_still_go_for_a_staff_member(
    client: Client, tracker: StandInTracker, live: Callable[..., None]
) -> None:
    live(TRACK="django_kissmetrics.track.not_staff", LOGIN_EVENT=None)
    User.objects.create_user("ann", password="pw", is_staff=True)
    from django.test import RequestFactory

    from django_kissmetrics.middleware import start

    request = RequestFactory().get("/")
    request.user = User.objects.get(username="ann")
    tracker_ = start(request)
    tracker_.record("Refund Issued", identity="customer-7")
    tracker_.record("Looked Around")  # About the staff member: nothing.
    tracker_._send(tracker_.close())
    assert [(h.person, h.name) for h in tracker.hits] == [("customer-7", "Refund Issued")]


def test_an_internal_address_is_not_tracked(
    client: Client, tracker: StandInTracker, live: Callable[..., None]
) -> None:
    live(TRACK="django_kissmetrics.track.not_internal", INTERNAL_IPS=[OFFICE, "2001:db8::/32"])
    kept_out(client, tracker, REMOTE_ADDR="192.0.2.44")
    kept_out(client, tracker, REMOTE_ADDR="2001:db8::1")
    kept_out(client, tracker, REMOTE_ADDR="::ffff:192.0.2.9")
    tracked(client, tracker, REMOTE_ADDR="198.51.100.1")


def test_a_forwarded_header_counts_only_when_the_site_trusts_one(
    client: Client, tracker: StandInTracker, live: Callable[..., None]
) -> None:
    live(TRACK="django_kissmetrics.track.not_internal", INTERNAL_IPS=[OFFICE])
    # Not trusted: a visitor who claims an office address is still tracked.
    client.get("/record/?event=Claimed", HTTP_X_FORWARDED_FOR="192.0.2.1")
    assert [h.name for h in tracker.hits] == ["Claimed"]
    tracker.reset()
    live(
        TRACK="django_kissmetrics.track.not_internal",
        INTERNAL_IPS=[OFFICE],
        TRUSTED_IP_HEADER="HTTP_X_FORWARDED_FOR",
    )
    # The proxy appends the address it saw: the last entry, not what the visitor wrote.
    kept_out(Client(), tracker, HTTP_X_FORWARDED_FOR="203.0.113.9, 192.0.2.1")
    Client().get("/record/?event=Spoofed", HTTP_X_FORWARDED_FOR="192.0.2.1, 203.0.113.9")
    assert [h.name for h in tracker.hits] == ["Spoofed"]


def test_own_functions_built_from_the_helpers(
    client: Client, tracker: StandInTracker, live: Callable[..., None]
) -> None:
    live(TRACK="tests.hooks.office")
    kept_out(client, tracker, REMOTE_ADDR="192.0.2.200")
    tracked(client, tracker, REMOTE_ADDR="203.0.113.5")
    assert office.__name__ == "check"


def test_an_anonymous_visitor_costs_no_query_and_no_session_read(
    client: Client,
    tracker: StandInTracker,
    live: Callable[..., None],
    django_assert_num_queries: object,
) -> None:
    live(TRACK="django_kissmetrics.track.not_staff_or_internal", INTERNAL_IPS=[OFFICE])
    with django_assert_num_queries(0):  # type: ignore[operator]
        client.get("/record/?event=Viewed")  # Sets km_ai: private, Vary: Cookie.
        response = client.get("/record/?event=Viewed")
    request = response.wsgi_request
    assert request.user._wrapped is empty  # type: ignore[attr-defined]
    assert not request.session.accessed  # type: ignore[attr-defined]
    # A returning visitor's response sets no cookie, reads no session: no Vary: Cookie.
    assert "Vary" not in response
    assert [h.name for h in tracker.hits] == ["Viewed", "Viewed"]


def test_a_broken_track_function_keeps_everyone_out_and_logs_once(
    client: Client,
    tracker: StandInTracker,
    live: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    live(TRACK="tests.hooks.broken")
    with caplog.at_level(logging.ERROR, logger="django_kissmetrics"):
        kept_out(client, tracker)
    assert len([r for r in caplog.records if "TRACK" in r.getMessage()]) == 1


def test_under_asgi_track_runs_off_the_event_loop(
    tracker: StandInTracker, live: Callable[..., None]
) -> None:
    live(TRACK="django_kissmetrics.track.not_staff")
    user = User.objects.create_user("ann", password="pw", is_staff=True)
    client = AsyncClient()
    client.force_login(user)

    async def visit() -> tuple[int, bool]:
        response = await client.get("/record/?event=Viewed")
        return response.status_code, "km_ai" in response.cookies

    assert async_to_sync(visit)() == (200, False)
    assert tracker.hits == []
    assert km.identity is None
