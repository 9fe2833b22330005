"""The shop's pages. Each Kissmetrics call is the one a real site would make there."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from django_kissmetrics import km

from .models import Subscription
from .plans import PLANS


def home(request: HttpRequest) -> HttpResponse:
    """The landing page: nothing recorded by hand, the middleware still gives an id."""
    return render(request, "shop/home.html")


def pricing(request: HttpRequest) -> HttpResponse:
    """The plans; records "Viewed Pricing" for whoever is looking, named or not.

    ``?plan=`` marks the plan a visitor chose before signing up ("Start with Pro"): the
    sign-up form sends them back here with it, so the choice survives the sign-up.
    """
    current = getattr(getattr(request.user, "subscription", None), "plan", None)
    chosen = request.GET.get("plan") if request.GET.get("plan") in PLANS else None
    km.record("Viewed Pricing", {"plans shown": len(PLANS), "current plan": current})
    context = {"plans": PLANS.values(), "current": current, "chosen": chosen}
    return render(request, "shop/pricing.html", context)


def signup(request: HttpRequest) -> HttpResponse:
    """Django's own sign-up form, then log the new user in.

    Nothing here mentions Kissmetrics: the package's signal handlers see the user being
    created by an anonymous visitor, alias the visitor's anonymous id to the new identity
    and record "Signed Up"; ``login()`` then records "Logged In".
    """
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, f"Welcome aboard, {user.get_username()}! Pick a plan.")
        return redirect(_next_url(request, "pricing"))
    return render(request, "registration/signup.html", {"form": form})


@require_POST
@login_required
def buy(request: HttpRequest) -> HttpResponse:
    """Buy a plan: an event with properties, a person property, and a browser-side event."""
    plan = PLANS.get(request.POST.get("plan", ""))
    if plan is None:
        raise Http404("No such plan")
    Subscription.objects.update_or_create(
        user=request.user, defaults={"plan": plan.slug, "amount": plan.amount}
    )
    km.record("Purchased", {"plan": plan.slug, "amount": plan.amount})
    km.set({"plan": plan.slug})
    # A browser-side event: a redirect renders no page, so the package keeps it in the
    # session and {% kissmetrics_js %} emits it on the account page, for the
    # JavaScript library to record from the browser.
    km.js.record("Viewed Receipt", {"plan": plan.slug, "amount": plan.amount})
    messages.success(request, f"You are on {plan.name} now. Thank you!")
    return redirect("account")


@login_required
def account(request: HttpRequest) -> HttpResponse:
    """The customer's plan."""
    subscription = Subscription.objects.filter(user=request.user).first()
    plan = PLANS.get(subscription.plan) if subscription else None
    return render(request, "shop/account.html", {"subscription": subscription, "plan": plan})


def _next_url(request: HttpRequest, default: str) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return reverse(default)
