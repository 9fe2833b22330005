"""Consent in Chromium, on ``www.shop.test``: nothing before the visitor agrees, all of it after.

The site gates on django-cookie-consent (``CONSENT`` is the package's adapter); the page's
banner accepts and declines through that package's own views. The live server delivers
with the ``sync`` backend to a :class:`StandInTracker`, and the Kissmetrics library is
the stand-in in ``tests/browser.py``, so every id compared here really travelled.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import cookie_consent.conf  # noqa: F401  # Its defaults join settings now, not inside an override.
import pytest

from django_kissmetrics.testing import StandInTracker
from tests.browser import BrowserPage, browser, km_page, site

__all__ = ["browser", "km_page", "site"]  # Fixtures, used by name.

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "test-key"
HOST = "www.shop.test"
LIBRARY_REQUESTS = ["http://i.kissmetrics.io/i.js", f"http://scripts.kissmetrics.io/{KEY}.2.js"]


@pytest.fixture
def gated(km_settings: Any, tracker: StandInTracker) -> Iterator[StandInTracker]:
    """CONSENT is django-cookie-consent's ``analytics`` group; delivery goes to ``tracker``."""
    from cookie_consent.cache import delete_cache
    from cookie_consent.models import Cookie, CookieGroup

    group = CookieGroup.objects.create(varname="analytics", name="Analytics")
    Cookie.objects.create(cookiegroup=group, name="kissmetrics", domain="")
    km_settings(
        BACKEND="sync",
        TRACKING_URL=tracker.url,
        CONSENT="django_kissmetrics.consent.django_cookie_consent",
    )
    yield tracker
    delete_cache()  # Its cache outlives this test's database.


def km_cookies(km_page: BrowserPage) -> list[dict[str, Any]]:
    return [dict(c) for c in km_page.context.cookies() if c["name"].startswith("km_")]


def answer(km_page: BrowserPage, action: str) -> None:
    """Click the banner's button and wait for django-cookie-consent's view to answer."""
    km_page.page.evaluate("() => { window.__consent = null; }")
    km_page.page.click(f"#{action}")
    km_page.page.wait_for_function(f"() => window.__consent === {action!r}")


def assert_inert(km_page: BrowserPage) -> None:
    """The page holds the inert loader, and nothing of Kissmetrics ran or was fetched."""
    km_page.page.wait_for_load_state("load")
    km_page.page.wait_for_timeout(100)  # The live loader would have fetched by now.
    assert km_page.page.locator('script[type="text/plain"][data-category="analytics"]').count()
    assert km_page.page.evaluate("() => typeof window._kmq") == "undefined"
    assert km_page.page.evaluate("() => typeof window.kissmetricsStart") == "function"
    assert km_page.library_requests == []
    assert km_cookies(km_page) == []


def test_a_first_visit_holds_no_cookie_and_loads_no_library(
    km_page: BrowserPage, gated: StandInTracker
) -> None:
    response = km_page.goto("/consent/page/", host=HOST)
    assert "km_" not in (response.header_value("set-cookie") or "")
    assert_inert(km_page)
    km_page.goto("/record/?event=Before+Consent", host=HOST)
    assert km_cookies(km_page) == []
    assert gated.hits == []  # The sync backend would have delivered before answering.


def test_accepting_starts_the_library_without_a_reload(
    km_page: BrowserPage, gated: StandInTracker
) -> None:
    km_page.goto("/consent/page/", host=HOST)
    km_page.page.evaluate("() => { window.__samePage = true; }")
    answer(km_page, "accept")

    library = km_page.library()
    assert km_page.page.evaluate("() => window.__samePage") is True  # No reload.
    assert sorted(km_page.library_requests) == LIBRARY_REQUESTS
    assert library.adopted is None  # No server cookie before consent: the library's own id.
    assert library.cookie_domain == HOST
    (cookie,) = km_page.cookies("km_ai")
    assert cookie["domain"] == "." + HOST

    response = km_page.goto("/record/?event=After+Consent", host=HOST)
    assert "km_ai" not in (response.header_value("set-cookie") or "")  # Adopted as it is.
    (hit,) = [h for h in gated.wait_for(1) if h.name == "After Consent"]
    assert hit.person == library.identity == km_page.cookie("km_ai")

    km_page.goto("/consent/page/", host=HOST)  # Agreed: the live loader, the same id.
    again = km_page.library()
    assert again.adopted == again.identity == library.identity
    assert len(km_page.cookies("km_ai")) == 1


def test_a_consent_manager_switches_the_inert_loader_on(
    km_page: BrowserPage, gated: StandInTracker
) -> None:
    km_page.goto("/consent/page/", host=HOST)
    # What cookieconsent, Klaro and Cookiebot do on consent: run each marked script.
    km_page.page.evaluate(
        """() => document.querySelectorAll('script[type="text/plain"][data-category="analytics"]')
            .forEach((inert) => {
                const live = document.createElement("script");
                live.text = inert.text;
                inert.replaceWith(live);
            })"""
    )
    library = km_page.library()
    assert library.key == KEY
    km_page.page.evaluate("() => kissmetricsStart()")  # A banner calling it as well...
    km_page.page.wait_for_timeout(200)
    assert sorted(km_page.library_requests) == LIBRARY_REQUESTS  # ...loads nothing twice.
    assert km_page.errors == []


def test_declining_keeps_everything_off(km_page: BrowserPage, gated: StandInTracker) -> None:
    km_page.goto("/consent/page/", host=HOST)
    answer(km_page, "decline")
    assert [c["name"] for c in km_page.context.cookies() if c["name"] == "cookie_consent"]
    assert_inert(km_page)

    km_page.goto("/consent/page/", host=HOST)
    assert_inert(km_page)
    km_page.goto("/record/?event=After+Declining", host=HOST)
    assert km_cookies(km_page) == []
    assert gated.hits == []


@pytest.mark.parametrize(
    ("configured", "domain"), [(None, HOST), (".shop.test", ".shop.test")], ids=["host", "setting"]
)
def test_withdrawing_deletes_the_cookies(
    km_page: BrowserPage,
    gated: StandInTracker,
    km_settings: Any,
    configured: str | None,
    domain: str,
) -> None:
    km_settings(COOKIE_DOMAIN=configured)
    km_page.goto("/consent/page/", host=HOST)
    answer(km_page, "accept")
    km_page.library()
    km_page.goto("/consent/identify/", host=HOST)  # The library writes km_ni too.
    assert km_page.library().identity == "ann@example.com"
    held = km_cookies(km_page)
    assert sorted(c["name"] for c in held) == ["km_ai", "km_ni"]
    assert {c["domain"] for c in held} == {"." + domain.lstrip(".")}  # Domain= cookies.

    km_page.goto("/consent/page/", host=HOST)
    answer(km_page, "decline")  # Withdrawn: the browser still holds both.
    km_page.library_requests.clear()
    response = km_page.goto("/consent/page/", host=HOST)
    deleted = response.header_values("set-cookie")
    for name in ("km_ai", "km_ni"):
        (header,) = [h for h in deleted if h.startswith(f"{name}=")]
        assert re.search(rf"Domain={re.escape(domain)};", header)
        assert "Max-Age=0" in header
    assert_inert(km_page)
    km_page.goto("/record/?event=After+Withdrawal", host=HOST)
    assert [h for h in gated.hits if h.name == "After Withdrawal"] == []
