"""A customer's subscription: what the buy action creates and the nightly job renews."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Subscription(models.Model):
    """The plan a user bought, and when it was last renewed."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="subscription"
    )
    plan = models.CharField(max_length=20)
    amount = models.PositiveIntegerField()
    started_at = models.DateTimeField(auto_now_add=True)
    renewed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.user} on {self.plan}"
