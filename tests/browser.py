"""Shared fixtures for the Chromium suites: a browser, a page, and a stand-in Kissmetrics library.

The page's requests for the Kissmetrics library (``//i.kissmetrics.io/i.js`` and
``//scripts.kissmetrics.io/<key>.2.js``) are answered by :data:`STAND_IN_LIBRARY`, which
behaves like the real library where this package depends on it: it takes over ``_kmq``,
runs its commands, reads ``km_ni`` then ``km_ai`` (``decodeURIComponent``) and writes
them back (``encodeURIComponent``, path ``/``, five years, ``domain=KM_COOKIE_DOMAIN``
when set). As the real one does, ``identify(x)`` without ``km_ni`` aliases ``x`` to
``km_ai`` and sets ``km_ni``; with ``km_ni`` set it writes ``x`` into ``km_ai`` as well;
``clearIdentity`` deletes ``km_ai`` (and starts a new id) only when ``km_ni`` was set,
then deletes ``km_ni``. It also records what it was given in ``window.__km``.

Chromium is Debian's ``/usr/bin/chromium`` (never a downloaded one). Without it, or
without Playwright, the browser tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.conf import settings
from django.test import override_settings
from pytest_django.live_server_helper import LiveServer

from tests.conftest import need

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Response, Route

# Debian's Chromium; never a downloaded browser. CHROMIUM points elsewhere if needed.
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # A real-looking site: www.shop.test and every other *.test host is this machine.
    "--host-resolver-rules=MAP *.test 127.0.0.1",
]
LIBRARY_URLS = ("**/i.kissmetrics.io/i.js", "**/scripts.kissmetrics.io/**")

STAND_IN_LIBRARY = r"""
(function () {
  "use strict";
  var src = document.currentScript ? document.currentScript.src : "";
  var km = (window.__km = window.__km ||
    {loads: [], commands: [], writes: [], aliases: [], ready: false});
  km.loads.push(src);
  if (src.indexOf("//scripts.kissmetrics.io/") < 0) {
    return;  // i.js: the identity part; this stand-in does everything in the main script.
  }
  var FIVE_YEARS = 5 * 365 * 24 * 3600 * 1000;

  function read(name) {
    var pairs = document.cookie ? document.cookie.split("; ") : [];
    for (var i = 0; i < pairs.length; i++) {
      var eq = pairs[i].indexOf("=");
      if (pairs[i].slice(0, eq) === name) {
        return decodeURIComponent(pairs[i].slice(eq + 1));
      }
    }
    return null;
  }
  function domain() {
    return window.KM_COOKIE_DOMAIN ? "domain=" + KM_COOKIE_DOMAIN : "";
  }
  function write(name, value) {
    var text = name + "=" + encodeURIComponent(value) + "; path=/; expires=" +
      new Date(Date.now() + FIVE_YEARS).toUTCString() + "; " + domain();
    document.cookie = text;
    km.writes.push(text);
  }
  function erase(name) {
    document.cookie = name + "=; path=/; expires=Thu, 01 Jan 1970 00:00:00 GMT; " + domain();
  }
  function newId() {
    var bytes = new Uint8Array(20);
    crypto.getRandomValues(bytes);
    return btoa(String.fromCharCode.apply(null, bytes));
  }

  var queue = window._kmq || [];
  km.key = window._kmk;
  km.cookieDomain = "KM_COOKIE_DOMAIN" in window ? window.KM_COOKIE_DOMAIN : null;
  km.queued = queue.map(function (c) {
    return typeof c === "function" ? "function" : JSON.stringify(c);
  });
  km.adopted = read("km_ai");
  var ai = km.adopted || newId();
  var ni = read("km_ni");
  write("km_ai", ai);

  function run(c) {
    if (typeof c === "function") {
      c();
      return;
    }
    km.commands.push(JSON.stringify(c));
    if (c[0] === "identify") {
      if (ni === null) {
        if (c[1] !== ai) km.aliases.push([ai, c[1]]);
      } else {
        ai = c[1];
        write("km_ai", ai);
      }
      ni = c[1];
      write("km_ni", ni);
    } else if (c[0] === "clearIdentity") {
      if (ni !== null) {
        erase("km_ai");
        ai = newId();
        write("km_ai", ai);
      }
      ni = null;
      erase("km_ni");
    }
  }
  window.KM = {i: function () { return ni || ai; }};
  window._kmq = {push: function () {
    for (var i = 0; i < arguments.length; i++) run(arguments[i]);
  }};
  queue.forEach(run);
  km.ready = true;
})();
"""


# Both libraries (the real one and kmq.js) take `_kmq` over when they run: its push is then
# theirs, no longer the array's. The loader inserts the script after a timer tick, so the
# page's `load` event can come before it, and a trigger is bound only once it has run.
LIBRARY_RUNNING = "() => window._kmq && window._kmq.push !== Array.prototype.push"


def wait_for_library(page: Page, timeout: float = 10_000) -> None:
    """Wait until the Kissmetrics library on ``page`` has taken over ``_kmq``."""
    page.wait_for_function(LIBRARY_RUNNING, timeout=timeout)


@dataclass
class Library:
    """What the stand-in library saw on one page."""

    loads: list[str]
    key: str
    cookie_domain: str | None
    queued: list[Any]
    commands: list[Any]
    queued_json: list[str]
    adopted: str | None
    identity: str
    writes: list[str]
    aliases: list[list[str]]


@dataclass
class BrowserPage:
    """A Chromium page with the stand-in library, and everything worth asserting about it."""

    page: Page
    port: int
    library_requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    @property
    def context(self) -> BrowserContext:
        """The page's own browser context (cookie jar)."""
        return self.page.context

    def url(self, path: str, host: str = "localhost") -> str:
        """``path`` on the live server, reached as ``host``."""
        return f"http://{host}:{self.port}{path}"

    def goto(self, path: str, host: str = "localhost") -> Response:
        """Load ``path`` and return the main document's response."""
        response = self.page.goto(self.url(path, host))
        assert response is not None
        return response

    def library(self, timeout: float = 5_000) -> Library:
        """Wait for both library scripts to have run on this page; what the library saw."""
        # The loader fetches the two scripts asynchronously and in either order: the main
        # one sets `ready`, and i.js may still be on its way.
        self.page.wait_for_function(
            "() => window.__km && window.__km.ready && window.__km.loads.length >= 2",
            timeout=timeout,
        )
        raw = self.page.evaluate("() => ({...window.__km, identity: window.KM.i()})")
        return Library(
            loads=raw["loads"],
            key=raw["key"],
            cookie_domain=raw["cookieDomain"],
            queued=[json.loads(c) for c in raw["queued"]],
            commands=[json.loads(c) for c in raw["commands"]],
            queued_json=raw["queued"],
            adopted=raw["adopted"],
            identity=raw["identity"],
            writes=raw["writes"],
            aliases=raw["aliases"],
        )

    def cookie(self, name: str) -> str | None:
        """``name`` as the library reads it: ``document.cookie`` and ``decodeURIComponent``."""
        value: str | None = self.page.evaluate(
            """(name) => {
                const pair = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
                return pair === undefined ? null : decodeURIComponent(pair.slice(name.length + 1));
            }""",
            name,
        )
        return value

    def cookies(self, name: str) -> list[dict[str, Any]]:
        """Every cookie called ``name`` the browser holds, whatever its domain and path."""
        return [dict(c) for c in self.context.cookies() if c["name"] == name]


