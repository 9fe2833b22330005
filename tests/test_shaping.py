"""Shaping every command: ``BEFORE_SEND`` (rename, drop, raise) and ``GLOBAL_PROPERTIES``.

The ``sync`` backend sends to a stand-in tracker over real HTTP, so each test sees what
Kissmetrics would receive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from django.test import Client

from django_kissmetrics import km
from django_kissmetrics.commands import Command
from django_kissmetrics.testing import StandInTracker
from tests import hooks

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def counted() -> dict[str, int]:
    hooks.calls.clear()
    return hooks.calls


@pytest.fixture
def live(tracker: StandInTracker, km_settings: Callable[..., None]) -> Callable[..., None]:
    def apply(**keys: object) -> None:
        km_settings(BACKEND="sync", TRACKING_URL=tracker.url, **keys)

    return apply


def events(tracker: StandInTracker) -> list[tuple[str | None, dict[str, str]]]:
    return [(h.name, h.properties) for h in tracker.hits if h.path == "/e"]


def test_a_hook_that_renames(
    client: Client, tracker: StandInTracker, live: Callable[..., None], counted: dict[str, int]
) -> None:
    live(BEFORE_SEND="tests.hooks.rename")
    client.get('/record/?event=Bought&props={"plan":"pro"}')
    km.record("Bought", identity="ann")  # Outside a request too.
    assert events(tracker) == [
        ("Purchased", {"plan": "pro", "shaped": "true"}),  # Normalised: True -> "true".
        ("Purchased", {"shaped": "true"}),
    ]
    assert counted["rename"] == 2  # Once per command.


def test_a_hook_that_drops(
    client: Client, tracker: StandInTracker, live: Callable[..., None], km_outbox: object
) -> None:
    live(BEFORE_SEND="tests.hooks.drop_health")
    client.get("/record/?event=Checked+Health")
    client.get("/record/?event=Viewed")
    km.record("Checked Health", identity="ann")
    with km.batch():
        km.record("Checked Health", identity="bob")
        km.record("Renewed", identity="bob")
    assert [name for name, _ in events(tracker)] == ["Viewed", "Renewed"]


def test_a_hook_that_raises_logs_once_and_sends_unchanged(
    client: Client,
    tracker: StandInTracker,
    live: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
    counted: dict[str, int],
) -> None:
    live(BEFORE_SEND="tests.hooks.boom")
    with caplog.at_level(logging.ERROR, logger="django_kissmetrics"):
        assert client.get("/record/?event=First").status_code == 200
        assert client.get("/record/?event=Second").status_code == 200
        km.record("Third", identity="ann")
    assert [name for name, _ in events(tracker)] == ["First", "Second", "Third"]
    assert counted["boom"] == 3
    logged = [r for r in caplog.records if "BEFORE_SEND" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None


def test_a_hook_that_returns_no_command_sends_it_unchanged(
    client: Client, tracker: StandInTracker, live: Callable[..., None]
) -> None:
    live(BEFORE_SEND="tests.hooks.not_a_command")
    client.get("/record/?event=Viewed")
    assert [name for name, _ in events(tracker)] == ["Viewed"]


def test_hooks_see_aliases_and_sets_too(
    client: Client, km_outbox: list[Command], km_settings: Callable[..., None]
) -> None:
    km_settings(BEFORE_SEND="tests.hooks.rename")
    km.alias("a", "b")
    km.set({"plan": "pro"}, identity="ann")
    assert [(c.kind, dict(c.properties)) for c in km_outbox] == [
        ("alias", {}),
        ("set", {"plan": "pro", "shaped": "true"}),
    ]


def test_global_properties_from_a_dict_go_under_each_events_own(
    client: Client, tracker: StandInTracker, live: Callable[..., None]
) -> None:
    live(GLOBAL_PROPERTIES={"site": "eu", "plan": "free", "beta": True})
    client.get('/record/?event=Viewed&props={"plan":"pro"}')
    km.record("Renewed", identity="ann")
    km.set({"x": 1}, identity="ann")  # Not an event: untouched.
    assert events(tracker) == [
        ("Viewed", {"site": "eu", "plan": "pro", "beta": "true"}),
        ("Renewed", {"site": "eu", "plan": "free", "beta": "true"}),
    ]
    assert [h.properties for h in tracker.hits if h.path == "/s"] == [{"x": "1"}]


def test_global_properties_from_a_function_of_the_request(
    client: Client, tracker: StandInTracker, live: Callable[..., None], counted: dict[str, int]
) -> None:
    live(GLOBAL_PROPERTIES="tests.hooks.region", BEFORE_SEND="tests.hooks.rename")
    client.get("/record/?event=Bought")
    km.record("Renewed", identity="ann")
    assert events(tracker) == [
        # BEFORE_SEND sees the event with them.
        ("Purchased", {"region": "eu", "where": "/record/", "plan": "global", "shaped": "true"}),
        ("Renewed", {"region": "eu", "where": "outside", "shaped": "true"}),
    ]


def test_global_properties_are_worked_out_once_per_request(
    client: Client,
    km_outbox: list[Command],
    km_settings: Callable[..., None],
    counted: dict[str, int],
) -> None:
    from django.test import RequestFactory

    from django_kissmetrics.middleware import start

    km_settings(GLOBAL_PROPERTIES="tests.hooks.region")
    request = RequestFactory().get("/pricing/")
    tracker = start(request)
    for name in ("A", "B", "C"):
        tracker.record(name)
    tracker._send(tracker.close())
    assert [c.properties["where"] for c in km_outbox] == ["/pricing/"] * 3
    assert counted["region"] == 1


def test_a_broken_global_properties_function_sends_the_events_without_them(
    client: Client,
    tracker: StandInTracker,
    live: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    live(GLOBAL_PROPERTIES="tests.hooks.broken")
    with caplog.at_level(logging.ERROR, logger="django_kissmetrics"):
        client.get("/record/?event=A")
        client.get("/record/?event=B")
    assert [name for name, _ in events(tracker)] == ["A", "B"]
    assert len([r for r in caplog.records if "GLOBAL_PROPERTIES" in r.getMessage()]) == 1
