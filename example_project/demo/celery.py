"""The demo's Celery app, configured from Django settings (the ``CELERY_`` names).

Without ``CELERY_BROKER_URL`` the settings turn on eager mode: each delivery task runs
in the web process that queued it, so the demo needs no broker and no worker. With a
broker, run a worker from ``example_project/``::

    celery -A demo worker -l info
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")

app = Celery("demo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
