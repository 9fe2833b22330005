"""The test site on the ``tasks`` backend with django-tasks-db: settings for subprocesses.

The web side (``python -m tests.tasks_site``) and ``db_worker`` both run with these, and
share the database and the spool that ``KM_TASKS_CONFIG`` (JSON) names: ``database``
(a ``DATABASES["default"]`` dict), ``kissmetrics`` (keys merged into ``KISSMETRICS``).
"""

from __future__ import annotations

import json
import os

import django

from tests.settings import *  # noqa: F403
from tests.settings import INSTALLED_APPS, KISSMETRICS

_CONFIG = json.loads(os.environ["KM_TASKS_CONFIG"])

# Below Django 6.0 the framework is the django-tasks backport.
INSTALLED_APPS = [*INSTALLED_APPS, *(["django_tasks"] if django.VERSION < (6, 0) else [])]
INSTALLED_APPS += ["django_tasks_db"]
DATABASES = {"default": _CONFIG["database"]}
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
KISSMETRICS = {**KISSMETRICS, "BACKEND": "tasks", **_CONFIG["kissmetrics"]}
LOGGING_CONFIG = "logging.config.dictConfig"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "INFO"},
}
