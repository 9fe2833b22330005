"""Django's own Content Security Policy (6.0+), enforced with a nonce, in Chromium.

The tag reads Django's nonce with no setting: its script runs, the library's scripts are
requested, and the browser reports no ``securitypolicyviolation``, whether or not the
template reads ``{{ csp_nonce }}`` itself; the inert consent loader and
``kissmetricsStart()`` work under it too. Django before 6.0 has no CSP: skipped there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.test import override_settings
from pytest_django.live_server_helper import LiveServer

from tests.browser import BrowserPage, browser, km_page
from tests.csp_site import csp_settings

__all__ = ["browser", "km_page"]  # Fixtures, used by name.

pytestmark = [
    pytest.mark.skipif(django.VERSION < (6, 0), reason="Django's own CSP is Django 6.0+"),
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
]

KEY = "test-key"
LIBRARY_REQUESTS = ["http://i.kissmetrics.io/i.js", f"http://scripts.kissmetrics.io/{KEY}.2.js"]
WATCH = (
    "window.__violations = [];"
    "document.addEventListener('securitypolicyviolation', function (e) {"
    " window.__violations.push(e.violatedDirective + ' ' + e.blockedURI); });"
)


@pytest.fixture(scope="module")
def site(django_db_setup: None) -> Iterator[LiveServer]:
    """The live server, started under Django's CSP middleware and policy."""
    with override_settings(STATIC_URL="/static/", **csp_settings("trk.kissmetrics.io")):
        server = LiveServer("localhost")
        try:
            yield server
        finally:
            server.stop()


def violations(km_page: BrowserPage) -> list[str]:
    km_page.page.wait_for_load_state("load")
    km_page.page.wait_for_timeout(200)  # The loader inserts the library after a tick.
    return list(km_page.page.evaluate("() => window.__violations"))


def nonce_of(response: Any) -> str:
    header = response.header_value("content-security-policy") or ""
    assert "script-src 'self' 'nonce-" in header, header
    match = re.search(r"'nonce-([^']+)'", header)
    assert match, header
    return match[1]


@pytest.mark.parametrize("path", ["/tag-only/", "/own-script/"])
def test_the_snippet_runs_under_djangos_csp(km_page: BrowserPage, path: str) -> None:
    km_page.page.add_init_script(WATCH)
    response = km_page.goto(path)
    nonce = nonce_of(response)
    assert f'<script nonce="{nonce}">\nvar _kmq' in response.text()

    km_page.page.wait_for_function("() => window.__km && window.__km.ready")
    assert violations(km_page) == []  # Once the library ran, the loader's part is over.
    assert sorted(km_page.library_requests) == LIBRARY_REQUESTS
    library = km_page.library()
    assert library.key == KEY
    assert ["record", "Saw Page", {"n": 1 if path == "/tag-only/" else 2}] in library.commands
    if path == "/own-script/":
        assert km_page.page.evaluate("() => window.ownScriptRan") is True


def test_the_control_a_script_without_the_nonce_is_refused(km_page: BrowserPage) -> None:
    """The policy is really enforced: an inline script without its nonce is reported."""
    km_page.page.add_init_script(WATCH)
    km_page.goto("/tag-only/")
    km_page.page.wait_for_load_state("load")
    km_page.page.evaluate(
        "() => { const s = document.createElement('script'); s.text = 'window.bad = 1';"
        " document.head.appendChild(s); }"
    )
    km_page.page.wait_for_function("() => window.__violations.length > 0")
    assert km_page.page.evaluate("() => window.bad") is None
    assert [v for v in violations(km_page) if v.startswith("script-src")]


def test_the_inert_loader_starts_under_djangos_csp(km_page: BrowserPage, km_settings: Any) -> None:
    km_settings(CONSENT="tests.csp_site.agreed")
    km_page.page.add_init_script(WATCH)
    response = km_page.goto("/own-script/")
    nonce = nonce_of(response)
    assert f'data-category="analytics" nonce="{nonce}">' in response.text()
    km_page.page.wait_for_load_state("load")
    km_page.page.wait_for_timeout(100)
    assert km_page.library_requests == []  # Inert until the visitor agrees.

    km_page.page.click("p")  # The page's own script calls kissmetricsStart().
    km_page.library()  # Both scripts have run.
    assert sorted(km_page.library_requests) == LIBRARY_REQUESTS
    assert violations(km_page) == []
