"""``record`` without an event name is ``set``: on ``km``, ``km.js`` and ``KissmetricsClient``."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import pytest
from django.test import Client, RequestFactory

from django_kissmetrics import km
from django_kissmetrics.client import KissmetricsClient
from django_kissmetrics.testing import StandInTracker
from django_kissmetrics.tracker import RequestTracker

PROPS = {"plan": "pro"}


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: km.record(None, PROPS, identity="ann"), id="None"),
        pytest.param(lambda: km.record("", PROPS, identity="ann"), id="empty"),
        pytest.param(lambda: km.record(PROPS, identity="ann"), id="properties-only"),
    ],
)
def test_record_without_a_name_sets(km_outbox: list[Any], call: Any) -> None:
    call()
    (command,) = km_outbox
    assert (command.kind, command.person, command.name) == ("set", "ann", None)
    assert dict(command.properties) == PROPS


@pytest.mark.django_db
def test_inside_a_request_it_sets_on_the_current_person(
    client: Client, km_outbox: list[Any]
) -> None:
    client.get("/record/", {"event": "", "props": '{"plan": "pro"}'})
    (command,) = km_outbox
    assert command.kind == "set"
    assert command.person == unquote(client.cookies["km_ai"].value)
    assert dict(command.properties) == PROPS


def test_properties_twice_is_a_developer_error() -> None:
    with pytest.raises(TypeError, match="properties once"):
        km.record(PROPS, PROPS, identity="ann")


def test_a_blank_name_is_still_a_developer_error() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        km.record("  ", PROPS, identity="ann")


def test_km_js_record_without_a_name_sets(rf: RequestFactory) -> None:
    tracker = RequestTracker(rf.get("/"))
    tracker.js.record(None, {"a": 1})
    tracker.js.record("", {"b": 2})
    tracker.js.record({"c": 3})
    assert tracker.browser == [["set", {"a": 1}], ["set", {"b": 2}], ["set", {"c": 3}]]


@pytest.mark.parametrize("event", [None, ""])
def test_the_client_sends_a_set(event: Any) -> None:
    with StandInTracker() as tracker:
        client = KissmetricsClient("k", url=tracker.url)
        client.record("ann", event, PROPS)
        client.record("bob", PROPS)
        first, second = tracker.wait_for(2)
    assert [first.path, second.path] == ["/s", "/s"]
    assert (first.person, first.name, first.properties) == ("ann", None, PROPS)
    assert (second.person, second.properties) == ("bob", PROPS)
