"""The spool: outages of the broker and the tracker lose nothing, with real parts.

The spool file is real SQLite; brokers are real Redis servers stopped and started;
workers and web servers are real subprocesses; the stand-in tracker is the ground
truth: every command arrives once, with the ``_t`` of its call.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from django_kissmetrics import km, publisher, spool
from django_kissmetrics.commands import Command, make_record
from django_kissmetrics.signals import delivery_failed
from django_kissmetrics.testing import StandInTracker
from tests.conftest import RedisServer, wait_until
from tests.servers import ROOT, SiteProcess
from tests.worker import WorkerProcess

pytestmark = pytest.mark.timeout(60)

FAST = {"RETRY_BACKOFF": 0.05, "RETRY_BACKOFF_MAX": 1.0, "TIMEOUT": 2.0}


@pytest.fixture
def failed() -> Iterator[list[Command]]:
    """Every command ``delivery_failed`` was sent for, in this process."""
    calls: list[Command] = []

    def receiver(commands: list[Command], **kwargs: Any) -> None:
        calls.extend(commands)

    delivery_failed.connect(receiver, weak=False)
    yield calls
    delivery_failed.disconnect(receiver)


@pytest.fixture
def spool_dir(tmp_path: Path, km_settings: Callable[..., None]) -> Path:
    """A spool folder of this test's own, in the settings."""
    km_settings(SPOOL_DIR=str(tmp_path))
    return tmp_path


def the_spool() -> spool.Spool:
    found = spool.get_spool()
    assert found is not None
    return found


def command(n: int, at: int | None = None) -> Command:
    return make_record(f"person-{n}", f"Event {n}", {"n": n}, timestamp=at)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# The spool itself.


def test_entries_replay_oldest_first_each_once(spool_dir: Path) -> None:
    store = the_spool()
    now = int(time.time())
    store.put([command(2, now - 10)])
    store.put([command(1, now - 20), command(3, now - 5)])
    sent: list[list[Command]] = []
    count, error = spool.replay(store, lambda c: sent.append(c))
    assert (count, error) == (3, None)
    # Oldest first: by the oldest command of each entry, times kept as spooled.
    assert [[c.person for c in batch] for batch in sent] == [["person-1", "person-3"], ["person-2"]]
    assert [c.timestamp for c in sent[0]] == [now - 20, now - 5]
    assert store.status().count == 0
    assert spool.replay(store, lambda c: sent.append(c)) == (0, None)


def test_a_failed_replay_gives_the_entries_back(spool_dir: Path) -> None:
    store = the_spool()
    for n in range(3):
        store.put([command(n)])
    calls = []

    def broker_down(commands: list[Command]) -> BaseException | None:
        calls.append(commands)
        return ConnectionError("broker down") if len(calls) == 2 else None

    count, error = spool.replay(store, broker_down)
    assert count == 1
    assert isinstance(error, ConnectionError)
    status = store.status()
    assert (status.count, status.claimed) == (2, 0)  # Given back, claimable at once.
    assert spool.replay(store, lambda c: None) == (2, None)


