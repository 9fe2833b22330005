"""``manage.py kissmetrics_spool status | replay | purge --older-than AGE``."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_kissmetrics.delivery import give_up
from django_kissmetrics.publisher import try_publish
from django_kissmetrics.spool import Spool, SpoolError, get_spool, replay

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def age(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``12h`` or ``7d``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise ValueError(f"not an age: {text!r} (say 90, 90s, 15m, 12h or 7d)")
    return float(match[1]) * _UNITS[match[2] or "s"]


class Command(BaseCommand):
    """Look into the spool, replay it through the broker now, or purge old entries."""

    help = "Show, replay or purge the Kissmetrics spool (commands waiting for the broker)."

    def add_arguments(self, parser: CommandParser) -> None:
        """``status``, ``replay`` or ``purge --older-than AGE``."""
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("status", help="Entries, commands, bytes, the oldest; other keys'.")
        sub.add_parser("replay", help="Publish every due entry to the broker now.")
        purge = sub.add_parser("purge", help="Drop entries (logged at ERROR and signalled).")
        purge.add_argument(
            "--older-than",
            required=True,
            type=age,
            metavar="AGE",
            help="Entries whose every command is older than this: 90, 15m, 12h, 7d; 0: all.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Run the action."""
        spool = get_spool()
        if spool is None:
            raise CommandError('The spool is off (KISSMETRICS["ON_ENQUEUE_FAILURE"] is "log").')
        try:
            getattr(self, f"_{options['action']}")(spool, options)
        except SpoolError as exc:
            raise CommandError(str(exc)) from exc

    def _status(self, spool: Spool, options: dict[str, Any]) -> None:
        status = spool.status()
        oldest = "-"
        if status.oldest is not None:
            when = dt.datetime.fromtimestamp(status.oldest, dt.timezone.utc)
            oldest = when.isoformat(timespec="seconds")
        self.stdout.write(
            f"spool: {spool.path}\n"
            f"entries: {status.count} ({status.claimed} being replayed)\n"
            f"commands: {status.commands}\n"
            f"bytes: {status.bytes}\n"
            f"oldest: {oldest}\n"
            f"entries of other API keys: {status.other_keys} (left for their own site)\n"
            f"quarantined: {status.quarantined} (malformed entries, kept aside)"
        )

    def _replay(self, spool: Spool, options: dict[str, Any]) -> None:
        sent, error = replay(spool, try_publish)
        if error is not None:
            raise CommandError(f"replayed {sent} command(s); the broker failed: {error}")
        self.stdout.write(f"replayed {sent} command(s)")

    def _purge(self, spool: Spool, options: dict[str, Any]) -> None:
        dropped = spool.purge(options["older_than"])
        give_up(dropped, None, "purged from the spool")
        self.stdout.write(f"purged {len(dropped)} command(s)")
