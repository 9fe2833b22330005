"""Views of the documentation's examples (index.md, template-tag.md, testing.md)."""

from django.http import HttpResponse
from django.shortcuts import redirect

from django_kissmetrics import km


def pricing(request):
    km.record("Viewed Pricing", {"plan": "pro"})
    return HttpResponse("Pricing")


def buy(request):
    km.record("Purchased", {"plan": "pro", "amount": 49})  # server side, queued
    km.js.record("Clicked Buy", {"plan": "pro", "amount": 49})  # on the next page, in the browser
    return redirect("receipt")