def chromium_or_skip() -> None:
    """Skip (fail under ``CI=true``) when Chromium or Playwright is missing."""
    if not Path(CHROMIUM).exists():
        need(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        need("Playwright is not installed (pip install playwright; no browser download needed)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for a test module.

    Per module rather than per session: while Playwright's sync API is running it holds
    an asyncio event loop in the main thread, which would make every later test in the
    session look like async code to Django and to ``km``. For the same reason Django's
    async-safety check is relaxed while it runs (the test thread creates users and flushes
    the database around the live server).
    """
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as pw:
            instance = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            try:
                yield instance
            finally:
                instance.close()


@pytest.fixture(scope="module")
def site(django_db_setup: None) -> Iterator[LiveServer]:
    """pytest-django's live server, started for this module with a usable ``STATIC_URL``.

    The live server's static files handler cannot start without ``STATIC_URL`` (every
    request would fail with a ``TypeError``), and the test settings need no static files.
    Tests that use it need ``@pytest.mark.django_db(transaction=True)``, as with
    ``live_server``, so that the server thread sees their data.
    """
    with override_settings(STATIC_URL=settings.STATIC_URL or "/static/"):
        server = LiveServer("localhost")
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def km_page(browser: Browser, site: LiveServer) -> Iterator[BrowserPage]:
    """A fresh context and page on the live server, with the stand-in library routed in."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(10_000)
    state = BrowserPage(page, site.thread.port)

    def serve_library(route: Route) -> None:
        state.library_requests.append(route.request.url)
        route.fulfill(status=200, content_type="application/javascript", body=STAND_IN_LIBRARY)

    for pattern in LIBRARY_URLS:
        page.route(pattern, serve_library)

    def on_dialog(dialog: Any) -> None:
        state.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: state.errors.append(str(error)))
    page.on("console", lambda message: state.console.append(message.text))
    try:
        yield state
    finally:
        context.close()
