"""The debug-toolbar panel, rendered by the real toolbar for real requests.

Each test makes a request through django-debug-toolbar's middleware, then asks the
toolbar's own ``render_panel`` view for the panel, as the toolbar's JavaScript does.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.test import Client, override_settings

from tests import test_flows
from tests.browser import LIBRARY_URLS, browser
from tests.panel_site import TOOLBAR_SETTINGS

__all__ = ["browser"]  # A fixture, used by name.

ROOT_DIR = Path(__file__).resolve().parent.parent

pytest.importorskip("debug_toolbar")

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def toolbar() -> Iterator[None]:
    with override_settings(**TOOLBAR_SETTINGS):
        yield


def request_ids() -> set[str]:
    from debug_toolbar.store import get_store

    return set(get_store().request_ids())


def text(markup: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


def panel_html(client: Client, url: str, **extra: str) -> str:
    """GET ``url``; return the panel's HTML for that request, from the toolbar's own view."""
    before = request_ids()
    client.get(url, **extra)  # type: ignore[arg-type]
    return render_panel(client, before)


def render_panel(client: Client, before: set[str]) -> str:
    """The panel of the one toolbar request made since ``before``, as the toolbar's JS asks."""
    (request_id,) = request_ids() - before
    answer = client.get(
        "/__debug__/render_panel/", {"request_id": request_id, "panel_id": "KissmetricsPanel"}
    )
    assert answer.status_code == 200
    content: str = answer.json()["content"]
    return content


def panel_after(client: Client, url: str, **extra: str) -> str:
    """The panel for ``url``, as text with the tags removed."""
    return text(panel_html(client, url, **extra))


def commands(client: Client, url: str) -> dict[str, list[str]]:
    """The server commands table for ``url``: event (or kind) -> the row's cells as text."""
    table = re.search(
        r'class="djdt-kissmetrics-commands".*?<tbody>(.*?)</tbody>', panel_html(client, url), re.S
    )
    assert table is not None
    rows = [
        [text(cell) for cell in re.findall(r"<td>(.*?)</td>", row, re.S)]
        for row in re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)
    ]
    return {row[2] or row[0]: row for row in rows}


def test_anonymous_visitor(client: Client) -> None:
    shown = panel_after(client, "/shop/")
    anonymous = unquote(client.cookies["km_ai"].value)
    assert f"record {anonymous} Viewed Shop plan=pro seats=3" in shown, shown
    assert "deferred to the response" in shown
    assert re.search(r"seats=3 \d{10} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", shown)
    assert "emitted on this page " in shown
    assert '["record","Saw Banner",{"banner":"spring","n":1}]' in shown
    assert f"Current person {anonymous} Worked out from a new anonymous id" in shown
    assert "This visitor tracked" in shown
    assert "DNT: absent, Sec-GPC: absent" in shown
    assert "Excluded path no Bot no Consent no consent gate" in shown
    # The next page: the same person, now from the browser's cookie.
    assert "Worked out from km_ai from the browser" in panel_after(client, "/shop/")


def test_logged_in_visitor(client: Client) -> None:
    user = User.objects.create_user("ann", password="pw")
    client.force_login(user)
    shown = panel_after(client, "/shop/")
    assert f"record {user.pk} Viewed Shop" in shown
    assert f'["identify","{user.pk}"]' in shown
    assert f"Current person {user.pk} Worked out from the logged-in user, through IDENTITY" in shown


def test_identify_in_the_request_and_later_in_the_session(client: Client) -> None:
    shown = panel_after(client, "/browser/vector/?v=%22ann%40shop.test%22")
    assert "Worked out from km.identify() in this request" in shown
    assert "alias of ann@shop.test" in shown
    shown = panel_after(client, "/shop/")
    assert "Current person ann@shop.test Worked out from km.identify() earlier in this session" in (
        shown
    )


def test_redirect_carrying_browser_commands(client: Client) -> None:
    shown = panel_after(client, "/js/")
    assert "kept in the session for the next page that renders {% kissmetrics_js %}" in shown
    assert '["record","Clicked Buy",{"plan":"pro","amount":49}]' in shown
    # The page after the redirect emits them.
    shown = panel_after(client, "/shop/")
    assert "emitted on this page" in shown
    assert '["record","Clicked Buy",{"plan":"pro","amount":49}]' in shown
    assert '["record","Saw Banner"' in shown


@pytest.mark.django_db(transaction=True)
def test_committed_and_rolled_back(client: Client) -> None:
    rows = commands(client, "/atomic/")
    assert rows["Before"][5] == "deferred to the response"
    assert rows["Committed"][5] == "deferred to the response (after a commit)"
    assert rows["Rolled Back"][5] == "not sent: its transaction rolled back"


def test_waiting_on_a_commit_and_sent_after_the_response(client: Client) -> None:
    # The whole request inside a transaction (as a middleware opening one would):
    # the event waits for it.
    with transaction.atomic():
        rows = commands(client, "/shop/")
    assert rows["Viewed Shop"][5] == "waiting on a transaction commit"
    # Recorded by a middleware outside KissmetricsMiddleware, after the response left.
    rows = commands(client, "/shop/?late=1")
    assert rows["Viewed Shop"][5] == "deferred to the response"
    assert rows["Late Event"][5] == "sent"


