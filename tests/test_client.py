"""KissmetricsClient against a real HTTP server on loopback."""

from __future__ import annotations

import socket
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from django_kissmetrics.client import USER_AGENT, KissmetricsClient
from django_kissmetrics.commands import make_record
from django_kissmetrics.exceptions import TrackingError
from django_kissmetrics.testing import StandInTracker

AWKWARD = ["héllo wörld", "a&b=c", "1+1", "100%", "a/b?c#d", "日本語", "emoji 🎉", "  spaced  "]


@pytest.mark.parametrize("text", AWKWARD)
def test_awkward_text_round_trips(tracker: StandInTracker, text: str) -> None:
    client = KissmetricsClient("key&=", url=tracker.url)
    client.record(text, text, {text.strip(): text})
    (hit,) = tracker.hits
    assert hit.path == "/e"
    assert hit.params["_k"] == "key&="
    assert hit.person == text.strip()
    assert hit.name == text.strip()
    assert hit.properties == {text.strip(): text}


def test_set_and_alias_paths(tracker: StandInTracker) -> None:
    client = KissmetricsClient("k", url=tracker.url)
    client.set("bob", {"plan": "pro"})
    client.alias("anon+/=", "bob")
    set_hit, alias_hit = tracker.hits
    assert set_hit.path == "/s"
    assert set_hit.properties == {"plan": "pro"}
    assert alias_hit.path == "/a"
    assert alias_hit.params == {"_k": "k", "_p": "anon+/=", "_n": "bob"}


def test_undated_calls_leave_the_time_to_the_server(tracker: StandInTracker) -> None:
    KissmetricsClient("k", url=tracker.url).record("p", "E")
    assert "_t" not in tracker.hits[0].params
    assert "_d" not in tracker.hits[0].params


def test_dated_calls_carry_t_and_d(tracker: StandInTracker) -> None:
    KissmetricsClient("k", url=tracker.url).record("p", "E", timestamp=1234567890)
    assert tracker.hits[0].params["_t"] == "1234567890"
    assert tracker.hits[0].params["_d"] == "1"


def test_user_agent_names_the_package(tracker: StandInTracker) -> None:
    KissmetricsClient("k", url=tracker.url).record("p", "E")
    assert tracker.hits[0].user_agent == USER_AGENT
    assert USER_AGENT.startswith("django-kissmetrics-sdk/")


def test_https_is_the_default() -> None:
    client = KissmetricsClient("k")
    assert client.url_for(make_record("p", "E")).startswith("https://trk.kissmetrics.io/e?")


def test_non_2xx_raises_with_status_and_retry_after(tracker: StandInTracker) -> None:
    tracker.fail(1, 503)
    tracker.retry_after = "7"
    with pytest.raises(TrackingError) as info:
        KissmetricsClient("k", url=tracker.url).record("p", "E")
    assert info.value.status == 503
    assert info.value.retry_after == 7.0
    assert info.value.retriable


def test_4xx_is_not_retriable(tracker: StandInTracker) -> None:
    tracker.fail(1, 414)
    with pytest.raises(TrackingError) as info:
        KissmetricsClient("k", url=tracker.url).record("p", "E")
    assert not info.value.retriable


def test_refused_connection_raises() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TrackingError) as info:
        KissmetricsClient("k", url=f"http://127.0.0.1:{port}").record("p", "E")
    assert info.value.status is None
    assert info.value.retriable


def test_timeout_is_applied(tracker: StandInTracker) -> None:
    tracker.delay = 2
    started = time.monotonic()
    with pytest.raises(TrackingError, match="Timeout"):
        KissmetricsClient("k", url=tracker.url, timeout=0.2).record("p", "E")
    assert time.monotonic() - started < 1.5


def test_send_many_reports_only_the_failures(tracker: StandInTracker) -> None:
    commands = [make_record("p", f"E{i}") for i in range(20)]
    tracker.fail(3, 500)
    failures = KissmetricsClient("k", url=tracker.url).send_many(commands, concurrency=4)
    assert len(failures) == 3
    assert len(tracker.hits) == 17
    delivered = {h.name for h in tracker.hits} | {c.name for c, _ in failures}
    assert delivered == {f"E{i}" for i in range(20)}


class TestSameQueryAsPyKissmetrics:
    """For the same call, the query decodes to the parameters py-KISSmetrics 1.1 sends."""

    @staticmethod
    def params_of(url: str) -> dict[str, list[str]]:
        return parse_qs(urlsplit(url).query, keep_blank_values=True)

    @pytest.mark.parametrize(
        "properties",
        [{}, {"plan": "pro", "amount": 49}, {"text": "héllo & goodbye", "ratio": 0.25}],
    )
    def test_record(self, properties: dict[str, object]) -> None:
        from KISSmetrics import request as reference

        ours = KissmetricsClient("KEY", url="https://trk.kissmetrics.io")
        theirs = reference.record(
            "KEY", "bob@example.com", "Signed Up", timestamp=1234567890, properties=properties
        )
        mine = ours.url_for(make_record("bob@example.com", "Signed Up", properties, 1234567890))
        assert self.params_of(mine) == self.params_of(theirs)
        assert urlsplit(mine).path == urlsplit(theirs).path

    def test_set_and_alias(self) -> None:
        from KISSmetrics import request as reference

        from django_kissmetrics.commands import make_alias, make_set

        ours = KissmetricsClient("KEY", url="https://trk.kissmetrics.io")
        theirs = reference.set("KEY", "bob", timestamp=1234567890, properties={"a": "b c"})
        assert self.params_of(ours.url_for(make_set("bob", {"a": "b c"}, 1234567890))) == (
            self.params_of(theirs)
        )
        theirs = reference.alias("KEY", "anon", "bob")
        assert self.params_of(ours.url_for(make_alias("anon", "bob"))) == self.params_of(theirs)

    def test_live_against_the_stand_in(self, tracker: StandInTracker) -> None:
        from KISSmetrics.client import Client

        host = urlsplit(tracker.url).netloc
        Client("KEY", trk_host=host, trk_scheme="http").record(
            "bob", "Paid", {"amount": 10}, timestamp=1234567890
        )
        KissmetricsClient("KEY", url=tracker.url).record(
            "bob", "Paid", {"amount": 10}, timestamp=1234567890
        )
        theirs, mine = tracker.hits
        assert mine.params == theirs.params


def test_send_many_overlaps_slow_calls(tracker: StandInTracker) -> None:
    """Against a slow tracker several calls are in flight at once, failures still reported."""
    tracker.delay = 0.05
    tracker.fail(5, 503)
    commands = [make_record("p", f"E{i}") for i in range(40)]
    started = time.monotonic()
    failures = KissmetricsClient("k", url=tracker.url).send_many(commands, concurrency=8)
    elapsed = time.monotonic() - started
    assert len(failures) == 5
    assert [c.name for c, _ in failures] == sorted(
        (c.name for c, _ in failures), key=lambda n: int((n or "E0")[1:])
    )
    assert {h.name for h in tracker.hits} | {c.name for c, _ in failures} == {
        f"E{i}" for i in range(40)
    }
    assert elapsed < 40 * 0.05  # Sequential would take at least two seconds.


def test_stopped_tracker_refuses_kept_alive_connections(tracker: StandInTracker) -> None:
    client = KissmetricsClient("k", url=tracker.url, timeout=1)
    client.record("p", "Before")
    tracker.stop()
    with pytest.raises(TrackingError):
        client.record("p", "While down")
    tracker.start()
    client.record("p", "After")
    assert [h.name for h in tracker.hits] == ["Before", "After"]
