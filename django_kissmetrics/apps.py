"""The app config: connects signal handlers and system checks."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig, apps
from django.core import checks


class KissmetricsConfig(AppConfig):
    """``django_kissmetrics``."""

    name = "django_kissmetrics"
    verbose_name = "Kissmetrics"

    def ready(self) -> None:
        """Connect the signal handlers and checks; flush the publisher at worker shutdown."""
        from . import receivers
        from .checks import check_settings

        receivers.connect(allauth=apps.is_installed("allauth.account"))
        checks.register(check_settings)
        try:
            from celery.signals import worker_process_shutdown, worker_shutdown
        except ImportError:
            return
        worker_shutdown.connect(_flush, dispatch_uid="django_kissmetrics.flush")
        worker_process_shutdown.connect(_flush, dispatch_uid="django_kissmetrics.flush_child")


def _flush(**kwargs: Any) -> None:
    from .publisher import flush

    flush()
