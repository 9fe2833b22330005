"""Bringing history in: existing rows sent as past events or person properties.

``python manage.py kissmetrics_backfill`` is a thin shell around this module. A
:class:`Plan` says which rows become which commands; :func:`run` streams the rows in
primary-key order, makes one command per row with the row's own time as ``_t``, and hands
them to the configured backend in chunks (one delivery, one Celery message, per chunk).
Rerunning it makes the same commands, with the same ``_t``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import FieldDoesNotExist, FieldError, ValidationError
from django.core.management.base import CommandError
from django.db import models
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from . import commands as cmd
from . import publisher, shaping
from .backends import CeleryBackend, get_backend
from .commands import Command
from .conf import get_settings
from .person import identity_for
from .signals import delivery_failed
from .tracker import Tracker

logger = logging.getLogger(__name__)

__all__ = ["Plan", "Progress", "Summary", "model_plan", "parse_when", "run", "signups_plan"]

#: Rows per delivery unless ``--chunk-size`` says otherwise: one Celery message each.
CHUNK_SIZE = 500
#: Chunks the publisher may hold before the backfill waits for it: keeps memory flat
#: when the database gives rows faster than the broker takes messages.
MAX_PENDING = 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which rows become which commands."""

    #: The rows, filtered and ordered by primary key.
    queryset: models.QuerySet[Any]
    #: ``app_label.Model``, for messages.
    label: str
    #: The event to record, or ``None`` to set person properties instead.
    event: str | None
    #: The field holding each row's time (``_t``).
    time_field: models.DateField[Any, Any]
    #: Row -> the person's identity (``None``: the row has no person).
    identity: Callable[[Any], str | None]
    #: (property name, attribute of the row) pairs.
    properties: tuple[tuple[str, str], ...] = ()

    def command(self, row: Any) -> Command | None:
        """The command for ``row``, or ``None`` when it has no time."""
        when = getattr(row, self.time_field.attname)
        if when is None:
            return None
        if not isinstance(when, dt.datetime):
            when = dt.datetime.combine(when, dt.time())  # A date: the start of that day.
        if when.tzinfo is None:
            # A naive time (a date, or USE_TZ = False) is in TIME_ZONE, as Django stores it.
            when = timezone.make_aware(when, timezone.get_default_timezone())
        person = self.identity(row)
        if person is None:
            raise _NoIdentity
        properties = {name: getattr(row, attname) for name, attname in self.properties}
        if self.event is None:
            return cmd.make_set(person, properties, when)
        return cmd.make_record(person, self.event, properties, when)


class _NoIdentity(Exception):
    """A row whose identity field is empty."""


@dataclasses.dataclass
class Summary:
    """What a backfill did, for the closing line (and for resuming with ``--after-pk``)."""

    read: int = 0
    sent: int = 0
    deliveries: int = 0
    no_time: int = 0
    no_identity: int = 0
    invalid: int = 0
    #: Commands the backend reported lost (``delivery_failed`` during the run).
    failed: int = 0
    #: The primary key of the last row handed to the backend (or printed, in a dry run).
    last_pk: Any = None
    seconds: float = 0.0
    dry_run: bool = False
    interrupted: bool = False

    def __str__(self) -> str:
        verb = "would send" if self.dry_run else "sent"
        skipped = self.no_time + self.no_identity + self.invalid
        text = (
            f"{self.read} rows read, {self.sent} commands {verb}"
            + ("" if self.dry_run else f" in {_plural(self.deliveries, 'delivery', 'deliveries')}")
            + f", {skipped} rows skipped ({self.no_time} without a time, "
            f"{self.no_identity} without an identity, {self.invalid} invalid)"
            + f" in {self.seconds:.1f} s; last pk: {self.last_pk}."
        )
        if self.failed:
            text += f" {self.failed} commands could not be queued (see the ERROR log)."
        if self.interrupted and self.last_pk is not None:
            text += f" Interrupted: resume with --after-pk {self.last_pk}."
        return text


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def parse_when(value: str, option: str) -> dt.datetime | dt.date:
    """A ``--since``/``--until`` value: ``YYYY-MM-DD`` or an ISO 8601 date and time.

    A time without an offset is in ``TIME_ZONE``, as Django reads one in a query.
    """
    try:
        moment = parse_datetime(value)
        day = None if moment is not None else parse_date(value)
    except ValueError:
        moment = day = None
    if moment is not None:
        return moment
    if day is not None:
        return day
    raise CommandError(
        f"{option} {value!r} is not a date (YYYY-MM-DD) or a date and time "
        "(YYYY-MM-DDTHH:MM[:SS][+HH:MM])"
    )


