"""The test site with django-debug-toolbar in front: settings and views for the panel.

Used only by tests/test_panel.py, through ``override_settings(**TOOLBAR_SETTINGS)``: the
rest of the suite runs without the toolbar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, HttpResponseRedirect
from django.shortcuts import render

from django_kissmetrics import km

PANEL = "django_kissmetrics.panels.KissmetricsPanel"

TOOLBAR_SETTINGS: dict[str, Any] = {
    "DEBUG": True,
    "INSTALLED_APPS": [*settings.INSTALLED_APPS, "django.contrib.staticfiles", "debug_toolbar"],
    "MIDDLEWARE": [
        "debug_toolbar.middleware.DebugToolbarMiddleware",
        "tests.panel_site.LateRecorder",
        *settings.MIDDLEWARE,
    ],
    "ROOT_URLCONF": "tests.panel_urls",
    "DEBUG_TOOLBAR_PANELS": [
        "debug_toolbar.panels.request.RequestPanel",
        "debug_toolbar.panels.sql.SQLPanel",
        PANEL,
    ],
    "DEBUG_TOOLBAR_CONFIG": {
        "SHOW_TOOLBAR_CALLBACK": "tests.panel_site.show_toolbar",
        "IS_RUNNING_TESTS": False,
    },
}


def show_toolbar(request: HttpRequest) -> bool:
    return True


class LateRecorder:
    """A middleware outside KissmetricsMiddleware that records after the response (``?late=1``).

    Its command is handed to the backend at once: the request's own buffer has left.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        if request.GET.get("late"):
            request.km.record("Late Event")  # type: ignore[attr-defined]
        return response


def shop(request: HttpRequest) -> HttpResponse:
    """A page with a server event, a browser event and the tag."""
    km.record("Viewed Shop", {"plan": "pro", "seats": 3})
    km.js.record("Saw Banner", {"banner": "spring", "n": 1})
    return render(request, "page.html")


def buy(request: HttpRequest) -> HttpResponse:
    """A browser event, then a redirect to the shop, whose page emits it."""
    km.js.record("Clicked Buy", {"plan": "pro"})
    return HttpResponseRedirect("/shop/")
