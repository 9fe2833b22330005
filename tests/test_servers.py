"""A graceful stop of every server Deploying names publishes what the site gathered.

Real servers in subprocesses (``tests.servers``), the stock ``asgi.py``/``wsgi.py``, a
real Redis, a real Celery worker and the stand-in tracker. The publisher's window is
made longer than any stop (60 s) so that a burst of visitors is still waiting in it when
the stop comes: only the flush on the stop can get it out.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from django_kissmetrics.testing import StandInTracker
from tests.conftest import RedisServer
from tests.servers import ROOT, SERVERS, SiteProcess
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

BURST = 30


def burst(site: SiteProcess, label: str, count: int = BURST) -> list[str]:
    """``count`` visitors at once, each recording one event; the events' names."""
    events = [f"{label} {i}" for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda e: site.get(f"/record/?event={e.replace(' ', '+')}"), events))
    assert codes == [200] * count
    return events


def wait_for(tracker: StandInTracker, events: list[str], timeout: float) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = Counter(h.name or "" for h in tracker.hits)
        if all(seen[e] for e in events):
            break
        time.sleep(0.1)
    time.sleep(0.5)  # A stray copy would show up now.
    return Counter(h.name or "" for h in tracker.hits)


def site_config(tracker: StandInTracker, spool_dir: Path, **more: Any) -> dict[str, Any]:
    return {
        "BACKEND": "celery",
        "TRACKING_URL": tracker.url,
        "SPOOL_DIR": str(spool_dir),
        "RETRY_BACKOFF": 0.05,
        "RETRY_BACKOFF_MAX": 1.0,
        **more,
    }


@pytest.fixture
def broker() -> Any:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("server", list(SERVERS))
def test_a_graceful_stop_right_after_a_burst_publishes_the_burst(
    server: str, tracker: StandInTracker, broker: RedisServer, tmp_path: Path
) -> None:
    config = site_config(tracker, tmp_path, PUBLISH_WINDOW=60.0)
    with (
        WorkerProcess(broker.url, config),
        SiteProcess(server, config, broker.url, workers=2) as site,
    ):
        sent = burst(site, f"{server} burst")
        code = site.stop()  # Within 30 s, or it raises: half the window.
        seen = wait_for(tracker, sent, 20)
        missing = [e for e in sent if not seen[e]]
        assert not missing, f"{len(missing)} of {BURST} lost; exit {code}:\n{site.log()}"
        assert all(seen[e] == 1 for e in sent), seen


PLAIN = """
import os, signal, django
django.setup()
from django_kissmetrics import km
for n in range(5):
    km.record(f"Plain {n}", identity="ann")
os.kill(os.getpid(), signal.SIGTERM)
"""


def test_a_plain_process_stopped_by_sigterm_publishes_and_still_dies_by_it(
    broker: RedisServer, tmp_path: Path
) -> None:
    # No server: the default SIGTERM action. The chained handler flushes, then the
    # process ends by the signal as it would have (a process manager reads the status).
    config = {"BACKEND": "celery", "SPOOL_DIR": str(tmp_path), "PUBLISH_WINDOW": 60.0}
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.site.settings",
        "KM_TEST_SITE_CONFIG": json.dumps({"kissmetrics": config, "broker_url": broker.url}),
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run([sys.executable, "-c", PLAIN], cwd=ROOT, env=env, timeout=30)
    assert done.returncode == -signal.SIGTERM
    (message,) = redis.Redis.from_url(broker.url).lrange("celery", 0, -1)
    body = json.loads(base64.b64decode(json.loads(message)["body"]))
    assert [c[2] for c in body[0][0]] == [f"Plain {n}" for n in range(5)]
