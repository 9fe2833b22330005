"""Delivering commands to the tracking server, and reporting those that are lost.

What becomes of a command that was not delivered (a retry, the spool, or giving up) is
decided in :mod:`django_kissmetrics.undelivered`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .commands import Command, loggable
from .conf import ConfigurationError, get_settings
from .exceptions import TrackingError
from .signals import delivery_failed

if TYPE_CHECKING:
    from .client import KissmetricsClient

logger = logging.getLogger(__name__)

__all__ = ["client", "deliver", "deliver_now", "give_up"]


def client(key: str | None = None) -> KissmetricsClient:
    """A client for ``key`` (default ``API_KEY``) as the ``KISSMETRICS`` setting says.

    Cheap to make: every client of a process shares its connections to the tracker.
    """
    # Imported here: the HTTP client is for workers; a web process never loads it.
    from .client import KissmetricsClient

    conf = get_settings()
    key = key or conf.API_KEY
    if not key:
        # Not an answer from the tracker: a configuration to fix, with the commands kept.
        raise ConfigurationError("KISSMETRICS['API_KEY'] is not set")
    return KissmetricsClient(
        key, url=conf.TRACKING_URL, timeout=conf.TIMEOUT, concurrency=conf.DELIVERY_CONCURRENCY
    )


def deliver(commands: Sequence[Command]) -> list[tuple[Command, TrackingError]]:
    """Send ``commands`` with ``DELIVERY_CONCURRENCY`` calls in flight; return those that failed.

    Each command goes with the key it was made with; one made without a key (a message
    queued before keys travelled) goes with this process's ``API_KEY``.
    """
    if not commands:
        return []
    conf = get_settings()
    if not (conf.API_KEY or conf.SITES) and any(c.api_key is None for c in commands):
        # A command with no key of its own (queued before keys travelled) needs this
        # process's: a worker that lacks it (a misconfiguration: one site, no key) keeps
        # the whole batch, nothing sent yet, for a worker that has it.
        raise ConfigurationError(
            "KISSMETRICS['API_KEY'] is not set, and a command has no key of its own"
        )
    by_key: dict[str | None, list[Command]] = {}
    for command in commands:
        by_key.setdefault(command.api_key or conf.API_KEY, []).append(command)
    failures: list[tuple[Command, TrackingError]] = []
    for key, group in by_key.items():
        if key is None:
            # SITES and no API_KEY: no site's key is this command's, and sending it under
            # another site's key would mix two sites' numbers.
            error = TrackingError("no API key: the command has none and API_KEY is not set")
            error.status = 400  # Not retriable: no later attempt will find a key.
            failures += [(c, error) for c in group]
            continue
        api = client(key)
        # Aliases go first, one at a time, so that a batch's events land on a person
        # already joined.
        aliases = [c for c in group if c.kind == "alias"]
        if aliases:
            failures += api.send_many(aliases, concurrency=1)
        if len(aliases) < len(group):
            failures += api.send_many([c for c in group if c.kind != "alias"])
    return failures


def deliver_now(commands: Sequence[Command], reason: str) -> None:
    """Deliver once, in this thread; give up (log and signal) whatever fails."""
    try:
        failures = deliver(commands)
    except Exception as exc:
        give_up(commands, exc, reason)
        return
    if failures:
        give_up([c for c, _ in failures], failures[-1][1], reason)


def give_up(commands: Sequence[Command], error: BaseException | None, reason: str) -> None:
    """Log ``commands`` in full at ERROR and send ``delivery_failed``: nothing is lost silently."""
    if not commands:
        return
    logger.error(
        "Kissmetrics: %d command(s) not delivered (%s): %s; commands: %s",
        len(commands),
        reason,
        error,
        loggable(commands),
    )
    try:
        delivery_failed.send(sender=Command, commands=list(commands), error=error)
    except Exception:
        logger.exception("Kissmetrics: a delivery_failed receiver raised")
