"""The shop in the admin."""

from __future__ import annotations

from django.contrib import admin

from .models import Subscription


@admin.register(Subscription)
class SubscriptionAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Subscriptions, newest first."""

    list_display = ("user", "plan", "amount", "started_at", "renewed_at")
    ordering = ("-started_at",)
