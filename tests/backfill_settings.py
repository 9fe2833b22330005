"""Settings for running ``kissmetrics_backfill`` as its own process, as a deploy runs it.

The test suite's settings with a SQLite file (``KM_BACKFILL_DB``) instead of memory, the
celery backend, and the suite's Celery app loaded the way a project's ``__init__`` does.
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import KISSMETRICS

DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["KM_BACKFILL_DB"]}
}
KISSMETRICS = {**KISSMETRICS, "BACKEND": "celery"}

from tests.celery_app import app  # noqa: E402,F401
