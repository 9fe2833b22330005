"""The per-process publisher: coalescing, flushing, a full buffer, big windows.

``publish`` (one Celery message) is replaced by a recorder here: what is under test is
what the thread hands to it. Publishing to a real Redis is covered in ``test_faults``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from django_kissmetrics import publisher
from django_kissmetrics.commands import Command, make_record
from django_kissmetrics.signals import delivery_failed

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[list[Command]]:
    """Each message the publisher thread would have sent, as a list of commands."""
    messages: list[list[Command]] = []
    lock = threading.Lock()

    def record(commands: Any) -> None:
        with lock:
            messages.append(list(commands))

    monkeypatch.setattr(publisher, "publish", record)
    return messages


@pytest.fixture
def make() -> Iterator[Any]:
    """Start publishers for a test and stop them afterwards."""
    started: list[publisher.Publisher] = []

    def start(maxsize: int = 100, window: float = 0.05) -> publisher.Publisher:
        started.append(publisher.Publisher(maxsize, window))
        return started[-1]

    yield start
    for each in started:
        each.stop(timeout=5)


def command(n: int) -> Command:
    return make_record(f"person-{n}", "Event", {"n": n})


def test_many_requests_share_one_message_in_order(
    published: list[list[Command]], make: Any
) -> None:
    pub = make(window=10.0)  # Longer than the test: only the flush ends the window.
    for n in range(50):
        pub.submit([command(n)])
    pub.flush()
    assert len(published) == 1
    assert [c.properties["n"] for c in published[0]] == [str(n) for n in range(50)]


def test_window_ends_without_a_flush(published: list[list[Command]], make: Any) -> None:
    pub = make(window=0.05)
    pub.submit([command(1)])
    deadline = time.monotonic() + 10
    while not published and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [c.person for m in published for c in m] == ["person-1"]


def test_large_windows_are_split_into_messages_of_max_batch(
    published: list[list[Command]], make: Any
) -> None:
    pub = make(maxsize=5000, window=10.0)
    for n in range(1200):
        pub.submit([command(n)])
    pub.flush()
    assert [len(m) for m in published] == [publisher.MAX_BATCH, publisher.MAX_BATCH, 200]


def test_a_full_buffer_gives_up_loudly(
    published: list[list[Command]], make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    failed: list[list[Command]] = []

    def receiver(sender: object, commands: list[Command], **kwargs: object) -> None:
        failed.append(commands)

    delivery_failed.connect(receiver, weak=False)
    try:
        pub = make(maxsize=2, window=10.0)
        for n in range(3):
            pub.submit([command(n)])
        pub.flush()
    finally:
        delivery_failed.disconnect(receiver)
    assert [c.person for m in published for c in m] == ["person-0", "person-1"]
    assert [[c.person for c in f] for f in failed] == [["person-2"]]
    assert "publisher queue full" in caplog.text
    assert "person-2" in caplog.text  # The command itself is in the log.


def test_submissions_from_many_threads_all_arrive(
    published: list[list[Command]], make: Any
) -> None:
    pub = make(maxsize=10_000, window=0.01)

    def submit(base: int) -> None:
        for n in range(200):
            pub.submit([command(base + n)])

    threads = [threading.Thread(target=submit, args=(t * 1000,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pub.flush()
    people = [c.person for m in published for c in m]
    assert len(people) == 1600
    assert len(set(people)) == 1600


def test_stop_flushes_and_ends_the_thread(published: list[list[Command]], make: Any) -> None:
    pub = make(window=10.0)
    pub.submit([command(7)])
    pub.stop(timeout=5)
    assert not pub.thread.is_alive()
    assert [c.person for m in published for c in m] == ["person-7"]
    pub.flush(timeout=0.1)  # A stopped publisher's flush returns at once.


# A graceful stop on a busy machine.


def test_a_publisher_made_as_a_stop_is_signalled_still_hears_of_it(
    published: list[list[Command]], monkeypatch: pytest.MonkeyPatch
) -> None:
    made = publisher.Publisher.__init__

    def init(self: publisher.Publisher, *args: Any) -> None:
        made(self, *args)  # It read "no stop" ...
        publisher.stop_signalled()  # ... and the stop found no publisher to tell.

    monkeypatch.setattr(publisher.Publisher, "__init__", init)
    monkeypatch.setattr(publisher, "_stop_signalled", False)
    pub = publisher.get_publisher()
    assert pub.stop_signalled
    pub.submit([command(1)])  # Published at once, in the caller: no window to wait out.
    assert [c.person for m in published for c in m] == ["person-1"]


def test_a_stop_the_thread_cannot_serve_in_time_is_logged_in_full(
    monkeypatch: pytest.MonkeyPatch, make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    published: list[Command] = []

    def hung(commands: Any) -> None:  # A broker that hangs, a thread that is not scheduled.
        release.wait(10)
        published.extend(commands)

    monkeypatch.setattr(publisher, "publish", hung)
    pub = make(window=0.01)
    pub.submit([command(1)])
    time.sleep(0.2)  # The thread has it in flight now.
    pub.submit([command(2)])
    assert pub.flush_or_report(0.2, "a stop was signalled") is False
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "2 command(s) not yet published 0.2 s after a stop was signalled" in line
    assert "person-1" in line
    assert "person-2" in line
    release.set()
    assert pub.flush_or_report(5, "the process began to exit") is True
    assert [c.person for c in published] == ["person-1", "person-2"]