@pytest.mark.parametrize(
    ("extra", "state"),
    [
        ({"HTTP_DNT": "1"}, "DNT: 1, Sec-GPC: absent (opted out: HONOR_DNT is on)"),
        ({"HTTP_SEC_GPC": "1"}, "DNT: absent, Sec-GPC: 1 (opted out: HONOR_DNT is on)"),
        ({"HTTP_USER_AGENT": "Googlebot/2.1"}, "Bot yes"),
    ],
)
def test_visitors_who_are_not_tracked(client: Client, extra: dict[str, str], state: str) -> None:
    shown = panel_after(client, "/shop/", **extra)
    assert "This visitor not tracked" in shown
    assert state in shown
    assert "Server commands None." in shown
    assert "Current person none Worked out from not tracked" in shown


def test_excluded_path(client: Client) -> None:
    shown = panel_after(client, "/admin/thing/")
    assert "Excluded path yes: starts with /admin/ (EXCLUDE_PATHS)" in shown


def test_without_the_toolbar_nothing_loads_it() -> None:
    # A site without the toolbar in its settings serves pages without importing it.
    code = (
        "import sys, django; django.setup();"
        "from django.test import Client;"
        "from django.test.utils import setup_test_environment; setup_test_environment();"
        "from django.core.management import call_command;"
        "call_command('migrate', verbosity=0);"
        "assert Client().get('/').status_code == 200;"
        "assert 'debug_toolbar' not in sys.modules, 'toolbar imported';"
        "assert 'django_kissmetrics.panels' not in sys.modules, 'panel imported'"
    )
    env = {"DJANGO_SETTINGS_MODULE": "tests.settings", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT_DIR, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def toolbar_site(django_db_setup: None) -> Iterator[Any]:
    """A live server with the toolbar in front, its static files served."""
    from pytest_django.live_server_helper import LiveServer

    with override_settings(**TOOLBAR_SETTINGS):
        server = LiveServer("localhost")
        try:
            yield server
        finally:
            server.stop()


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_the_panel_in_chromium(browser: Any, toolbar_site: Any) -> None:
    """The toolbar as a developer sees it: open the panel on the page after a redirect.

    ``KM_PANEL_SCREENSHOT=docs/panel.png`` saves what Chromium shows.
    """
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(10_000)
    # The Kissmetrics library is not needed here; nothing leaves the machine.
    for pattern in LIBRARY_URLS:
        page.route(pattern, lambda route: route.fulfill(status=200, body=""))
    try:
        # A browser command, then a redirect to /shop/, which emits it.
        page.goto(f"{toolbar_site.url}/buy/")
        page.click("#djdt-KissmetricsPanel a")
        content = page.locator("#KissmetricsPanel")
        content.get_by_text("Viewed Shop").wait_for()
        shown = content.inner_text()
        assert "deferred to the response" in shown
        assert '["record","Clicked Buy",{"plan":"pro"}]' in shown
        assert '["record","Saw Banner",{"banner":"spring","n":1}]' in shown
        assert "km_ai from the browser" in shown
        assert "plan=pro" in shown
        target = os.environ.get("KM_PANEL_SCREENSHOT")
        if target:
            page.screenshot(path=target)
    finally:
        context.close()


def test_under_asgi(async_client: Any, client: Client) -> None:
    # The panel runs for ASGI requests too (is_async): the async test client's request.
    before = request_ids()
    test_flows.TestAsync.fetch(async_client, "/async-record/")  # No warning on Django 4.2.
    shown = text(render_panel(client, before))
    assert "Async Event n=1" in shown
    assert "deferred to the response" in shown


def test_sites_track_and_dropped_commands(client: Client, settings: Any) -> None:
    settings.KISSMETRICS = {
        **settings.KISSMETRICS,
        "SITES": {".shop.test": "shop-key"},
        "TRACK": "django_kissmetrics.track.not_staff",
        "BEFORE_SEND": "tests.hooks.drop_health",
    }
    shown = panel_after(client, "/shop/", HTTP_HOST="www.shop.test")
    assert "Site (API key) shop-key (SITES, host www.shop.test)" in shown
    assert "TRACK tracked (django_kissmetrics.track.not_staff)" in shown
    row = commands(client, "/shop/")["Viewed Shop"]
    assert row[-1] == "test-key"  # Another host: API_KEY, the default.
    settings.KISSMETRICS = {**settings.KISSMETRICS, "BEFORE_SEND": "tests.hooks.drop_all"}
    shown = panel_after(client, "/shop/")
    assert "dropped by BEFORE_SEND" in shown
    assert "BEFORE_SEND dropped 1 command." in shown
    client.force_login(User.objects.create_user("ann", password="pw", is_staff=True))
    shown = panel_after(client, "/shop/")
    assert "TRACK kept out (django_kissmetrics.track.not_staff)" in shown
    assert "This visitor not tracked" in shown
