"""Delivery through Django Tasks (``BACKEND = "tasks"``): one task per batch, no Celery.

The framework is Django's own ``django.tasks`` (Django 6.0+), else the ``django-tasks``
backport; the queue is whatever ``TASKS`` configures (``django-tasks-db`` and its
``db_worker``, RQ, a cloud service). Requests hand their commands to the same
per-process publisher as the Celery backend, which enqueues one :func:`deliver` task
per window and spools what the queue does not take.

Django Tasks has no retry of its own, so :func:`deliver` enqueues the failed commands
again, alone, with ``run_after`` set to the backoff. Nor does every queue give a task
back when its worker dies (``db_worker`` leaves it "running" for good), so a batch is
kept in the spool while it is delivered, due :func:`lease` seconds later, and deleted
once it is settled: the batch of a worker killed mid-way is replayed from the spool.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from . import delivery, publisher, spool, undelivered
from .commands import Command
from .conf import Settings, get_settings

try:  # Django 6.0+.
    from django.tasks import task, task_backends
except ImportError:  # The backport (django-kissmetrics-sdk[tasks]); ImportError without it.
    from django_tasks import (  # type: ignore[import-not-found,no-redef,assignment,unused-ignore]
        task,
        task_backends,
    )

if TYPE_CHECKING:
    from .ping import Report

logger = logging.getLogger(__name__)

__all__ = ["deliver", "lease", "ping", "ping_through_tasks", "task_backends", "try_enqueue"]


def _configured(function: Any, conf: Settings, **changes: Any) -> Any:
    """``function`` on the ``TASKS`` alias and queue the settings name."""
    if conf.TASKS_QUEUE:
        changes["queue_name"] = conf.TASKS_QUEUE
    return function.using(backend=conf.TASKS_BACKEND, **changes)


def try_enqueue(commands: Sequence[Command]) -> BaseException | None:
    """Enqueue one :func:`deliver` task; return the queue's error, or None once it is queued.

    The publisher's counterpart of the Celery publish (``publisher.try_publish``).
    """
    return _enqueue([c.to_wire() for c in commands], 0, None)


def _enqueue(wire: list[Any], attempt: int, delay: float | None) -> BaseException | None:
    changes: dict[str, Any] = {}
    if delay is not None:
        changes["run_after"] = timezone.now() + datetime.timedelta(seconds=delay)
    try:
        _configured(deliver, get_settings(), **changes).enqueue(wire, attempt)
    except Exception as exc:
        # A database queue's connection may be broken for good (a restarted server):
        # this thread's connections are opened afresh on the next try.
        from django.db import connections

        for connection in connections.all(initialized_only=True):
            connection.close_if_unusable_or_obsolete()
        return exc
    return None


def lease(commands: Sequence[Command], conf: Settings) -> float:
    """Seconds a batch stays held in the spool while a worker delivers it.

    Twice the longest its delivery can take (aliases one at a time, then rounds of
    ``DELIVERY_CONCURRENCY``, each up to ``TIMEOUT``) plus five: past that, a worker is
    taken for dead and the spool replays the batch.
    """
    aliases = sum(1 for c in commands if c.kind == "alias")
    rounds = aliases + math.ceil((len(commands) - aliases) / conf.DELIVERY_CONCURRENCY)
    return 2 * conf.TIMEOUT * max(rounds, 1) + 5.0


def _hold(commands: Sequence[Command], conf: Settings) -> list[int] | None:
    store = spool.get_spool(conf)
    if store is None:
        return None  # ON_ENQUEUE_FAILURE = "log": no spool, and no replay after a crash.
    # The publisher of this process replays what a killed worker held, once it is due.
    publisher.get_publisher()
    try:
        return store.add(commands, delay=lease(commands, conf))
    except spool.SpoolError as exc:
        logger.warning("Kissmetrics: cannot hold the batch in the spool: %s", exc)
        return None


def _release(entries: list[int] | None, conf: Settings) -> None:
    store = spool.get_spool(conf)
    if not entries or store is None:
        return
    try:
        store.delete(entries)
    except spool.SpoolError as exc:  # Then it is replayed once due: a duplicate, not a loss.
        logger.warning("Kissmetrics: cannot release the batch held in the spool: %s", exc)


def _spool(commands: list[Command], error: BaseException, reason: str, *, delay: float) -> None:
    if spool.keep(commands, error, reason, delay=delay):
        publisher.get_publisher().replay_after(delay)


@task
def deliver(commands: list[Any], attempt: int = 0) -> int:
    """Deliver ``commands`` (``Command.to_wire()`` forms); return how many were delivered.

    The failed ones with a retriable error are enqueued again, alone, after a backoff
    (``run_after``), each with the ``_t`` of its call; after ``MAX_RETRIES`` they go to the
    spool, replayed ``RETRY_BACKOFF_MAX`` seconds later. Refusals for good (4xx) are
    given up at once. ``attempt`` counts the tries before this one.
    """
    conf = get_settings()
    batch = [Command.from_wire(c) for c in commands]
    held = _hold(batch, conf)
    try:
        return _deliver(batch, attempt, conf)
    finally:
        _release(held, conf)


def _deliver(batch: list[Command], attempt: int, conf: Settings) -> int:
    try:
        failures = delivery.deliver(batch)
    except Exception as exc:  # Not the tracker's answer: a worker without an API key, a bug.
        delivery.give_up(batch, exc, "delivery raised")
        return 0
    permanent = [(c, e) for c, e in failures if not e.retriable]
    if permanent:
        delivery.give_up([c for c, _ in permanent], permanent[-1][1], "refused by the server")
    retriable = [(c, e) for c, e in failures if e.retriable]
    if retriable:
        commands, error = [c for c, _ in retriable], retriable[-1][1]
        if attempt >= conf.MAX_RETRIES:
            reason = f"gave up after {attempt + 1} attempts"
            _spool(commands, error, reason, delay=conf.RETRY_BACKOFF_MAX)
        else:
            retry_after = max((e.retry_after or 0.0) for _, e in retriable) or None
            delay = undelivered.backoff(attempt, retry_after)
            failed = _enqueue([c.to_wire() for c in commands], attempt + 1, delay)
            if failed is not None:
                # A queue that is down, or one that cannot defer (the immediate backend):
                # the spool waits out the backoff instead.
                _spool(commands, failed, "could not queue a retry", delay=delay)
    return len(batch) - len(failures)


@task
def ping(command: list[Any] | dict[str, Any]) -> dict[str, Any]:
    """``kissmetrics_ping``'s test event: deliver it once; return the tracker's answer."""
    from .ping import deliver_once

    return deliver_once(command)


def ping_through_tasks(conf: Settings, command: Command, deadline: float, report: Report) -> None:
    """The ping's hops through Django Tasks: enqueued, picked up, the tracker's answer."""
    from .ping import PingFailed, worker_answer

    try:
        configured = _configured(ping, conf)
        backend = configured.get_backend()
        started = time.monotonic()
        result = configured.enqueue(command.to_wire())
    except Exception as exc:
        raise PingFailed("tasks", f"could not enqueue the ping task: {exc}") from None
    where = (
        f"TASKS[{conf.TASKS_BACKEND!r}] ({type(backend).__name__}), queue {configured.queue_name!r}"
    )
    report("tasks", f"enqueued on {where}, task {result.id}")

    def wait(still: set[str]) -> bool:
        while result.status in still:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
            result.refresh()
        return True

    if not result.is_finished and not backend.supports_get_result:
        raise PingFailed("worker", f"{where} cannot report a task's progress: see its worker's log")
    if not wait({"READY"}):
        raise PingFailed(
            "worker",
            f"no worker took the ping task from {where} in {deadline - started:.0f} s "
            "(is a worker running, such as `python manage.py db_worker`?)",
        )
    worker = result.worker_ids[-1] if result.worker_ids else "a worker"
    report("worker", f"{worker} took the task in {time.monotonic() - started:.2f} s")
    started = time.monotonic()
    if not wait({"READY", "RUNNING"}):
        raise PingFailed("tracking server", f"{worker} reported no answer from the tracking server")
    if result.status != "SUCCESSFUL":
        error = result.errors[-1].traceback.strip().splitlines()[-1] if result.errors else "?"
        raise PingFailed("worker", f"the ping task failed on {worker}: {error}")
    worker_answer(result.return_value or {}, conf, worker, time.monotonic() - started, report)