def test_what_a_dead_claimer_held_comes_back_after_the_lease(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = spool.Spool(spool_dir, max_bytes=10**6, max_age=3600)
    second = spool.Spool(spool_dir, max_bytes=10**6, max_age=3600)
    first.put([command(1)])
    (entry,) = first.claim()  # Then the claimer dies: no delete, no release.
    assert second.claim() == []
    monkeypatch.setattr(spool, "LEASE", 0.2)
    time.sleep(0.3)
    (again,) = second.claim()
    assert again.commands == entry.commands


def test_a_full_spool_is_logged_and_signalled(
    spool_dir: Path,
    km_settings: Callable[..., None],
    failed: list[Command],
    caplog: pytest.LogCaptureFixture,
) -> None:
    km_settings(SPOOL_DIR=str(spool_dir), SPOOL_MAX_BYTES=200)
    fits, too_many = [command(1)], [command(n) for n in range(2, 6)]
    assert spool.keep(fits, None, "could not queue")
    assert not spool.keep(too_many, ConnectionError("down"), "could not queue")
    assert failed == too_many
    (line,) = errors(caplog)
    assert "the spool is full (SPOOL_MAX_BYTES)" in line
    assert "person-5" in line  # The commands themselves are in the log.
    assert the_spool().status().commands == 1


def test_commands_past_the_maximum_age_are_given_up(
    spool_dir: Path,
    km_settings: Callable[..., None],
    failed: list[Command],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    km_settings(SPOOL_DIR=str(spool_dir), SPOOL_MAX_AGE=60)
    now = int(time.time())
    old, young = command(1, now - 120), command(2, now - 10)
    assert spool.keep([old, young], None, "could not queue")
    assert failed == [old]  # Too old to spool at all.
    # And one that ages in the spool: given up when its turn comes.
    monkeypatch.setattr(spool.time, "time", lambda: now + 100.0)
    sent: list[Command] = []
    assert spool.replay(the_spool(), lambda c: sent.extend(c)) == (0, None)
    assert failed == [old, young]
    assert sent == []
    assert "SPOOL_MAX_AGE" in " ".join(errors(caplog))


def test_log_means_no_spool(
    km_settings: Callable[..., None], failed: list[Command], tmp_path: Path
) -> None:
    km_settings(ON_ENQUEUE_FAILURE="log", SPOOL_DIR=str(tmp_path))
    assert spool.get_spool() is None
    one = command(1)
    assert not spool.keep([one], None, "could not queue")
    assert failed == [one]
    assert list(tmp_path.iterdir()) == []


def test_the_default_folder_is_one_per_site_and_user(settings: Any) -> None:
    settings.BASE_DIR = Path("/srv/shop")
    shop = Path(spool.default_dir()).name
    assert shop.startswith(f"django-kissmetrics-shop-{os.getuid()}-")
    # Another site in a folder of the same name: a spool of its own.
    settings.BASE_DIR = Path("/home/ann/shop")
    assert Path(spool.default_dir()).name != shop
    settings.BASE_DIR = "/srv/shop/"
    assert Path(spool.default_dir()).name == shop  # The same folder, however written.
    del settings.BASE_DIR
    by_module = Path(spool.default_dir()).name
    assert by_module.startswith(f"django-kissmetrics-tests-{os.getuid()}-")
    settings.SETTINGS_MODULE = "tests.other_settings"
    assert Path(spool.default_dir()).name != by_module


# A broken spool never fails a request.


@pytest.fixture
def broker_down(
    own_broker: RedisServer, km_settings: Callable[..., None], tracker: StandInTracker
) -> RedisServer:
    """The celery backend publishing to a broker that has just gone away."""
    km_settings(BACKEND="celery", TRACKING_URL=tracker.url, **FAST)
    own_broker.stop()
    return own_broker


@pytest.mark.django_db
def test_a_corrupt_spool_file_gives_one_error_and_a_working_site(
    client: Client,
    broker_down: RedisServer,
    km_settings: Callable[..., None],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    failed: list[Command],
) -> None:
    km_settings(SPOOL_DIR=str(tmp_path))
    (tmp_path / spool.FILENAME).write_bytes(b"this is not a SQLite file\x00" * 100)
    for n in range(3):
        assert client.get("/record/", {"event": f"Visit {n}"}).status_code == 200
        publisher.flush()
    (line,) = errors(caplog)
    assert "unreadable" in line
    assert "started a fresh one" in line
    assert len(list(tmp_path.glob(f"{spool.FILENAME}.corrupt-*"))) == 1
    # The fresh spool holds the visits; nothing was given up.
    assert the_spool().status().commands == 3
    assert failed == []


@pytest.mark.django_db
def test_an_unusable_spool_folder_logs_the_commands(
    client: Client,
    broker_down: RedisServer,
    km_settings: Callable[..., None],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    failed: list[Command],
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    km_settings(SPOOL_DIR=str(not_a_folder / "spool"))
    for n in range(2):
        assert client.get("/record/", {"event": f"Visit {n}"}).status_code == 200
        publisher.flush()
    assert [c.name for c in failed] == ["Visit 0", "Visit 1"]
    lines = errors(caplog)
    assert sum("the spool cannot be used" in x for x in lines) == 1  # Said once.
    assert sum("spool unusable" in x and "Visit" in x for x in lines) == 2


@pytest.mark.django_db
def test_inline_publishing_leaves_the_spool_to_the_publisher_thread(
    client: Client,
    broker_down: RedisServer,
    km_settings: Callable[..., None],
    spool_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    km_settings(BACKEND="celery", SPOOL_DIR=str(spool_dir), PUBLISH="inline")
    writers: list[str] = []
    put = spool.Spool.put

    def watched(self: spool.Spool, *args: Any, **kwargs: Any) -> bool:
        kept = put(self, *args, **kwargs)
        writers.append(threading.current_thread().name)  # Once the write is done.
        return kept

    monkeypatch.setattr(spool.Spool, "put", watched)
    assert client.get("/record/", {"event": "Inline"}).status_code == 200
    wait_until(lambda: bool(writers), 10, "the spool write")
    assert writers == ["kissmetrics-publisher"]
    assert the_spool().status().commands == 1


# Outages, end to end.


def visit(site: SiteProcess, event: str) -> tuple[str, int, int]:
    before = time.time()
    started = time.monotonic()
    assert site.get(f"/record/?event={event.replace(' ', '+')}") == 200
    # The request only hands its commands over, whatever the broker does.
    assert time.monotonic() - started < 1.0
    return event, int(before), int(time.time())


def assert_once_at_call_time(tracker: StandInTracker, sent: list[tuple[str, int, int]]) -> None:
    hits = {h.name: h for h in tracker.hits}
    counts = Counter(h.name for h in tracker.hits)
    assert set(counts) == {event for event, _, _ in sent}
    assert all(n == 1 for n in counts.values()), counts
    for event, before, after in sent:
        assert hits[event].params["_d"] == "1"
        assert before <= int(hits[event].params["_t"]) <= after, (event, hits[event].params)


@pytest.mark.integration
def test_broker_and_tracker_down_with_a_deploy_inside_the_outage(
    tracker: StandInTracker, own_broker: RedisServer, tmp_path: Path
) -> None:
    config = {"BACKEND": "celery", "TRACKING_URL": tracker.url, "SPOOL_DIR": str(tmp_path), **FAST}
    port = None
    with WorkerProcess(own_broker.url, config):
        with SiteProcess("gunicorn", config, own_broker.url) as old:
            port = old.port
            sent = [visit(old, "Before")]
            wait_until(lambda: len(tracker.hits) == 1, 15, "delivery before the outage")
            own_broker.stop()
            tracker.stop()
            sent += [visit(old, f"Old process {n}") for n in range(10)]
            old.stop()  # A deploy: the old web process goes, the outage goes on.
        with SiteProcess("gunicorn", config, own_broker.url, port=port) as new:
            sent += [visit(new, f"New process {n}") for n in range(10)]
            store = spool.Spool(tmp_path, max_bytes=10**9, max_age=3600, api_key="test-key")
            # The outage lasts until both processes' commands are in the spool.
            wait_until(lambda: store.status().commands == 20, 15, "the spool to hold all 20")
            assert len(tracker.hits) == 1
            own_broker.start()
            tracker.start()
            wait_until(lambda: len(tracker.hits) >= len(sent), 30, "delivery after the outage")
            time.sleep(1.0)
    assert_once_at_call_time(tracker, sent)


@pytest.mark.integration
def test_a_tracker_down_longer_than_the_retries_is_delivered_when_it_returns(
    tracker: StandInTracker,
    km_settings: Callable[..., None],
    celery_worker: Any,
    spool_dir: Path,
    failed: list[Command],
) -> None:
    km_settings(BACKEND="celery", TRACKING_URL=tracker.url, **{**FAST, "MAX_RETRIES": 2})
    tracker.stop()
    before = int(time.time())
    with km.batch():
        for n in range(3):
            km.record(f"Patient {n}", identity=f"patient-{n}")
    after = int(time.time())
    publisher.flush()
    wait_until(lambda: the_spool().status().commands == 3, 20, "the worker to spool them")
    tracker.start()
    wait_until(lambda: len(tracker.hits) >= 3, 30, "the replay")
    time.sleep(0.5)
    assert sorted(h.name or "" for h in tracker.hits) == [f"Patient {n}" for n in range(3)]
    assert all(before <= int(h.params["_t"]) <= after for h in tracker.hits)
    assert failed == []
    wait_until(lambda: the_spool().status().count == 0, 10, "the spool to empty")


@pytest.mark.integration
def test_sync_delivers_directly_and_spools_what_fails(
    broker_down: RedisServer,
    km_settings: Callable[..., None],
    tracker: StandInTracker,
    spool_dir: Path,
    failed: list[Command],
) -> None:
    km_settings(
        BACKEND="celery",
        TRACKING_URL=tracker.url,
        SPOOL_DIR=str(spool_dir),
        ON_ENQUEUE_FAILURE="sync",
        **FAST,
    )
    km.record("Direct", identity="ann")
    publisher.flush()
    assert [h.name for h in tracker.hits] == ["Direct"]  # Straight to the tracker.
    tracker.stop()
    km.record("Kept", identity="ann")
    publisher.flush()
    # The publisher probes the broker with a replay of its own (claim, publish, release);
    # stopped, it cannot hold the entry at the moment this test claims it.
    publisher.stop()
    (entry,) = the_spool().claim()
    assert [c.name for c in entry.commands] == ["Kept"]
    assert failed == []


@pytest.mark.integration
def test_a_retry_the_worker_cannot_queue_is_spooled_and_replayed(
    tracker: StandInTracker, own_broker: RedisServer, tmp_path: Path, failed: list[Command]
) -> None:
    config = {
        "BACKEND": "celery",
        "TRACKING_URL": tracker.url,
        "SPOOL_DIR": str(tmp_path),
        **{**FAST, "TIMEOUT": 10.0},
    }
    store = spool.Spool(tmp_path, max_bytes=10**9, max_age=3600, api_key="test-key")
    store.put([command(1)])  # Left by an earlier process: the worker replays it as it starts.
    tracker.delay = 3.0  # The 503 comes after the broker has gone, even on a slow machine.
    tracker.fail(1, 503)
    with WorkerProcess(own_broker.url, config) as worker:
        wait_until(lambda: " received" in worker.log(), 15, "the worker to take the batch")
        own_broker.stop()
        # The worker logs the line once the spool holds the batch; waiting on the spool
        # alone could also see the replayed entry before the replay deleted it.
        wait_until(lambda: "could not queue a retry" in worker.log(), 15, "the worker to spool it")
        assert store.status().commands == 1
        # Celery 5.7's worker may stop by itself once its broker is gone; either way it
        # ends while the broker is still away, and a new one comes once it is back.
    tracker.delay = 0.0
    own_broker.start()
    with WorkerProcess(own_broker.url, config):
        wait_until(lambda: bool(tracker.hits), 30, "the replay")
        time.sleep(0.5)
    assert [(h.person, h.name) for h in tracker.hits] == [("person-1", "Event 1")]
    assert store.status().count == 0


REPLAYER = """
import json, os, sys, time
import django
django.setup()
from django_kissmetrics import publisher, spool
store = spool.get_spool()
print("ready", flush=True)
sys.stdin.readline()  # "go": both processes are ready, however long each took to start.
sent, error = spool.replay(store, publisher.try_publish)
print(json.dumps([sent, repr(error) if error else None]))
"""


@pytest.mark.integration
def test_two_processes_replaying_one_spool_send_each_batch_once(
    tracker: StandInTracker, own_broker: RedisServer, tmp_path: Path
) -> None:
    config = {"BACKEND": "celery", "TRACKING_URL": tracker.url, "SPOOL_DIR": str(tmp_path), **FAST}
    store = spool.Spool(tmp_path, max_bytes=10**9, max_age=3600, api_key="test-key")
    total = 600
    for n in range(total):
        store.put([command(n)])
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.site.settings",
        "KM_TEST_SITE_CONFIG": json.dumps({"kissmetrics": config, "broker_url": own_broker.url}),
        "PYTHONPATH": str(ROOT),
    }
    replayers = [
        subprocess.Popen(
            [sys.executable, "-c", REPLAYER],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in replayers:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
    for p in replayers:  # Both start replaying at the same moment, once both are ready.
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.communicate(timeout=40)[0]) for p in replayers]
    assert [error for _, error in results] == [None, None]
    counts = [sent for sent, _ in results]
    assert sum(counts) == total
    assert all(counts), f"one process replayed everything: {counts}"
    assert store.status().count == 0
    with WorkerProcess(own_broker.url, config):
        wait_until(lambda: len(tracker.hits) >= total, 30, "delivery")
        time.sleep(1.0)
    assert Counter(h.person for h in tracker.hits) == {f"person-{n}": 1 for n in range(total)}


# The management command.


@pytest.mark.integration
def test_the_command_shows_replays_and_purges(
    own_broker: RedisServer,
    km_settings: Callable[..., None],
    spool_dir: Path,
    capsys: pytest.CaptureFixture[str],
    failed: list[Command],
) -> None:
    km_settings(BACKEND="celery", SPOOL_DIR=str(spool_dir))
    store = the_spool()
    now = int(time.time())
    store.put([command(1, now - 7200)])
    store.put([command(2, now - 60), command(3, now)])
    call_command("kissmetrics_spool", "status")
    out = capsys.readouterr().out
    assert "entries: 2 (0 being replayed)" in out
    assert "commands: 3" in out
    assert time.strftime("%Y-%m-%dT%H", time.gmtime(now - 7200)) in out
    call_command("kissmetrics_spool", "purge", "--older-than", "1h")
    assert "purged 1 command(s)" in capsys.readouterr().out
    assert failed == [command(1, now - 7200)]
    call_command("kissmetrics_spool", "replay")
    assert "replayed 2 command(s)" in capsys.readouterr().out
    # One message on the real broker, carrying both commands with their times.
    (message,) = redis.Redis.from_url(own_broker.url).lrange("celery", 0, -1)
    body = json.loads(base64.b64decode(json.loads(message)["body"]))
    assert body[0] == [[c.to_wire() for c in (command(2, now - 60), command(3, now))]]
    assert the_spool().status().count == 0
    with pytest.raises(CommandError, match="invalid age"):
        call_command("kissmetrics_spool", "purge", "--older-than", "soon")


# A fork with threads running is the point (gunicorn --preload forks a process that has
# imported the package); Python 3.12+ warns about it.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_uses_a_connection_of_its_own(spool_dir: Path) -> None:
    store = the_spool()
    store.put([command(1)])  # The parent's connection is open across the fork.
    pid = os.fork()
    if pid == 0:  # pragma: no cover  (the child)
        code = 0
        try:
            the_spool().put([command(2)])
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.put([command(3)])
    sent: list[Command] = []
    assert spool.replay(store, lambda c: sent.extend(c)) == (3, None)
    assert sorted(c.person for c in sent) == ["person-1", "person-2", "person-3"]


# The folder is the site's own, and so are its entries.


@pytest.fixture
def secret_spool(tmp_path: Path, km_settings: Callable[..., None]) -> Path:
    """The setting names ``tmp_path/spool``, which the test prepares."""
    folder = tmp_path / "spool"
    km_settings(SPOOL_DIR=str(folder))
    return folder


def spooled_visit(caplog: pytest.LogCaptureFixture, failed: list[Command]) -> list[str]:
    """keep() one command, as the publisher does when the broker fails; the ERROR lines."""
    caplog.clear()
    one = command(1)
    assert spool.keep([one], ConnectionError("broker down"), "could not queue") is False
    assert failed == [one]  # Logged in full and signalled: not lost silently.
    return [x for x in errors(caplog) if "the spool cannot be used" in x]


def test_a_folder_another_user_made_first_is_refused_and_left_alone(
    secret_spool: Path,
    caplog: pytest.LogCaptureFixture,
    failed: list[Command],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret_spool.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(secret_spool, 65534, 65534)  # nobody: someone else got there first.
        other = 65534
    else:
        # Without root no folder can be given away: this process plays another user.
        other = os.geteuid()
        monkeypatch.setattr(spool, "_uid", lambda: other + 1)
    (line,) = spooled_visit(caplog, failed)
    assert str(secret_spool) in line
    assert f"belongs to user id {other}" in line
    assert "SPOOL_DIR" in line  # The fix.
    assert list(secret_spool.iterdir()) == []
    failed.clear()
    assert spooled_visit(caplog, failed) == []  # Said once per process, not per batch.


def test_a_folder_open_to_others_is_refused(
    secret_spool: Path, caplog: pytest.LogCaptureFixture, failed: list[Command]
) -> None:
    secret_spool.mkdir()
    secret_spool.chmod(0o777)
    (line,) = spooled_visit(caplog, failed)
    assert f"{secret_spool} has mode 0777" in line
    assert f"chmod 700 {secret_spool}" in line
    assert list(secret_spool.iterdir()) == []


def test_a_symbolic_link_is_refused(
    secret_spool: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, failed: list[Command]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    secret_spool.symlink_to(elsewhere)
    (line,) = spooled_visit(caplog, failed)
    assert f"{secret_spool} is a symbolic link" in line
    assert list(elsewhere.iterdir()) == []


def test_the_folder_is_0700_and_its_files_0600_whatever_the_umask(secret_spool: Path) -> None:
    previous = os.umask(0o022)  # The usual umask: 0755 folders, 0644 files.
    try:
        store = the_spool()
        store.put([command(1)])
        names = sorted(p.name for p in secret_spool.iterdir())
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in secret_spool.iterdir()}
    finally:
        os.umask(previous)
    assert names == [spool.FILENAME, f"{spool.FILENAME}-shm", f"{spool.FILENAME}-wal"]
    assert set(modes.values()) == {"0o600"}, modes
    assert oct(secret_spool.stat().st_mode & 0o777) == "0o700"


def test_files_an_earlier_version_left_readable_are_tightened(secret_spool: Path) -> None:
    secret_spool.mkdir(mode=0o700)
    old = spool.Spool(secret_spool, max_bytes=10**6, max_age=3600)
    old.put([command(1)])
    old.close()
    (secret_spool / spool.FILENAME).chmod(0o644)
    the_spool().put([command(2)])
    assert {oct(p.stat().st_mode & 0o777) for p in secret_spool.iterdir()} == {"0o600"}


def test_the_check_names_an_unfit_spool_folder(secret_spool: Path) -> None:
    from django_kissmetrics.checks import check_settings

    secret_spool.mkdir(mode=0o755)
    (message,) = [m for m in check_settings() if m.id == "django_kissmetrics.E005"]
    assert str(secret_spool) in message.msg
    assert "chmod 700" in message.msg
    secret_spool.chmod(0o700)
    assert [m for m in check_settings() if m.id == "django_kissmetrics.E005"] == []


def test_a_malformed_entry_is_moved_aside_and_the_others_replay(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    store = the_spool()
    for n in range(5):
        store.put([command(n, int(time.time()) - 100 + n)])
    planted = {
        2: "not json",
        3: json.dumps([["drop", "x", "y", {}, 1]]),  # A kind that does not exist.
        4: json.dumps([["record", "x", "y", {"amount": {"nested": 1}}, 1]]),  # Not text.
    }
    with contextlib.closing(sqlite3.connect(spool_dir / spool.FILENAME)) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM entries ORDER BY id")]
        for n, payload in planted.items():
            db.execute("UPDATE entries SET payload = ? WHERE id = ?", (payload, ids[n]))
        db.commit()
    sent: list[Command] = []
    assert spool.replay(store, lambda c: sent.extend(c)) == (2, None)
    assert [c.person for c in sent] == ["person-0", "person-1"]
    lines = [x for x in errors(caplog) if "malformed" in x]
    assert len(lines) == 3
    assert all("quarantine" in x for x in lines)
    status = store.status()
    assert (status.count, status.quarantined) == (0, 3)
    with contextlib.closing(sqlite3.connect(spool_dir / spool.FILENAME)) as db:
        kept = [row[0] for row in db.execute("SELECT payload FROM quarantine ORDER BY id")]
    assert kept == list(planted.values())  # Kept as found, for a person to look at.


def test_an_entry_made_with_another_key_is_left_for_its_site(
    spool_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = spool.Spool(spool_dir, max_bytes=10**6, max_age=3600, api_key="other-site-key")
    other.put([command(1)])
    store = the_spool()
    assert store.api_key == "test-key"
    store.put([command(2)])
    sent: list[Command] = []
    assert spool.replay(store, lambda c: sent.extend(c)) == (1, None)
    assert [c.person for c in sent] == ["person-2"]
    assert store.next_due() is None  # Nothing of its own left: no wake-ups for the other's.
    status = store.status()
    assert (status.count, status.other_keys) == (0, 1)
    call_command("kissmetrics_spool", "status")
    assert "entries of other API keys: 1" in capsys.readouterr().out
    # Its own site replays it.
    assert spool.replay(other, lambda c: sent.extend(c)) == (1, None)
    assert [c.person for c in sent] == ["person-2", "person-1"]


def test_entries_spooled_before_keys_were_recorded_are_replayed(spool_dir: Path) -> None:
    import sqlite3

    (spool_dir / spool.FILENAME).unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(spool_dir / spool.FILENAME)) as db:
        db.execute(
            "CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, oldest INTEGER NOT NULL,"
            " newest INTEGER NOT NULL, created REAL NOT NULL, not_before REAL NOT NULL,"
            " size INTEGER NOT NULL, count INTEGER NOT NULL, payload TEXT NOT NULL,"
            " claimed_by TEXT, claimed_at REAL)"
        )
        old = command(1)  # One command: each call stamps the current second.
        wire = json.dumps([old.to_wire()])
        at = old.timestamp
        db.execute(
            "INSERT INTO entries (oldest, newest, created, not_before, size, count, payload)"
            " VALUES (?, ?, ?, ?, ?, 1, ?)",
            (at, at, time.time(), 0, len(wire), wire),
        )
        db.commit()
    sent: list[Command] = []
    assert spool.replay(the_spool(), lambda c: sent.extend(c)) == (1, None)
    assert sent == [old]


def test_purge_everything_takes_entries_timed_in_the_future(
    spool_dir: Path, failed: list[Command], capsys: pytest.CaptureFixture[str]
) -> None:
    store = the_spool()
    later = int(time.time()) + 3600  # A clock that was ahead, or a planted entry.
    store.put([command(1, later)])
    store.put([command(2)])
    call_command("kissmetrics_spool", "purge", "--older-than", "0")
    assert "purged 2 command(s)" in capsys.readouterr().out
    assert store.status().count == 0
    assert sorted(c.person for c in failed) == ["person-1", "person-2"]
