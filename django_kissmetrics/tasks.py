"""Celery delivery: one task per batch of commands, retrying only what failed."""

from __future__ import annotations

import random
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject

from . import delivery, publisher, spool
from .commands import Command
from .conf import ConfigurationError, get_settings
from .exceptions import TrackingError

__all__ = ["backoff", "deliver", "ping"]


def backoff(retries: int, retry_after: float | None = None) -> float:
    """Seconds before retry number ``retries + 1``: exponential, jittered, capped.

    The cap (``RETRY_BACKOFF_MAX``) must stay well under the broker's visibility
    timeout, or Redis hands a waiting message to a second worker.
    """
    conf = get_settings()
    delay = conf.RETRY_BACKOFF * (2**retries) * random.uniform(0.5, 1.5)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return float(min(delay, conf.RETRY_BACKOFF_MAX))


@shared_task(
    bind=True,
    name="django_kissmetrics.deliver",
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
    ignore_result=True,
)
def deliver(self: Task[Any, Any], commands: list[list[Any] | dict[str, Any]]) -> int:
    """Deliver ``commands`` (``Command.to_wire()`` forms); return how many were delivered.

    Those that fail with a retriable error are sent again, alone, after a backoff;
    each keeps the ``_t`` of its original call, so Kissmetrics sees the same record.
    After ``MAX_RETRIES`` they go to the spool, to be replayed ``RETRY_BACKOFF_MAX``
    seconds later; refusals for good (4xx) are given up at once.
    """
    batch = [Command.from_wire(c) for c in commands]
    try:
        failures = delivery.deliver(batch)
    except ConfigurationError as exc:
        # This worker lost its key (or another setting) after it started: a worker with
        # a good configuration, or this one fixed, replays them from the spool.
        _spool(batch, exc, "this worker cannot deliver", delay=get_settings().RETRY_BACKOFF_MAX)
        return 0
    except Exception as exc:
        # Not an answer from the tracker (a worker without an API key, a bug): Celery
        # would log only the exception and drop the message, commands and all.
        delivery.give_up(batch, exc, "delivery raised")
        return 0
    if not failures:
        return len(batch)
    permanent = [(c, e) for c, e in failures if not e.retriable]
    if permanent:
        delivery.give_up([c for c, _ in permanent], permanent[-1][1], "refused by the server")
    retriable = [(c, e) for c, e in failures if e.retriable]
    if not retriable:
        return len(batch) - len(failures)
    error = retriable[-1][1]
    retries = self.request.retries
    conf = get_settings()
    if retries >= conf.MAX_RETRIES:
        # The tracker stayed unreachable: keep the commands for a later round rather
        # than drop them; the spool gives them up past SPOOL_MAX_AGE.
        _spool(
            [c for c, _ in retriable],
            error,
            f"gave up after {retries + 1} attempts",
            delay=conf.RETRY_BACKOFF_MAX,
        )
        return len(batch) - len(failures)
    retry_after = max((e.retry_after or 0.0) for _, e in retriable) or None
    try:
        raise self.retry(
            args=([c.to_wire() for c, _ in retriable],),
            countdown=backoff(retries, retry_after),
            exc=error,
        )
    except Reject as rejected:
        # Celery could not queue the retry (the broker is unreachable) and rejects the
        # message without requeueing it: the commands would be gone without a trace.
        cause = rejected.__context__ or rejected  # The broker's error.
        _spool([c for c, _ in retriable], cause, "could not queue a retry", delay=0.0)
        return len(batch) - len(failures)


def _spool(commands: list[Command], error: BaseException, reason: str, *, delay: float) -> None:
    # This process's publisher replays the spool through the broker once it answers
    # (any other process of the site may do it first).
    if spool.keep(commands, error, reason, delay=delay):
        publisher.get_publisher().replay_after(delay)


@shared_task(bind=True, name="django_kissmetrics.ping", ignore_result=True)
def ping(self: Task[Any, Any], command: list[Any] | dict[str, Any], reply_to: str) -> None:
    """``kissmetrics_ping``'s test event: deliver it once and report each hop to ``reply_to``.

    The replies go through the broker itself (a queue the command waits on), so the ping
    needs no result backend: first that this worker took the task, then what the
    tracking server answered. No retries: the command is waiting for the answer.
    """
    worker = self.request.hostname or "a worker"

    def reply(**answer: Any) -> None:
        with self.app.producer_or_acquire() as producer:
            producer.publish(
                {"worker": worker, **answer},
                exchange="",
                routing_key=reply_to,
                serializer="json",
                retry=True,
                retry_policy={"max_retries": 3},
            )

    reply(hop="worker")
    try:
        conf = get_settings()
        api = delivery.client()
    except ConfigurationError as exc:
        # The worker's own settings, not the tracking server, are what failed.
        reply(hop="worker configuration", error=str(exc))
        return
    answer: dict[str, Any] = {"hop": "tracking server", "url": conf.TRACKING_URL}
    try:
        answer["status"] = api.send(Command.from_wire(command))
    except TrackingError as exc:
        answer.update(status=exc.status, error=str(exc))
    except Exception as exc:  # A worker without an API key, a bad setting: say so.
        answer.update(status=None, error=f"{type(exc).__name__}: {exc}")
    reply(**answer)
