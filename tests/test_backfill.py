"""``kissmetrics_backfill``: existing rows reach the tracker as past events, with their own time.

The integration tests run the command against the celery backend with a real worker on
the real Redis broker and a stand-in tracker on loopback: what the tracker receives is
what Kissmetrics would.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone

from django_kissmetrics.commands import Command
from django_kissmetrics.testing import Hit, StandInTracker
from tests.backends import CountingBackend
from tests.conftest import free_port, wait_until
from tests.models import Order, Subscription

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent

UTC = dt.timezone.utc
JAN = dt.datetime(2021, 1, 4, 9, 30, tzinfo=UTC)


def backfill(*args: str, **kwargs: Any) -> tuple[str, str]:
    """Run the command; return its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    call_command("kissmetrics_backfill", *args, stdout=out, stderr=err, **kwargs)
    return out.getvalue(), err.getvalue()


def make_users(count: int) -> list[User]:
    users = []
    for i in range(count):
        user = User.objects.create_user(f"user{i}", email=f"user{i}@shop.test")
        user.date_joined = JAN + dt.timedelta(days=i, seconds=i)
        user.save(update_fields=["date_joined"])
        users.append(user)
    return users


def by_person(hits: list[Hit]) -> dict[str, Hit]:
    return {h.person: h for h in hits}


@pytest.fixture
def via_worker(
    tracker: StandInTracker, km_settings: Callable[..., None], celery_worker: Any
) -> StandInTracker:
    """The celery backend, a real worker on the real broker, the stand-in tracker behind it."""
    km_settings(BACKEND="celery", TRACKING_URL=tracker.url)
    return tracker


def test_signups_arrive_with_date_joined(via_worker: StandInTracker) -> None:
    users = make_users(7)
    out, _ = backfill("signups", "--chunk-size", "3")
    hits = via_worker.wait_for(7)
    assert len(hits) == 7
    for user in users:
        hit = by_person(hits)[str(user.pk)]
        assert (hit.path, hit.name) == ("/e", "Signed Up")
        assert hit.params["_t"] == str(int(user.date_joined.timestamp()))
        assert hit.params["_d"] == "1"
    assert "7 rows read, 7 commands sent in 3 deliveries" in out
    assert f"last pk: {users[-1].pk}" in out


def test_model_rows_through_identity_with_properties_and_filter(
    via_worker: StandInTracker, km_settings: Callable[..., None]
) -> None:
    # IDENTITY by e-mail: the foreign key goes through it, not through the user's pk.
    km_settings(
        BACKEND="celery", TRACKING_URL=via_worker.url, IDENTITY="tests.backends.email_identity"
    )
    ann, bob = make_users(2)
    paid = [
        Order.objects.create(
            user=user, placed_at=JAN + dt.timedelta(hours=i), total=Decimal("49.50"), plan="pro"
        )
        for i, user in enumerate([ann, bob, ann])
    ]
    Order.objects.create(user=ann, placed_at=JAN, status="refunded")  # Filtered out.
    Order.objects.create(user=bob, placed_at=None)  # No time: skipped and counted.
    Order.objects.create(user=None, placed_at=JAN)  # No person: skipped and counted.
    out, _ = backfill(
        "--model=tests.Order",
        "--event=Placed Order",
        "--time-field=placed_at",
        "--identity-field=user",
        "--property=Total=total",
        "--property=Plan=plan",
        "--filter=status=paid",
    )
    hits = via_worker.wait_for(3)
    assert sorted((h.person, h.params["_t"]) for h in hits) == sorted(
        (o.user.email, str(int(o.placed_at.timestamp())))
        for o in paid  # type: ignore[union-attr]
    )
    assert {h.name for h in hits} == {"Placed Order"}
    assert all(h.params["_d"] == "1" for h in hits)
    assert all(h.properties == {"Total": "49.50", "Plan": "pro"} for h in hits)
    assert "5 rows read, 3 commands sent in 1 delivery, 2 rows skipped" in out
    assert "1 without a time, 1 without an identity" in out


def test_set_sets_person_properties_at_the_rows_date(via_worker: StandInTracker) -> None:
    Subscription.objects.create(email="ann@shop.test", plan="pro", started=dt.date(2022, 3, 1))
    Subscription.objects.create(email="bob@shop.test", plan="team", started=dt.date(2022, 5, 9))
    backfill(
        "--model=tests.Subscription",
        "--set",
        "--time-field=started",
        "--identity-field=email",
        "--property=Plan=plan",
    )
    hits = by_person(via_worker.wait_for(2))
    assert hits["ann@shop.test"].path == "/s"
    assert hits["ann@shop.test"].properties == {"Plan": "pro"}
    assert hits["bob@shop.test"].properties == {"Plan": "team"}
    # A date is the start of that day, in TIME_ZONE.
    midnight = dt.datetime(2022, 5, 9, tzinfo=timezone.get_default_timezone())
    assert hits["bob@shop.test"].params["_t"] == str(int(midnight.timestamp()))
    assert hits["bob@shop.test"].params["_d"] == "1"