def _bound(moment: dt.datetime | dt.date, field: models.DateField[Any, Any]) -> Any:
    """``--since``/``--until`` in the form ``field`` compares with."""
    if not isinstance(field, models.DateTimeField):
        return moment.date() if isinstance(moment, dt.datetime) else moment
    if not isinstance(moment, dt.datetime):
        moment = dt.datetime.combine(moment, dt.time())
    zone = timezone.get_default_timezone()
    if settings.USE_TZ and timezone.is_naive(moment):
        return timezone.make_aware(moment, zone)
    if not settings.USE_TZ and timezone.is_aware(moment):
        return timezone.make_naive(moment, zone)
    return moment


def _model(label: str) -> type[models.Model]:
    from django.apps import apps

    try:
        return apps.get_model(label)
    except (LookupError, ValueError):
        raise CommandError(
            f"--model {label!r} is not an installed model (write it as app_label.ModelName)"
        ) from None


def _field(model: type[models.Model], name: str, option: str) -> models.Field[Any, Any]:
    try:
        field = model._meta.get_field(name)
    except FieldDoesNotExist:
        names = ", ".join(f.name for f in model._meta.concrete_fields)
        raise CommandError(
            f"{option}: {model._meta.label} has no field {name!r} (its fields: {names})"
        ) from None
    if not isinstance(field, models.Field) or not field.concrete:
        raise CommandError(f"{option}: {model._meta.label}.{name} is not a column of the table")
    return field


def _pairs(values: Sequence[str], option: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise CommandError(f"{option} {value!r} must be written NAME=FIELD")
        pairs.append((name.strip(), rest.strip()))
    return pairs


def _identity_of(model: type[models.Model], name: str | None) -> tuple[Callable[[Any], Any], str]:
    """Row -> identity, and the relation to ``select_related`` ("" for none)."""
    user_model = get_user_model()
    if name is None:
        if model is not user_model:
            raise CommandError(
                f"--identity-field is needed: {model._meta.label} is not the user model"
            )
        return identity_for, ""
    if name == "pk":
        return lambda row: str(row.pk), ""
    field = _field(model, name, "--identity-field")
    if field.is_relation and field.related_model is user_model:
        attname = field.name

        def user(row: Any) -> str | None:
            related = getattr(row, attname)
            return None if related is None else identity_for(related)

        return user, attname
    attname = field.attname

    def text(row: Any) -> str | None:
        value = getattr(row, attname)
        return None if value is None or value == "" else str(value)

    return text, ""


def model_plan(
    label: str,
    *,
    event: str | None,
    time_field: str,
    identity_field: str | None,
    properties: Sequence[str] = (),
    filters: Sequence[str] = (),
    since: str | None = None,
    until: str | None = None,
    after_pk: str | None = None,
) -> Plan:
    """The plan for ``--model``; every mistake is a :class:`CommandError` saying what to fix.

    ``since`` is inclusive and ``until`` exclusive; ``event=None`` sets properties.
    """
    model = _model(label)
    if event is not None:
        try:
            event = cmd._event_name(event)
        except (TypeError, ValueError) as exc:
            raise CommandError(f"--event: {exc}") from None
    when = _field(model, time_field, "--time-field")
    if not isinstance(when, models.DateField):
        raise CommandError(
            f"--time-field: {model._meta.label}.{time_field} is a "
            f"{type(when).__name__}, not a DateField or DateTimeField"
        )
    identity, related = _identity_of(model, identity_field)
    props = tuple(
        (name, _field(model, field, "--property").attname)
        for name, field in _pairs(properties, "--property")
    )
    if event is None and not props:
        raise CommandError("--set needs at least one --property NAME=FIELD to set")
    queryset = model._default_manager.order_by("pk")
    if related:
        queryset = queryset.select_related(related)
    lookups: dict[str, Any] = dict(_pairs(filters, "--filter"))
    for option, value, lookup in (("--since", since, "gte"), ("--until", until, "lt")):
        if value is not None:
            lookups[f"{when.name}__{lookup}"] = _bound(parse_when(value, option), when)
    if after_pk is not None:
        try:
            lookups["pk__gt"] = model._meta.pk.to_python(after_pk)
        except ValidationError:
            raise CommandError(f"--after-pk {after_pk!r} is not a primary key of {label}") from None
    try:
        queryset = queryset.filter(**lookups)
    except (FieldError, ValidationError, ValueError, TypeError) as exc:
        raise CommandError(f"--filter: {exc}") from None
    return Plan(queryset, model._meta.label, event, when, identity, props)


def signups_plan(**options: Any) -> Plan:
    """``signups``: ``SIGNUP_EVENT`` for every user, at ``date_joined``, as ``IDENTITY(user)``."""
    event = get_settings().SIGNUP_EVENT
    if not event:
        raise CommandError("KISSMETRICS['SIGNUP_EVENT'] is None: there is no signup event to send")
    user_model = get_user_model()
    return model_plan(
        user_model._meta.label,
        event=event,
        time_field="date_joined",
        identity_field=None,
        **options,
    )


class Progress:
    """A one-line progress bar (count, rate, ETA) on a terminal; silent anywhere else."""

    #: Seconds between redraws.
    interval = 0.2

    def __init__(self, stream: IO[str], total: int, *, enabled: bool) -> None:
        self.stream = stream
        self.total = total
        self.enabled = enabled
        self.started = time.monotonic()
        self._drawn = 0.0

    def update(self, done: int, *, final: bool = False) -> None:
        """Redraw for ``done`` rows, at most every :attr:`interval` seconds."""
        now = time.monotonic()
        if not self.enabled or (not final and now - self._drawn < self.interval):
            return
        self._drawn = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        left = (self.total - done) / rate if rate and self.total > done else 0.0
        width = 30
        filled = width * done // self.total if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(
            f"\r[{bar}] {done:,}/{self.total:,} rows  {rate:,.0f} rows/s  "
            f"ETA {int(left) // 60}:{int(left) % 60:02d} "
        )
        if final:
            self.stream.write("\n")
        self.stream.flush()


