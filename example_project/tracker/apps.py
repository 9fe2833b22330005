"""The stand-in tracker app."""

from __future__ import annotations

from django.apps import AppConfig


class TrackerConfig(AppConfig):
    """``tracker``."""

    name = "tracker"
    verbose_name = "Stand-in tracker"