def test_dry_run_prints_the_commands_and_sends_nothing(
    tracker: StandInTracker, km_settings: Callable[..., None]
) -> None:
    km_settings(BACKEND="sync", TRACKING_URL=tracker.url)
    users = make_users(3)
    out, err = backfill("signups", "--dry-run")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(c["kind"], c["person"], c["name"], c["timestamp"]) for c in lines] == [
        ("record", str(u.pk), "Signed Up", int(u.date_joined.timestamp())) for u in users
    ]
    assert "3 commands would send" in err
    assert tracker.hits == []


def test_after_pk_resumes_where_a_run_stopped(km_outbox: list[Command]) -> None:
    users = make_users(5)
    out, _ = backfill("signups", "--after-pk", str(users[1].pk))
    assert [c.person for c in km_outbox] == [str(u.pk) for u in users[2:]]
    assert f"last pk: {users[-1].pk}" in out


def test_a_rerun_sends_identical_records(km_outbox: list[Command]) -> None:
    make_users(3)
    backfill("signups")
    first = list(km_outbox)
    km_outbox.clear()
    backfill("signups")
    assert km_outbox == first


def test_one_delivery_per_chunk(km_settings: Callable[..., None]) -> None:
    km_settings(BACKEND="tests.backends.CountingBackend")
    CountingBackend.calls.clear()
    make_users(5)
    backfill("signups", "--chunk-size=2")
    assert [len(call) for call in CountingBackend.calls] == [2, 2, 1]


def test_since_and_until(km_outbox: list[Command]) -> None:
    users = make_users(5)  # Joined on 4, 5, 6, 7 and 8 January 2021, at 09:30 UTC.
    backfill("signups", "--since=2021-01-05", "--until=2021-01-07T12:00:00+02:00")
    assert [c.person for c in km_outbox] == [str(u.pk) for u in users[1:4]]
    km_outbox.clear()
    # Without an offset, in TIME_ZONE: 09:30 UTC is 10:30 in Paris.
    with override_settings(TIME_ZONE="Europe/Paris"):
        backfill("signups", "--since=2021-01-04T10:30:00", "--until=2021-01-05T10:30:01")
    assert [c.person for c in km_outbox] == [str(users[0].pk)]


@override_settings(USE_TZ=False, TIME_ZONE="Europe/Paris")
def test_naive_times_are_in_time_zone(km_outbox: list[Command]) -> None:
    # Without USE_TZ, Django keeps local times in TIME_ZONE: 10:30 in Paris is 09:30 UTC.
    user = User.objects.create_user("naive")
    Order.objects.create(placed_at=dt.datetime(2021, 1, 4, 10, 30), user=user)
    backfill(
        "--model=tests.Order",
        "--event=Placed Order",
        "--time-field=placed_at",
        "--identity-field=user",
        "--since=2021-01-04T10:30",
    )
    (command,) = km_outbox
    assert command.timestamp == int(JAN.timestamp())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model=tests.Nope", "--event=E", "--time-field=placed_at"], "not an installed model"),
        (["--model=nodots", "--event=E", "--time-field=placed_at"], "app_label.ModelName"),
        (["--model=tests.Order", "--event=E", "--time-field=when"], "has no field 'when'"),
        (["--model=tests.Order", "--event=E", "--time-field=plan"], "not a DateField"),
        (["--model=tests.Order", "--event=E", "--time-field=placed_at"], "--identity-field"),
        (
            ["--model=tests.Order", "--event=E", "--time-field=placed_at", "--identity-field=x"],
            "has no field 'x'",
        ),
        (["signups", "--since=last tuesday"], "--since 'last tuesday' is not a date"),
        (["signups", "--until=2021-02-30"], "--until '2021-02-30' is not a date"),
        (["signups", "--property=Total"], "NAME=FIELD"),
        (["signups", "--property=Total=nope"], "has no field 'nope'"),
        (["signups", "--filter=nope=1"], "--filter"),
        (["signups", "--filter=id=abc"], "--filter"),
        (["signups", "--after-pk=abc"], "--after-pk 'abc'"),
        (["signups", "--model=tests.Order"], "signups takes no --model"),
        (["--model=tests.Order"], "--time-field"),
        (["--model=auth.User", "--set", "--time-field=date_joined"], "at least one --property"),
        (["signups", "--chunk-size=0"], "--chunk-size"),
    ],
)
def test_bad_input_is_a_clear_command_error(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace("+", r"\+")):
        backfill(*args)


def test_no_signup_event_or_no_tracking_is_a_command_error(
    km_settings: Callable[..., None],
) -> None:
    km_settings(SIGNUP_EVENT=None)
    with pytest.raises(CommandError, match="SIGNUP_EVENT"):
        backfill("signups")
    km_settings(API_KEY=None)
    with pytest.raises(CommandError, match="tracking is off"):
        backfill("--model=auth.User", "--event=Joined", "--time-field=date_joined")


