"""Stored hits in the admin."""

from __future__ import annotations

from django.contrib import admin

from .models import Hit


@admin.register(Hit)
class HitAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Hits, newest first."""

    list_display = ("id", "path", "person", "name", "timestamp", "received")
    list_filter = ("path",)
    ordering = ("-id",)
