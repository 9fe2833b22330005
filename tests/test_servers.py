"""A graceful stop of every server Deploying names publishes what the site gathered.

Real servers in subprocesses (``tests.servers``), the stock ``asgi.py``/``wsgi.py``, a
real Redis, a real Celery worker and the stand-in tracker. The publisher's window is
made longer than any stop (60 s) so that a burst of visitors is still waiting in it when
the stop comes: only the flush on the stop can get it out.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from django_kissmetrics.testing import StandInTracker
from tests.conftest import RedisServer
from tests.servers import SERVERS, SiteProcess
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
