"""Celery delivery: one task per batch of commands, retrying only what failed.

What to retry, when, and what to spool or give up is :mod:`~django_kissmetrics.undelivered`'s
decision; this module carries it out with Celery.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject

from . import delivery, undelivered
from .commands import Command
from .conf import ConfigurationError, get_settings
from .ping import deliver_once
from .undelivered import backoff

__all__ = ["backoff", "deliver", "ping"]


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
        delay = get_settings().RETRY_BACKOFF_MAX
        undelivered.keep(batch, exc, "this worker cannot deliver", delay=delay)
        return 0
    except Exception as exc:
        # Not an answer from the tracker (a worker without an API key, a bug): Celery
        # would log only the exception and drop the message, commands and all.
        undelivered.give_up(batch, exc, "delivery raised")
        return 0
    delivered = len(batch) - len(failures)
    retry = undelivered.after_attempt(failures, self.request.retries)
    if retry is None:
        return delivered
    try:
        raise self.retry(
            args=([c.to_wire() for c in retry.commands],),
            countdown=retry.countdown,
            exc=retry.error,
        )
    except Reject as rejected:
        # Celery could not queue the retry (the broker is unreachable) and rejects the
        # message without requeueing it: the commands would be gone without a trace.
        undelivered.retry_not_queued(retry.commands, rejected.__context__ or rejected)
        return delivered


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
    reply(**deliver_once(command))
