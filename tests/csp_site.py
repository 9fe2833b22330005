"""The test site under Django's own Content Security Policy (Django 6.0+), for test_django_csp.

Used through ``override_settings(**CSP_SETTINGS)`` before the live server starts: the rest
of the suite runs without the policy.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.template import engines
from django.urls import path

from django_kissmetrics import km

#: The README's script-src and img-src, over http: the live server is not https.
SCRIPT_HOSTS = ["i.kissmetrics.io", "scripts.kissmetrics.io"]


def csp_settings(tracker_host: str) -> dict[str, Any]:
    """Django's middleware and policy (enforced, with a nonce) in front of the test site."""
    from django.utils.csp import CSP

    templates = [{**settings.TEMPLATES[0]}]
    templates[0]["OPTIONS"] = {
        **templates[0]["OPTIONS"],
        "context_processors": [
            *templates[0]["OPTIONS"]["context_processors"],
            "django.template.context_processors.csp",
        ],
    }
    return {
        "MIDDLEWARE": [
            "django.middleware.csp.ContentSecurityPolicyMiddleware",
            *settings.MIDDLEWARE,
        ],
        "SECURE_CSP": {
            "default-src": [CSP.SELF],
            "script-src": [CSP.SELF, CSP.NONCE, *SCRIPT_HOSTS],
            "img-src": [CSP.SELF, tracker_host],
        },
        "TEMPLATES": templates,
        "ROOT_URLCONF": "tests.csp_site",
    }


TAG_ONLY = (
    "<!doctype html><html><head>{% load kissmetrics %}{% kissmetrics_js %}</head>"
    "<body><p>tag only</p></body></html>"
)
#: A page whose own script reads {{ csp_nonce }} too, and starts the loader on a click.
OWN_SCRIPT = (
    "<!doctype html><html><head>{% load kissmetrics %}{% kissmetrics_js %}"
    '<script nonce="{{ csp_nonce }}">window.ownScriptRan = true;'
    "document.addEventListener('click', function () {"
    " if (window.kissmetricsStart) kissmetricsStart(); });</script>"
    "</head><body><p>own script</p></body></html>"
)


def render(source: str, request: HttpRequest) -> HttpResponse:
    # Compiled per request: the engine (and its context processors) is the one in force.
    return HttpResponse(engines["django"].from_string(source).render({}, request))


def tag_only(request: HttpRequest) -> HttpResponse:
    km.js.record("Saw Page", {"n": 1})
    return render(TAG_ONLY, request)


def own_script(request: HttpRequest) -> HttpResponse:
    km.js.record("Saw Page", {"n": 2})
    return render(OWN_SCRIPT, request)


def agreed(request: HttpRequest) -> bool:
    """The consent gate of these tests: the visitor agreed once ``agreed=1`` is a cookie."""
    return request.COOKIES.get("agreed") == "1"


urlpatterns = [path("tag-only/", tag_only), path("own-script/", own_script)]
