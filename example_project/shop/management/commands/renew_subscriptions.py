"""``python manage.py renew_subscriptions [--user NAME]``: the nightly renewal job.

It runs outside any request, so every Kissmetrics call names its person with
``identity=``; ``km.batch()`` sends all of them as one delivery (one Celery message).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import QuerySet
from django.utils import timezone

from django_kissmetrics import km
from django_kissmetrics.person import identity_for
from django_kissmetrics.publisher import flush
from shop.models import Subscription


class Command(BaseCommand):
    """Renew subscriptions and record "Subscription Renewed" for each customer."""

    help = 'Renew every subscription (or one user\'s) and record "Subscription Renewed".'

    def add_arguments(self, parser: CommandParser) -> None:
        """``--user``: renew only this username's subscription."""
        parser.add_argument("--user", metavar="USERNAME", help="renew only this user")

    def handle(self, *args: Any, user: str | None = None, **options: Any) -> None:
        """Renew, then record one event per renewal in one delivery."""
        subscriptions: QuerySet[Subscription] = Subscription.objects.select_related("user")
        if user is not None:
            subscriptions = subscriptions.filter(user__username=user)
            if not subscriptions.exists():
                raise CommandError(f"{user!r} has no subscription to renew")
        now = timezone.now()
        with km.batch():
            for subscription in subscriptions:
                subscription.renewed_at = now
                subscription.save(update_fields=["renewed_at"])
                identity = identity_for(subscription.user)
                km.record(
                    "Subscription Renewed",
                    {"plan": subscription.plan, "amount": subscription.amount},
                    identity=identity,
                )
                km.set({"renewed on": now.date()}, identity=identity)
                self.stdout.write(f"Renewed {subscription.plan} for {identity}")
        # Hand the batch over now, while the process is whole: the exit-time flush runs
        # after Python has stopped its thread pools, which eager delivery needs.
        flush()
        self.stdout.write(self.style.SUCCESS(f"{len(subscriptions)} subscription(s) renewed."))
