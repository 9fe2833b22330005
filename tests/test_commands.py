"""Command normalisation: the rules the README writes down."""

from __future__ import annotations

import datetime as dt
import json
import logging
from decimal import Decimal

import pytest

from django_kissmetrics.commands import (
    Command,
    make_alias,
    make_record,
    make_set,
)


def test_values_become_text() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    command = make_record(
        "p",
        "Bought",
        {
            "count": 3,
            "price": 9.5,
            "exact": Decimal("1.10"),
            "gift": True,
            "trial": False,
            "when": when,
            "day": dt.date(2026, 1, 2),
            "tags": ["a", "b"],
            "skipped": None,
        },
    )
    assert command.properties == {
        "count": "3",
        "price": "9.5",
        "exact": "1.10",
        "gift": "true",
        "trial": "false",
        "when": "2026-01-02T03:04:05Z",
        "day": "2026-01-02",
        "tags": '["a", "b"]',
    }


def test_timestamp_is_taken_at_the_call() -> None:
    import time

    before = int(time.time())
    command = make_record("p", "E")
    assert before <= command.timestamp <= int(time.time())
    assert ("_d", "1") in command.params("k")
    assert ("_t", str(command.timestamp)) in command.params("k")


@pytest.mark.parametrize(
    "timestamp",
    [1234567890, 1234567890.7, dt.datetime(2009, 2, 13, 23, 31, 30, tzinfo=dt.timezone.utc)],
)
def test_timestamp_argument(timestamp: object) -> None:
    assert make_record("p", "E", timestamp=timestamp).timestamp == 1234567890  # type: ignore[arg-type]


def test_back_dating_in_properties_as_the_docs_show() -> None:
    command = make_record("p", "Signed Up", {"_d": 1, "_t": 1234567890, "plan": "pro"})
    assert command.timestamp == 1234567890
    assert command.properties == {"plan": "pro"}


def test_transport_fields_are_not_properties(caplog: pytest.LogCaptureFixture) -> None:
    command = make_record("p", "E", {"_p": "someone else", "_k": "x", "_n": "y"})
    assert command.properties == {}
    assert "transport field" in caplog.text
    assert dict(command.params("k"))["_p"] == "p"


def test_commas_and_colons_in_names_become_spaces() -> None:
    assert make_set("p", {"foo:bar,baz": 1}).properties == {"foo bar baz": "1"}


def test_long_input_is_truncated_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    command = make_record("i" * 300, "e" * 300, {"n" * 300: "é" * 5000})
    assert len(command.person) == 255
    assert len(command.name or "") == 255
    ((name, value),) = command.properties.items()
    assert len(name) == 255
    assert len(value.encode()) <= 8192
    # 8 KB of text, then cut again to fit the URL's 8 KB once percent-encoded.
    assert value == "é" * len(value)
    assert caplog.text.count("truncated") == 4
    assert "property values cut to" in caplog.text
    # One long ASCII value: cut to what the URL leaves it (8192, less 320 for the tracking
    # URL, key and time, less the person, the event and "&k=").
    (alone,) = make_record("p", "E", {"k": "x" * 9000}).properties.values()
    assert len(alone) == 7872 - len("p") - len("E") - len("k") - 2


def test_lone_surrogates_are_replaced() -> None:
    command = make_record("p\ud800", "E\udfff", {"k": "v\ud83d"})
    assert command.person == "p\ufffd"
    assert command.properties == {"k": "v\ufffd"}


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_identity_or_event_is_a_developer_error(bad: str) -> None:
    with pytest.raises(ValueError, match="identity must not be empty"):
        make_record(bad, "E")
    with pytest.raises(ValueError, match="event name must not be empty"):
        make_record("p", bad)


def test_wrong_types_are_developer_errors() -> None:
    with pytest.raises(TypeError, match="properties must be a dict"):
        make_record("p", "E", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="event name must be text"):
        make_record("p", 42)
    with pytest.raises(TypeError, match="identity must be text"):
        make_alias(None, "x")


def test_round_trip_through_json() -> None:
    command = make_record("p", "E", {"a": 1})
    assert Command.from_dict(json.loads(json.dumps(command.to_dict()))) == command
    wire = json.loads(json.dumps(command.to_wire()))
    assert wire == ["record", "p", "E", {"a": "1"}, command.timestamp]
    assert Command.from_wire(wire) == command
    assert Command.from_wire(command.to_dict()) == command  # The long form is read too.
    alias = make_alias("a", "b")
    assert Command.from_wire(json.loads(json.dumps(alias.to_wire()))) == alias
    assert alias.params("k") == [("_k", "k"), ("_p", "a"), ("_n", "b")]


@pytest.mark.parametrize("when", ["inf", "1e400", float("inf"), "nan", "soon"])
def test_impossible_timestamps_are_type_errors(when: object) -> None:
    with pytest.raises(TypeError, match="timestamp"):
        make_record("p", "E", timestamp=when)  # type: ignore[arg-type]


def test_set_with_nothing_left_sends_nothing(km_outbox: list[Command]) -> None:
    from django_kissmetrics import km

    km.set({"gone": None}, identity="42")
    km.set({"kept": 1}, identity="42")
    assert [c.properties for c in km_outbox] == [{"kept": "1"}]
