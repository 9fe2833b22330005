"""The "Install with Django Tasks" page's steps, as written, on a fresh startproject site.

As in test_install.py: the section's Python block is appended to the file its first line
names, its shell commands run as they stand, and the template block is Install's step 4.
The queue is django-tasks-db on the site's SQLite database, the worker its ``db_worker``;
the test adds only the stand-in tracker's URL and a page. Django 6.0+, whose framework is
built in (below it the section adds the backport).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import django
import pytest

from django_kissmetrics.testing import StandInTracker
from tests.test_install import (
    API_KEY,
    ROOT,
    Site,
    blocks,
    pricing_through_the_worker,
    startproject,
    stop,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(django.VERSION < (6, 0), reason="django.tasks is Django 6.0+"),
]


def tasks_section() -> str:
    return (ROOT / "docs" / "install-tasks.md").read_text()


def commands() -> list[str]:
    return [
        line
        for b in blocks(tasks_section())
        if b.language == "sh"
        for line in b.text.splitlines()
        if line.strip()
    ]


def test_the_section_installs_the_queue_and_runs_its_worker() -> None:
    pip, *rest = commands()
    assert shlex.split(pip) == ["pip", "install", "django-kissmetrics-sdk", "django-tasks-db"]
    assert rest == ["python manage.py migrate", "python manage.py db_worker"]
    (python,) = [b for b in blocks(tasks_section()) if b.language == "python"]
    assert python.target == "proj/settings.py"
    assert re.search(r'^tasks = \["django-tasks', (ROOT / "pyproject.toml").read_text(), re.M)


@pytest.fixture
def site(tmp_path: Path, tracker: StandInTracker) -> Site:
    """A fresh startproject site with this section's steps applied."""
    return startproject(tmp_path, tracker, tasks_section())


@pytest.fixture
def worker(site: Site) -> Iterator[subprocess.Popen[bytes]]:
    """The section's commands as written: migrate, then the worker."""
    migrate, run_worker = commands()[1:]
    site.env["KISSMETRICS_API_KEY"] = API_KEY
    migrated = site.run(*shlex.split(migrate)[1:])
    assert migrated.returncode == 0, migrated.stderr
    process = site.start(*shlex.split(run_worker)[1:], log="worker.log")
    try:
        yield process
    finally:
        stop(process)


def test_check_warns_only_about_the_missing_key(site: Site) -> None:
    checked = site.run("manage.py", "check")
    assert checked.returncode == 0, checked.stderr
    assert "django_kissmetrics.W002" in checked.stderr
    assert "django_kissmetrics.W00" not in checked.stderr.replace("W002", "")
    assert "django_kissmetrics.E" not in checked.stderr


def test_a_page_reaches_the_tracker_through_db_worker(
    site: Site, worker: subprocess.Popen[bytes], tracker: StandInTracker
) -> None:
    pinged = site.run("manage.py", "kissmetrics_ping", "--timeout", "60")
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr + site.log("worker.log")
    assert "ok  tasks: enqueued on TASKS['default'] (DatabaseBackend)" in pinged.stdout
    assert "ok  worker: " in pinged.stdout
    tracker.wait_for(1)

    _, viewed = pricing_through_the_worker(site, tracker, wait=30)
    assert viewed.params["_d"] == "1"
