"""Views the tests drive through the real middleware stack."""

from __future__ import annotations

import json

from django.contrib.auth import login
from django.contrib.auth.models import User
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render

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


def boom(request: HttpRequest) -> HttpResponse:
    km.record("Before Error")
    raise ValueError("boom")
