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
        """Connect the signal handlers and checks; flush the publisher on a stop.

        A worker that starts replays what the spool holds.
        """
        from . import receivers, shutdown, worker
        from .checks import check_settings

        # Login and signup are contrib.auth's: a site without it has none to join.
        if apps.is_installed("django.contrib.auth"):
            receivers.connect(allauth=apps.is_installed("allauth.account"))
        checks.register(check_settings)
        shutdown.install()
        worker.install()
        try:
            from celery.signals import (
                worker_init,
                worker_process_shutdown,
                worker_ready,
                worker_shutdown,
            )
        except ImportError:
            return
        worker_init.connect(_load_client, dispatch_uid="django_kissmetrics.load_client")
        worker_shutdown.connect(_flush, dispatch_uid="django_kissmetrics.flush")
        worker_process_shutdown.connect(_flush, dispatch_uid="django_kissmetrics.flush_child")
        worker_ready.connect(_replay, dispatch_uid="django_kissmetrics.replay")


def _load_client(**kwargs: Any) -> None:
    # The HTTP client is imported by workers only, and once in the main process: a prefork
    # pool's processes then share it instead of each paying for the import on its first batch.
    from . import client  # noqa: F401


def _flush(**kwargs: Any) -> None:
    from .publisher import flush

    flush()


def _replay(**kwargs: Any) -> None:
    from .conf import get_settings
    from .publisher import get_publisher

    # Only where the spool is used: the publisher's start looks into it.
    if get_settings().enabled and get_settings().ON_ENQUEUE_FAILURE != "log":
        get_publisher()
