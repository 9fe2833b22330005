"""The test suite's settings, with overrides a test passes in ``KM_TEST_SITE_CONFIG``.

JSON: ``kissmetrics`` (keys merged into ``KISSMETRICS``) and ``broker_url``.
"""

from __future__ import annotations

import json
import os

from tests.settings import *  # noqa: F403
from tests.settings import CELERY_BROKER_URL, KISSMETRICS

_config = json.loads(os.environ.get("KM_TEST_SITE_CONFIG") or "{}")
KISSMETRICS = {**KISSMETRICS, **_config.get("kissmetrics", {})}
CELERY_BROKER_URL = _config.get("broker_url", CELERY_BROKER_URL)