def on_a_terminal(*args: str) -> str:
    """Run the command with stderr on a real pseudo-terminal; return what it showed there."""
    primary, secondary = os.openpty()
    try:
        with open(secondary, "w", closefd=False) as terminal:
            call_command("kissmetrics_backfill", *args, stdout=io.StringIO(), stderr=terminal)
        os.set_blocking(primary, False)
        try:
            return os.read(primary, 65536).decode()
        except BlockingIOError:
            return ""
    finally:
        os.close(secondary)
        os.close(primary)


def test_progress_bar_on_a_terminal_only(km_outbox: list[Command]) -> None:
    make_users(4)
    shown = on_a_terminal("signups")
    assert "4/4 rows" in shown
    assert "rows/s" in shown
    assert "ETA 0:00" in shown
    # --quiet on a terminal, or no terminal: nothing on stderr.
    assert on_a_terminal("signups", "--quiet") == ""
    assert backfill("signups")[1] == ""


class InterruptedBackend(CountingBackend):
    """Ctrl-C while the second chunk is being handed over."""

    def send(self, commands: Sequence[Command]) -> None:
        if len(self.calls) == 1:
            raise KeyboardInterrupt
        super().send(commands)


def test_an_interrupted_run_says_where_to_resume(km_settings: Callable[..., None]) -> None:
    km_settings(BACKEND="tests.test_backfill.InterruptedBackend")
    CountingBackend.calls.clear()
    users = make_users(5)
    with pytest.raises(CommandError, match=f"resume with --after-pk {users[1].pk}"):
        backfill("signups", "--chunk-size=2")
    assert [c.person for c in CountingBackend.calls[0]] == [str(u.pk) for u in users[:2]]
    km_settings(BACKEND="tests.backends.CountingBackend")
    CountingBackend.calls.clear()
    backfill("signups", "--chunk-size=2", f"--after-pk={users[1].pk}")
    assert [c.person for call in CountingBackend.calls for c in call] == [
        str(u.pk) for u in users[2:]
    ]


def test_filter_on_a_related_field(km_outbox: list[Command]) -> None:
    ann, bob = make_users(2)
    User.objects.filter(pk=bob.pk).update(is_active=False)
    for user in (ann, bob):
        Order.objects.create(user=user, placed_at=JAN)
    backfill(
        "--model=tests.Order",
        "--event=Placed Order",
        "--time-field=placed_at",
        "--identity-field=user",
        "--filter=user__is_active=True",
    )
    assert [c.person for c in km_outbox] == [str(ann.pk)]


def test_a_separate_process_publishes_everything_before_it_exits(
    via_worker: StandInTracker, tmp_path: Path, redis_url: str
) -> None:
    # The publisher is a daemon thread of the command's process: what it still held
    # when the process exited would be lost. 1,200 users, chunks of 500: three messages.
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.backfill_settings",
        "KM_BACKFILL_DB": str(tmp_path / "site.sqlite3"),
        "KM_TEST_REDIS_URL": redis_url,
    }
    create = (
        "import datetime as dt; from django.contrib.auth.models import User;"
        "t = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc);"
        "User.objects.bulk_create(User(username=f'u{i}', password='!',"
        " date_joined=t + dt.timedelta(hours=i)) for i in range(1200))"
    )

    def manage(*args: str, status: int = 0, **more: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "django", *args],
            cwd=ROOT,
            env={**env, **more},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == status, done.stderr
        return done

    manage("migrate", "--run-syncdb", "-v", "0")
    manage("shell", "-c", create)
    out = manage("kissmetrics_backfill", "signups").stdout
    assert "1200 rows read, 1200 commands sent in 3 deliveries" in out

    # A call that outlived TIMEOUT on this loaded in-process stand-in may have been
    # counted before its retry: the same _p, _n and _t, which Kissmetrics de-duplicates.
    def distinct() -> list[Any]:
        return list({tuple(sorted(h.params.items())): h for h in via_worker.hits}.values())

    wait_until(lambda: len(distinct()) >= 1200, 60, "1200 distinct events")
    hits = distinct()
    assert len(hits) == 1200
    start = int(dt.datetime(2020, 1, 1, tzinfo=UTC).timestamp())
    assert sorted(int(h.params["_t"]) for h in hits) == [start + 3600 * i for i in range(1200)]
    assert {h.params["_d"] for h in hits} == {"1"}
    # With the broker unreachable, every lost command is logged and the run fails: rows
    # dated years back are past SPOOL_MAX_AGE, so the spool does not keep them either.
    broker_down = f"redis://127.0.0.1:{free_port()}/0"
    done = manage("kissmetrics_backfill", "signups", status=1, KM_TEST_REDIS_URL=broker_down)
    assert "1200 commands could not be queued (see the ERROR log)" in done.stderr
    lost = re.findall(r"(\d+) command\(s\) not delivered \(([^)]*)\)", done.stderr)
    assert sum(int(n) for n, _ in lost) == 1200
    assert all("older than SPOOL_MAX_AGE" in why for _, why in lost)