def _chunks(rows: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _wait_for_publisher(*, final: bool) -> None:
    """Bound what the publisher holds; at the end, wait until everything is published.

    The publisher is a daemon thread of this process: a management command that
    returned with batches still in it would lose them when the process exits.
    """
    backend = get_backend()
    if not isinstance(backend, CeleryBackend) or backend.inline:
        return
    pending = publisher.get_publisher().pending
    if final or len(pending) > MAX_PENDING:
        publisher.flush(timeout=300.0)


def run(
    plan: Plan,
    *,
    chunk_size: int = CHUNK_SIZE,
    dry_run: bool = False,
    out: IO[str] = sys.stdout,
    progress: Progress | None = None,
    api_key: str | None = None,
) -> Summary:
    """Stream ``plan``'s rows and send them, one delivery per ``chunk_size`` rows.

    Every command goes to the site ``api_key`` names (default ``API_KEY``), through
    ``GLOBAL_PROPERTIES`` and ``BEFORE_SEND`` as any call outside a request does.
    With ``dry_run`` each command is printed to ``out`` as a JSON line instead. An
    interrupted run (Ctrl-C) still publishes what it handed over and returns a summary
    whose ``last_pk`` resumes it.
    """
    summary = Summary(dry_run=dry_run)
    failed: list[int] = []

    def count_failures(sender: Any, commands: Sequence[Command], **kwargs: Any) -> None:
        failed.append(len(commands))

    started = time.monotonic()
    delivery_failed.connect(count_failures, weak=False)
    sender = Tracker()
    conf = get_settings()
    key = api_key or conf.API_KEY
    try:
        for rows in _chunks(plan.queryset.iterator(chunk_size=chunk_size), chunk_size):
            made = (_command(plan, row, summary) for row in rows)
            keyed = (c._replace(api_key=key) for c in made if c is not None)
            shaped = (shaping.shape(c, conf) for c in keyed) if conf.shaping else keyed
            batch = [command for command in shaped if command is not None]
            summary.read += len(rows)
            if dry_run:
                for command in batch:
                    out.write(json.dumps(command.to_dict(), ensure_ascii=False) + "\n")
            elif batch:
                sender._send(batch)
                summary.deliveries += 1
                _wait_for_publisher(final=False)
            summary.sent += len(batch)
            summary.last_pk = rows[-1].pk
            if progress is not None:
                progress.update(summary.read)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if not dry_run:
            _wait_for_publisher(final=True)
        delivery_failed.disconnect(count_failures)
        summary.failed = sum(failed)
        summary.seconds = time.monotonic() - started
    if progress is not None:
        progress.update(summary.read, final=True)
    return summary


def _command(plan: Plan, row: Any, summary: Summary) -> Command | None:
    try:
        command = plan.command(row)
    except _NoIdentity:
        summary.no_identity += 1
        return None
    except Exception:
        # A value the tracking API cannot take (an identity over 255 characters after
        # all, a broken IDENTITY function): this row is left out, and said so.
        logger.exception("Kissmetrics backfill: %s pk=%r left out", plan.label, row.pk)
        summary.invalid += 1
        return None
    if command is None:
        summary.no_time += 1
    return command
