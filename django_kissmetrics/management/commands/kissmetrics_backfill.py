"""``manage.py kissmetrics_backfill``: existing rows as past Kissmetrics events or properties."""

from __future__ import annotations

from typing import IO, Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ... import backfill
from ...conf import get_settings


class Command(BaseCommand):
    """Send history: ``signups``, or any model's rows with ``--model``."""

    help = (
        "Send existing rows to Kissmetrics as past events (their time as _t, with _d=1) "
        "or, with --set, as person properties. 'signups' sends SIGNUP_EVENT for every user "
        "at date_joined; --model sends any model's rows."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """The options (see the README's "Bringing in history")."""
        parser.add_argument("mode", nargs="?", choices=["signups"], help="Every user's signup.")
        parser.add_argument("--model", help="app_label.Model whose rows to send.")
        parser.add_argument("--event", help="The event each row records.")
        parser.add_argument("--time-field", help="The row's date or datetime field (_t).")
        parser.add_argument(
            "--identity-field",
            help="The person: a foreign key to the user model goes through IDENTITY; "
            "pk or any other field is sent as text.",
        )
        parser.add_argument(
            "--property",
            action="append",
            default=[],
            metavar="NAME=FIELD",
            help="Send FIELD as property NAME (repeatable).",
        )
        parser.add_argument(
            "--filter",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="Only rows where FIELD=VALUE (a Django lookup; repeatable).",
        )
        parser.add_argument("--since", help="Only rows at or after this date or time.")
        parser.add_argument("--until", help="Only rows before this date or time.")
        parser.add_argument(
            "--set", action="store_true", help="Set person properties instead of recording."
        )
        parser.add_argument("--dry-run", action="store_true", help="Print what would be sent.")
        parser.add_argument(
            "--api-key",
            metavar="KEY",
            help="The site to send to, one of KISSMETRICS['SITES'] (default API_KEY).",
        )
        parser.add_argument("--after-pk", help="Resume: only rows with a greater primary key.")
        parser.add_argument("--quiet", action="store_true", help="No progress bar.")
        parser.add_argument(
            "--chunk-size",
            type=int,
            default=backfill.CHUNK_SIZE,
            help=f"Rows per delivery (default {backfill.CHUNK_SIZE}).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Plan, check, run, and print the summary."""
        if options["chunk_size"] < 1:
            raise CommandError("--chunk-size must be at least 1")
        common = {
            "properties": options["property"],
            "filters": options["filter"],
            "since": options["since"],
            "until": options["until"],
            "after_pk": options["after_pk"],
        }
        if options["mode"] == "signups":
            given = [o for o in ("model", "event", "time_field", "identity_field") if options[o]]
            if given or options["set"]:
                raise CommandError(
                    "signups takes no --model, --event, --time-field, --identity-field or --set"
                )
            plan = backfill.signups_plan(**common)
        else:
            missing = [
                f"--{o.replace('_', '-')}" for o in ("model", "time_field") if not options[o]
            ]
            if not options["set"] and not options["event"]:
                missing.append("--event (or --set)")
            if missing:
                raise CommandError(f"give 'signups' or --model with {', '.join(missing)}")
            if options["set"] and options["event"]:
                raise CommandError("--set sets properties: it takes no --event")
            plan = backfill.model_plan(
                options["model"],
                event=None if options["set"] else options["event"],
                time_field=options["time_field"],
                identity_field=options["identity_field"],
                **common,
            )
        conf = get_settings()
        if not options["dry_run"] and not conf.enabled:
            raise CommandError(
                "tracking is off (no KISSMETRICS['API_KEY'], or BACKEND 'disabled'): "
                "nothing would be sent"
            )
        if not options["dry_run"] and not (options["api_key"] or conf.API_KEY):
            raise CommandError(
                "KISSMETRICS has SITES but no API_KEY: name the site with --api-key KEY"
            )
        tty = not options["quiet"] and self.stderr.isatty()
        # The wrapped stream: OutputWrapper ends every write with a newline, and a
        # progress bar redraws one line.
        stream: IO[str] = self.stderr._out  # type: ignore[assignment]
        progress = backfill.Progress(stream, plan.queryset.count(), enabled=True) if tty else None
        summary = backfill.run(
            plan,
            chunk_size=options["chunk_size"],
            dry_run=options["dry_run"],
            out=self.stdout,  # type: ignore[arg-type]
            progress=progress,
            api_key=options["api_key"],
        )
        what = plan.event or "person properties"
        message = f"{plan.label} as {what!r}: {summary}"
        if summary.interrupted or summary.failed:
            raise CommandError(message)
        if options["dry_run"]:
            self.stderr.write(message)  # stdout holds only the commands, one JSON line each.
        elif options["verbosity"] > 0:
            self.stdout.write(message, self.style.SUCCESS)
