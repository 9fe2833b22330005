"""``python manage.py kissmetrics_ping [--identity ID] [--timeout SECONDS] [--api-key KEY]``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_kissmetrics import ping


class Command(BaseCommand):
    """Send one test event through the configured path and report each hop in order.

    Exits 0 only when the event reached the tracking server; otherwise non-zero with one
    line naming the hop that failed.
    """

    help = (
        "Send one test event through the configured path (settings, broker, worker, "
        "tracking server) and report each hop. Exit 0 only if the tracking server took it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """``--identity``, ``--timeout`` and ``--api-key``."""
        parser.add_argument(
            "--identity",
            default=ping.DEFAULT_IDENTITY,
            help=f"the person to record the test event for (default {ping.DEFAULT_IDENTITY!r})",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="give up after this many seconds (default 30)",
        )
        parser.add_argument(
            "--api-key",
            default=None,
            metavar="KEY",
            help="the site to ping, one of KISSMETRICS['SITES'] (default API_KEY)",
        )

    def handle(
        self, *args: Any, identity: str, timeout: float, api_key: str | None, **options: Any
    ) -> None:
        """Run the ping; raise ``CommandError`` (exit 1) naming the hop that failed."""
        if timeout <= 0:
            raise CommandError("--timeout must be more than 0 seconds")

        def report(hop: str, detail: str) -> None:
            self.stdout.write(f"ok  {hop}: {detail}")

        try:
            token = ping.run(identity, timeout, report, api_key=api_key)
        except ping.PingFailed as exc:
            raise CommandError(str(exc)) from None
        except ValueError as exc:  # An --identity that is no identity (empty).
            raise CommandError(f"--identity: {exc}") from None
        self.stdout.write(
            self.style.SUCCESS(f"The tracking server took {ping.EVENT!r} (token {token}).")
        )
