"""The Install page's steps, as written, on a site fresh from ``django-admin startproject``.

The code blocks of ``docs/install.md`` are applied verbatim: each Python block
names its file on its first line (``# proj/settings.py (at the end)``) and is appended to
it; the worker command is run as it stands. Only what a test must add is added, after the
Install page's lines: the stand-in tracker's URL (no test may reach Kissmetrics) and a page
that records an event and renders the Install page's template block. The broker is the Redis
of ``KM_TEST_REDIS_URL``, given through the ``CELERY_BROKER_URL`` variable the Install page's
settings read.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import pytest

from django_kissmetrics.testing import Hit, StandInTracker
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "proj"  # The Install page's name for the user's project.
API_KEY = "fresh-site-key"


@dataclass(frozen=True)
class Block:
    """A fenced code block of the Install page."""

    language: str
    text: str

    @property
    def target(self) -> str | None:
        """The file a Python block goes into, from its first line (``# proj/celery.py``)."""
        first = self.text.splitlines()[0]
        match = re.fullmatch(r"# (\S+\.py)( \(.*\))?", first)
        return match.group(1) if match else None


def install_section() -> str:
    """The Install page of the documentation."""
    return (ROOT / "docs" / "install.md").read_text()


def blocks(section: str) -> list[Block]:
    """The fenced blocks of ``section``, without the list item's indentation."""
    found = []
    for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```$", section, re.MULTILINE | re.DOTALL):
        indent = len(match.group(1))
        lines = [line[indent:] for line in match.group(3).splitlines()]
        found.append(Block(match.group(2), "\n".join(lines) + "\n"))
    return found


def test_the_pip_line_names_this_distribution_with_its_celery_extra() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()  # tomllib is Python 3.11+.
    (name,) = re.findall(r'^name = "(.+)"$', pyproject, re.MULTILINE)
    (pip,) = [b for b in blocks(install_section()) if b.text.startswith("pip install")]
    (requirement,) = shlex.split(pip.text)[2:]
    assert requirement == f"{name}[celery]"
    assert re.search(r"^celery = \[", pyproject, re.MULTILINE)


def test_every_python_block_names_its_file() -> None:
    python = [b for b in blocks(install_section()) if b.language == "python"]
    assert [b.target for b in python] == [
        "proj/settings.py",
        "proj/celery.py",
        "proj/__init__.py",
        "proj/settings.py",
    ]


class Site:
    """A ``startproject`` site in ``path``, run with this interpreter."""

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path = path
        self.env = env

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args],
            cwd=self.path,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        with (self.path / log).open("wb") as out:
            return subprocess.Popen(
                [sys.executable, *args],
                cwd=self.path,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self, name: str) -> str:
        return (self.path / name).read_text(errors="replace")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as a deploy stops a process; SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def startproject(path: Path, tracker: StandInTracker, section: str, **extra: str) -> Site:
    """A fresh startproject site with the Python blocks of ``section`` applied, a page
    rendering Install's template block, and the stand-in tracker's URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "KISSMETRICS_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    made = subprocess.run(
        [sys.executable, "-m", "django", "startproject", PROJECT, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    for block in blocks(section):
        if block.target is not None:
            with (path / block.target).open("a") as file:
                file.write("\n" + block.text)
    (tag,) = [b.text for b in blocks(install_section()) if b.language == "django"]
    # What the test adds: no request may reach Kissmetrics, and a page to request.
    with (path / PROJECT / "settings.py").open("a") as file:
        file.write(f"\nKISSMETRICS['TRACKING_URL'] = {tracker.url!r}\n")
    (path / PROJECT / "pricing.py").write_text(
        "from django.http import HttpResponse\n"
        "from django.template import engines\n\n"
        "from django_kissmetrics import km\n\n"
        f"PAGE = engines['django'].from_string({('<head>' + tag.strip() + '</head>')!r})\n\n\n"
        "def pricing(request):\n"
        '    km.record("Viewed Pricing")\n'
        "    return HttpResponse(PAGE.render({}, request))\n"
    )
    with (path / PROJECT / "urls.py").open("a") as file:
        file.write("\nfrom .pricing import pricing\n\nurlpatterns += [path('pricing/', pricing)]\n")
    return Site(path, env)


@pytest.fixture
def site(tmp_path: Path, tracker: StandInTracker, redis_url: str) -> Site:
    """A fresh startproject site with the Install page's steps applied."""
    return startproject(tmp_path, tracker, install_section(), CELERY_BROKER_URL=redis_url)


def test_check_passes_and_warns_only_about_the_missing_key(site: Site) -> None:
    without_key = site.run("manage.py", "check")
    assert without_key.returncode == 0, without_key.stderr
    assert "django_kissmetrics.W002" in without_key.stderr
    assert "django_kissmetrics.W00" not in without_key.stderr.replace("W002", "")
    with_key = site.run("manage.py", "check", KISSMETRICS_API_KEY=API_KEY)
    assert with_key.returncode == 0, with_key.stderr
    assert "System check identified no issues" in with_key.stdout


@pytest.fixture
def worker(site: Site) -> Iterator[subprocess.Popen[bytes]]:
    """The Install page's worker command, as written, in the site's folder."""
    section = install_section()
    (command,) = [
        line
        for b in blocks(section)
        if b.language == "sh"
        for line in b.text.splitlines()
        if line.startswith("celery ")
    ]
    site.env["KISSMETRICS_API_KEY"] = API_KEY
    process = site.start("-m", *shlex.split(command), log="worker.log")
    try:
        yield process
    finally:
        stop(process)


def first_page(site: Site, server: subprocess.Popen[bytes], url: str) -> tuple[str, str]:
    """GET ``url`` once the new site's server answers (30 s at most): page and Set-Cookie."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with urlopen(url, timeout=5) as response:
                return response.read().decode(), response.headers["Set-Cookie"] or ""
        except OSError:
            assert server.poll() is None, site.log("web.log")
            assert time.monotonic() < deadline, site.log("web.log")
            time.sleep(0.2)


def pricing_through_the_worker(site: Site, tracker: StandInTracker, wait: float) -> tuple[str, Hit]:
    """Serve the new site, GET its /pricing/ page (with the tag, from the site's key), and
    wait ``wait`` s for the worker to deliver its one "Viewed Pricing": Set-Cookie and hit."""
    port = free_port()
    server = site.start("manage.py", "runserver", f"127.0.0.1:{port}", "--noreload", log="web.log")
    try:
        page, cookie = first_page(site, server, f"http://127.0.0.1:{port}/pricing/")
        hits = tracker.wait_for(2, timeout=wait)
    finally:
        stop(server)
    assert f'var _kmk = _kmk || "{API_KEY}";' in page
    viewed = [h for h in hits if h.name == "Viewed Pricing"]
    assert len(viewed) == 1, f"{hits}\n{site.log('web.log')}\n{site.log('worker.log')}"
    assert viewed[0].params["_k"] == API_KEY
    return cookie, viewed[0]


def test_a_request_reaches_the_tracker_through_a_worker(
    site: Site, worker: subprocess.Popen[bytes], tracker: StandInTracker
) -> None:
    # The ping waits for the worker: it is ready once it answers.
    pinged = site.run("manage.py", "kissmetrics_ping", "--timeout", "60")
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr + site.log("worker.log")
    assert "ok  worker: celery@" in pinged.stdout
    tracker.wait_for(1)

    cookie, viewed = pricing_through_the_worker(site, tracker, wait=20)
    assert cookie.startswith("km_ai=")
    assert viewed.person  # The visitor's new anonymous id.
