"""What becomes of a command that was not delivered: retried, spooled, or given up.

One policy, asked by every part that meets such a command: the Celery task after an
attempt (:func:`after_attempt`, :func:`retry_not_queued`), the publisher when the broker
does not take a batch (:func:`unqueued`), and anything that spools (:func:`keep`).

- A refusal for good (a 4xx other than 408 and 429) is given up at once.
- A retriable failure is retried alone, after a jittered exponential backoff that
  honours ``Retry-After`` (:func:`backoff`); after ``MAX_RETRIES`` it goes to the spool,
  to be replayed ``RETRY_BACKOFF_MAX`` seconds later.
- A batch the broker does not take goes where ``ON_ENQUEUE_FAILURE`` says: the spool,
  a direct delivery (then as above, with the spool for retries), or the log.
- Giving up (:func:`give_up`) logs the commands in full at ERROR and sends
  ``delivery_failed``; the spool gives up what it cannot keep (full, too old, unusable).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence

from . import spool
from .commands import Command
from .conf import get_settings
from .delivery import deliver, give_up
from .exceptions import TrackingError

logger = logging.getLogger(__name__)

__all__ = [
    "Retry",
    "after_attempt",
    "backoff",
    "give_up",
    "keep",
    "on_spooled",
    "retry_not_queued",
    "unqueued",
]

Failures = Sequence[tuple[Command, TrackingError]]

#: Called with a delay after commands were spooled, to replay them that much later.
_replayers: list[Callable[[float], None]] = []


@dataclasses.dataclass(frozen=True)
class Retry:
    """Send ``commands`` again in ``countdown`` seconds; ``error`` is why."""

    commands: list[Command]
    countdown: float
    error: TrackingError


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


def on_spooled(replay: Callable[[float], None]) -> None:
    """Have ``replay(delay)`` called whenever :func:`keep` spooled something.

    The publisher registers its thread here: it replays the spool in every process.
    """
    if replay not in _replayers:
        _replayers.append(replay)


def keep(
    commands: Sequence[Command],
    error: BaseException | None,
    reason: str,
    *,
    delay: float = 0.0,
    replay: bool = True,
) -> bool:
    """Spool ``commands`` for a replay in ``delay`` seconds; True when the spool took them.

    What the spool cannot keep is given up. ``replay=False``: the caller replays itself.
    """
    kept = spool.keep(commands, error, reason, delay=delay)
    if kept and replay:
        for replayer in _replayers:
            replayer(delay)
    return kept


def _refused(failures: Failures) -> list[tuple[Command, TrackingError]]:
    """Give up the refusals for good; return the retriable failures."""
    permanent = [(c, e) for c, e in failures if not e.retriable]
    if permanent:
        give_up([c for c, _ in permanent], permanent[-1][1], "refused by the server")
    return [(c, e) for c, e in failures if e.retriable]


def after_attempt(failures: Failures, retries: int) -> Retry | None:
    """Decide about the commands that attempt number ``retries + 1`` did not deliver.

    Refusals for good are given up; past ``MAX_RETRIES`` the rest is spooled. Returns
    what to retry and when, or ``None`` when nothing is left to retry.
    """
    retriable = _refused(failures)
    if not retriable:
        return None
    error = retriable[-1][1]
    conf = get_settings()
    commands = [c for c, _ in retriable]
    if retries >= conf.MAX_RETRIES:
        # The tracker stayed unreachable: keep the commands for a later round rather
        # than drop them; the spool gives them up past SPOOL_MAX_AGE.
        reason = f"gave up after {retries + 1} attempts"
        keep(commands, error, reason, delay=conf.RETRY_BACKOFF_MAX)
        return None
    retry_after = max((e.retry_after or 0.0) for _, e in retriable) or None
    return Retry(commands, backoff(retries, retry_after), error)


def retry_not_queued(commands: Sequence[Command], error: BaseException) -> None:
    """A retry the broker did not take: spool the commands, replayed as soon as it is back."""
    keep(commands, error, "could not queue a retry", delay=0.0)


def unqueued(commands: Sequence[Command], error: BaseException) -> bool:
    """Deal with ``commands`` the broker did not take, as ``ON_ENQUEUE_FAILURE`` says.

    Runs in the publisher thread (or, once a stop was signalled, in the caller). True
    when they were spooled.
    """
    how = get_settings().ON_ENQUEUE_FAILURE
    if how == "log":
        give_up(commands, error, "could not queue")
        return False
    if how == "sync":
        logger.warning("Kissmetrics: could not queue (%s); delivering directly", error)
        try:
            failures = deliver(commands)
        except Exception as exc:
            return keep(commands, exc, "broker down, direct delivery failed", replay=False)
        retriable = _refused(failures)
        return bool(retriable) and keep(
            [c for c, _ in retriable],
            retriable[-1][1],
            "broker down, direct delivery failed",
            replay=False,
        )
    # The publisher probes the broker and replays once it answers.
    return keep(commands, error, "could not queue", replay=False)
