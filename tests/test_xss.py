"""No string a visitor or a developer passes can break out of ``{% kissmetrics_js %}``.

Each vector goes in as the identity (the ``IDENTITY`` setting and ``km.identify``), as an
event name, a property name and a property value of ``km.js`` commands. In Chromium none
of them may run (``document.title`` unchanged, no dialog, no script error, no second
script element), and each must reach the Kissmetrics library exactly as it was sent.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import User
from django.test import Client

from django_kissmetrics.commands import Command
from tests.browser import BrowserPage, browser, km_page, site

__all__ = ["browser", "km_page", "site"]  # Fixtures, used by name.

TITLE = "Browser test page"
PWNED = "document.title='pwned';window.__pwned=1;alert(1)"

VECTORS = {
    "close-script": "</script><script>alert(1)</script>",
    "close-script-upper": f"</SCRIPT ><script>{PWNED}</script>",
    "comment-open": f"<!--<script>{PWNED}//",
    "comment-close": f"--></script><script>{PWNED}</script>",
    "script-tag": f"<script>{PWNED}</script>",
    "double-quote": f'"]);{PWNED};//',
    "single-quote": f"']);{PWNED};//",
    "backslash-quote": f'\\"]);{PWNED};//\\',
    "backslashes": "C:\\temp\\new\\x41\\u0041\\\\",
    "line-separators": f"a\u2028{PWNED}\u2029b",
    "template-literal": "${alert(1)}`;" + PWNED + ";`",
    "cdata-end": f"]]></script><script>{PWNED}</script>",
    "nul": f"a\u0000b</script>\u0000<script>{PWNED}</script>",
    "img-onerror": "<img src=x onerror=alert(1)>",
    "entities": "&lt;/script&gt;&#60;script&#62;&amp;",
    "escaped-looking": "\\u003C/script\\u003E\\x3cscript\\x3e",
    "javascript-url": "javascript:alert(1)",
    "non-bmp": "naïve ☃ 😀 العربية",
}


@pytest.fixture(params=list(VECTORS.values()), ids=list(VECTORS))
def vector(request: pytest.FixtureRequest) -> str:
    """One injection vector; none has leading or trailing white space (identities are trimmed)."""
    value: str = request.param
    assert value == value.strip()
    return value


def assert_nothing_ran(km_page: BrowserPage, html: str) -> None:
    """The page is intact: one inline script with no ``<`` in it, no dialog, no script error."""
    assert html.count("<script") == 1
    assert html.count("</script>") == 1
    (script,) = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    assert "<" not in script
    assert km_page.page.title() == TITLE
    assert km_page.page.evaluate("() => window.__pwned") is None
    assert km_page.dialogs == []
    assert km_page.errors == []


@pytest.mark.django_db(transaction=True)
def test_vectors_through_km_identify_and_km_js(
    km_page: BrowserPage, km_outbox: list[Command], vector: str
) -> None:
    response = km_page.goto("/browser/vector/?" + urlencode({"v": json.dumps(vector)}))
    library = km_page.library()
    assert_nothing_ran(km_page, response.text())
    expected: list[Any] = [
        ["identify", vector],
        ["record", vector, {vector: vector, "n": 1}],
        ["set", {vector: vector}],
    ]
    assert library.queued == expected
    assert library.commands == expected
    assert library.identity == vector
    # The server aliased the very same identity.
    (alias,) = km_outbox
    assert alias.name == vector


@pytest.mark.django_db(transaction=True)
def test_vectors_as_the_identity_of_a_logged_in_user(
    km_page: BrowserPage, km_settings: Any, vector: str
) -> None:
    km_settings(IDENTITY="tests.views.vector_identity")
    user = User.objects.create_user("mallory", first_name=vector)
    client = Client()
    client.force_login(user)
    session = client.cookies["sessionid"].value
    km_page.context.add_cookies([{"name": "sessionid", "value": session, "url": km_page.url("/")}])

    response = km_page.goto("/browser/page/")
    library = km_page.library()
    assert_nothing_ran(km_page, response.text())
    assert library.queued == [["identify", vector]]
    assert library.identity == vector
