"""Models for the backfill tests: rows a site already has, some with a user, some without."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Order(models.Model):
    """An order placed by a user (the foreign key goes through ``IDENTITY``)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    placed_at = models.DateTimeField(null=True)
    total = models.DecimalField(max_digits=10, decimal_places=2, default=0)
    plan = models.CharField(max_length=20, blank=True)
    status = models.CharField(max_length=20, default="paid")


class Subscription(models.Model):
    """A plan held by an account known only by an e-mail address (sent as text)."""

    email = models.CharField(max_length=200)
    plan = models.CharField(max_length=20)
    started = models.DateField(null=True)
