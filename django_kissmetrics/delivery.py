"""Delivering commands to the tracking server, and what happens to those that fail."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from .client import KissmetricsClient
from .commands import Command
from .conf import ConfigurationError, get_settings
from .exceptions import TrackingError
from .signals import delivery_failed

logger = logging.getLogger(__name__)

__all__ = ["client", "deliver", "deliver_now", "give_up"]


def client() -> KissmetricsClient:
    """A client configured from the ``KISSMETRICS`` setting."""
    conf = get_settings()
    if not conf.API_KEY:
        # Not an answer from the tracker: a configuration to fix, with the commands kept.
        raise ConfigurationError("KISSMETRICS['API_KEY'] is not set")
    return KissmetricsClient(conf.API_KEY, url=conf.TRACKING_URL, timeout=conf.TIMEOUT)


def deliver(commands: Sequence[Command]) -> list[tuple[Command, TrackingError]]:
    """Send ``commands`` over the pooled client; return the ones that failed."""
    if not commands:
        return []
    conf = get_settings()
    api = client()
    # Aliases go first, so that a batch's events land on a person already joined.
    aliases = [c for c in commands if c.kind == "alias"]
    others = [c for c in commands if c.kind != "alias"]
    failures = api.send_many(aliases, concurrency=1)
    return failures + api.send_many(others, concurrency=conf.DELIVERY_CONCURRENCY)


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
        json.dumps([c.to_dict() for c in commands], ensure_ascii=False),
    )
    try:
        delivery_failed.send(sender=Command, commands=list(commands), error=error)
    except Exception:
        logger.exception("Kissmetrics: a delivery_failed receiver raised")
