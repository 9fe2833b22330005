"""Views the tests drive through the real middleware stack."""

from __future__ import annotations

import json
import secrets

from django.contrib.auth import login
from django.contrib.auth.models import User
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.utils.cache import patch_cache_control

from django_kissmetrics import km


def page(request: HttpRequest) -> HttpResponse:
    return render(request, "page.html")


def record(request: HttpRequest) -> HttpResponse:
    props = json.loads(request.GET.get("props", "{}"))
    km.record(request.GET.get("event", "Viewed Page"), props)
    return HttpResponse("ok")


async def async_record(request: HttpRequest) -> HttpResponse:
    km.record("Async Event", {"n": 1})
    return HttpResponse("ok")


def nothing(request: HttpRequest) -> HttpResponse:
    return HttpResponse("nothing")


def user_page(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"user {request.user.pk}")


def browser_then_redirect(request: HttpRequest) -> HttpResponse:
    km.js.record("Clicked Buy", {"plan": "pro", "amount": 49})
    return HttpResponseRedirect("/")


def atomic(request: HttpRequest) -> HttpResponse:
    km.record("Before")
    try:
        with transaction.atomic():
            km.record("Rolled Back")
            raise RuntimeError
    except RuntimeError:
        pass
    with transaction.atomic():
        km.record("Committed")
    return HttpResponse("ok")


def signup(request: HttpRequest) -> HttpResponse:
    """A hand-written signup: create the user, then the usual automatic login."""
    user = User.objects.create_user(request.POST["username"], password=request.POST["password"])
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return HttpResponseRedirect("/")


def cached(request: HttpRequest) -> HttpResponse:
    """A page caches may keep for a minute (``?public=1``: any cache).

    ``?cookie=<name>`` also sets a cookie of the site's own, per visitor.
    """
    km.record("Viewed Cached Page")
    response = HttpResponse("a cached page")
    patch_cache_control(
        response, max_age=60, **({"public": True} if "public" in request.GET else {})
    )
    if "cookie" in request.GET:
        response.set_cookie(request.GET["cookie"], secrets.token_hex(8))
    return response


def invite(request: HttpRequest) -> HttpResponse:
    """Accounts made for other people (invitations): the visitor stays who they are."""
    for username in request.POST["usernames"].split(","):
        User.objects.create_user(username)
    km.record("Sent Invitations")
    return HttpResponse("invited")


def boom(request: HttpRequest) -> HttpResponse:
    km.record("Before Error")
    raise ValueError("boom")


# Views for the browser and XSS suites (tests/test_browser.py, tests/test_xss.py).


def browser_page(request: HttpRequest) -> HttpResponse:
    """A page with the tag and nothing else to track."""
    return render(request, "browser_page.html")


def browser_commands(request: HttpRequest) -> HttpResponse:
    """A server-side event, and browser-side commands with values of every JSON type."""
    km.record("Viewed Pricing", {"plan": "pro"})
    km.js.record(
        "Viewed Pricing",
        {"plan": "pro", "seats": 3, "price": 49.5, "trial": True, "code": "049", "dropped": None},
    )
    km.js.set({"Plan": "pro", "Seats": 3})
    return render(request, "browser_page.html")


def browser_tag(request: HttpRequest) -> HttpResponse:
    """Only the tag's output, between brackets: ``[]`` when it renders nothing.

    ``?js=1`` queues two browser-side events first, one with a value JSON cannot hold;
    ``?twice=1`` renders the tag twice.
    """
    if request.GET.get("js"):
        km.js.record("Not JSON", {"value": object()})
        km.js.record("Saw Tag", {"n": 1})
    template = "browser_tag_twice.html" if request.GET.get("twice") else "browser_tag.html"
    return render(request, template, content_type="text/plain")


def browser_csp(request: HttpRequest) -> HttpResponse:
    """A page under a nonce-based Content-Security-Policy.

    ``?nonce=0`` sends the policy without giving the request its nonce; ``?nonce=<text>``
    uses that nonce; ``?attr=<name>`` stores it under another request attribute;
    ``?policy=hosts`` allows the library's two hosts instead of ``'strict-dynamic'``.
    """
    import secrets

    nonce = request.GET.get("nonce") or secrets.token_urlsafe(16)
    if nonce != "0":
        setattr(request, request.GET.get("attr", "csp_nonce"), nonce)
    sources = (
        "http://i.kissmetrics.io http://scripts.kissmetrics.io"
        if request.GET.get("policy") == "hosts"
        else "'strict-dynamic'"
    )
    response = render(request, "browser_page.html")
    response["Content-Security-Policy"] = (
        f"script-src 'nonce-{nonce}' {sources}; object-src 'none'; base-uri 'none'"
    )
    return response


def browser_vector(request: HttpRequest) -> HttpResponse:
    """``?v=<JSON string>`` as the identity, an event name, a property name and a value."""
    vector = json.loads(request.GET["v"])
    km.identify(vector)
    km.js.record(vector, {vector: vector, "n": 1})
    km.js.set({vector: vector})
    return render(request, "browser_page.html")


def browser_triggers(request: HttpRequest) -> HttpResponse:
    """A button, a form and an outbound link, each with its trigger tag.

    ``?python=1`` declares a click trigger from the view as well (``km.js``).
    """
    if request.GET.get("python"):
        km.js.track_click("buy", "Pressed Buy", {"from": "view"})
    return render(request, "browser_triggers.html", {"form_properties": {"form": "signup"}})


def vector_identity(user: User) -> str:
    """An ``IDENTITY`` function for the XSS suite: whatever the user's first name holds."""
    return user.first_name


# Views for the consent suites (tests/test_consent.py, tests/test_browser_consent.py).


def consent_explicit(request: HttpRequest) -> HttpResponse:
    """A call about the current person and one about a named customer."""
    km.record("Viewed Page")
    km.set({"plan": "pro"})
    km.record("Refunded", {"amount": 49}, identity="customer-7")
    km.set({"refunded": True}, identity="customer-7")
    km.alias("customer-7", "c7@example.com")
    return HttpResponse("ok")


def consent_identify(request: HttpRequest) -> HttpResponse:
    """``km.identify()`` and browser-side commands, then a redirect (kept in the session)."""
    km.identify("ann@example.com")
    km.js.record("Clicked Buy")
    return HttpResponseRedirect("/browser/page/")


def consent_named(request: HttpRequest) -> HttpResponse:
    """Calls naming ``?who=`` (perhaps the visitor themself), and one naming a customer."""
    who = request.GET["who"]
    km.record("Viewed Page", identity=who)
    km.set({"plan": "pro"}, identity=who)
    km.alias(who, "someone@example.com")
    km.alias("customer-7", who)
    km.record("Refunded", identity="customer-7")
    return HttpResponse("ok")


async def async_consent_named(request: HttpRequest) -> HttpResponse:
    """:func:`consent_named` in an async view."""
    return consent_named(request)


def consent_page(request: HttpRequest) -> HttpResponse:
    """The tag and a hand-made banner that accepts or declines on django-cookie-consent's views."""
    return render(request, "consent_page.html")


def banner_consent(request: HttpRequest) -> bool:
    """A ``CONSENT`` function reading a hand-made banner's cookie, as the README shows."""
    return request.COOKIES.get("analytics_consent") == "yes"


def broken_consent(request: HttpRequest) -> bool:
    """A ``CONSENT`` function with a bug."""
    raise RuntimeError("consent store unreachable")
