"""The client's engine: one event loop per process, bounded calls, proxies, TLS, fork, threads."""

from __future__ import annotations

import asyncio
import multiprocessing
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from django_kissmetrics import client as client_module
from django_kissmetrics.client import KissmetricsClient
from django_kissmetrics.commands import Command, make_record
from django_kissmetrics.exceptions import TrackingError
from django_kissmetrics.testing import StandInTracker


class Peak:
    """The most connections the stand-in held open at once, sampled while a block runs."""

    def __init__(self, tracker: StandInTracker) -> None:
        self.tracker = tracker
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            with self.tracker._lock:
                self.connections = max(self.connections, len(self.tracker._connections))

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_batch_holds_at_most_concurrency_calls_and_connections(
    tracker: StandInTracker,
) -> None:
    tracker.delay = 0.01
    concurrency = 8
    taken = 0
    ahead: list[int] = []

    def commands() -> Iterator[Command]:
        # Read as the calls go: never more taken than delivered plus those in flight.
        nonlocal taken
        for i in range(200):
            ahead.append(taken - len(tracker.hits))
            taken += 1
            yield make_record("p", f"E{i}")

    api = KissmetricsClient("k", url=tracker.url, concurrency=concurrency)
    with Peak(tracker) as peak:
        assert api.send_many(commands()) == []
    assert len(tracker.hits) == 200
    assert max(ahead) <= concurrency
    assert 2 <= peak.connections <= concurrency  # Overlapping, and bounded.


def test_threads_share_the_process_connections(tracker: StandInTracker) -> None:
    """Batches sent at once from several threads (Celery's threads pool) share one bound."""
    tracker.delay = 0.005
    api = KissmetricsClient("k", url=tracker.url, concurrency=4)
    failures: list[object] = []

    def batch(n: int) -> None:
        failures.extend(api.send_many([make_record("p", f"T{n}-{i}") for i in range(40)]))

    threads = [threading.Thread(target=batch, args=(n,)) for n in range(6)]
    with Peak(tracker) as peak:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert len({h.name for h in tracker.hits}) == 240
    assert peak.connections <= 4


def test_a_client_per_key_over_one_pool(tracker: StandInTracker) -> None:
    KissmetricsClient("key-a", url=tracker.url).record("p", "A")
    KissmetricsClient("key-b", url=tracker.url).record("p", "B")
    assert [(h.params["_k"], h.name) for h in tracker.hits] == [("key-a", "A"), ("key-b", "B")]
    engine = client_module._engine
    assert engine is not None
    # One pool for the tracker, whatever the key.
    assert [url for url, _ in engine.sessions].count(tracker.url) == 1


def test_the_blocking_api_works_inside_someone_elses_event_loop(tracker: StandInTracker) -> None:
    async def view() -> None:
        KissmetricsClient("k", url=tracker.url).record("p", "From a coroutine")

    asyncio.run(view())
    assert [h.name for h in tracker.hits] == ["From a coroutine"]


def _send_in_child(url: str) -> None:
    KissmetricsClient("k", url=url).record("p", "Child")


# A fork with threads running is the point (gunicorn --preload forks a process that has
# imported the package); Python 3.12+ warns about it.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_delivers_on_a_loop_of_its_own(tracker: StandInTracker) -> None:
    api = KissmetricsClient("k", url=tracker.url)
    api.record("p", "Parent before")  # The parent's loop and connection exist at the fork.
    child = multiprocessing.get_context("fork").Process(target=_send_in_child, args=(tracker.url,))
    child.start()
    child.join(20)
    assert child.exitcode == 0
    api.record("p", "Parent after")
    assert sorted(h.name or "" for h in tracker.hits) == ["Child", "Parent after", "Parent before"]


def test_close_drops_the_connections_and_the_next_call_reopens(tracker: StandInTracker) -> None:
    api = KissmetricsClient("k", url=tracker.url)
    api.record("p", "Before")
    client_module.close()
    api.record("p", "After")
    assert [h.name for h in tracker.hits] == ["Before", "After"]


def test_the_proxy_comes_from_the_environment(
    tracker: StandInTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stand-in answers a proxy's absolute-form request as it would a direct one.
    monkeypatch.setenv("HTTP_PROXY", tracker.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    KissmetricsClient("k", url="http://tracker.invalid").record("p", "Through the proxy")
    assert [h.name for h in tracker.hits] == ["Through the proxy"]

    monkeypatch.setenv("NO_PROXY", "tracker.invalid")
    with pytest.raises(TrackingError):  # Straight to a host that does not resolve.
        KissmetricsClient("k", url="http://tracker.invalid", timeout=2).record("p", "Direct")
    assert len(tracker.hits) == 1


@pytest.fixture
def https_tracker() -> Iterator[StandInTracker]:
    """The stand-in behind TLS, with a certificate from a CA nobody trusts."""
    import trustme

    tracker = StandInTracker().start()
    server = tracker._server
    assert isinstance(server, ThreadingHTTPServer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield tracker
    tracker.stop()


def test_tls_certificates_are_verified(https_tracker: StandInTracker) -> None:
    url = f"https://127.0.0.1:{https_tracker.port}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"Certificate|SSL"):
        KissmetricsClient("k", url=url, timeout=5).record("p", "Untrusted")
    assert time.monotonic() - started < 5
    assert https_tracker.hits == []


def test_pool_size_is_deprecated_for_delivery_concurrency() -> None:
    with pytest.warns(DeprecationWarning, match="DELIVERY_CONCURRENCY"):
        assert client_module.POOL_SIZE == client_module.DEFAULT_CONCURRENCY
