"""The stand-in tracking API and its live page."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from .models import Hit
from .people import group

# The tracking API's answer to every command it accepts: a 1x1 transparent GIF.
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
TRANSPORT = frozenset({"_k", "_p", "_n", "_t", "_d"})


@require_GET
@never_cache
def collect(request: HttpRequest, path: str) -> HttpResponse:
    """``/e``, ``/s`` or ``/a``: store the hit, answer the GIF."""
    params = request.GET
    needed = ("_k", "_p", "_n") if path in ("/e", "/a") else ("_k", "_p")
    missing = [name for name in needed if not params.get(name)]
    if missing:
        return HttpResponseBadRequest(f"missing {', '.join(missing)}")
    raw_time = params.get("_t", "")
    Hit.objects.create(
        path=path,
        key=params["_k"],
        person=params["_p"],
        name=params.get("_n", ""),
        properties={k: v for k, v in params.items() if k not in TRANSPORT},
        timestamp=int(raw_time) if raw_time.isdigit() else None,
        user_agent=request.headers.get("User-Agent", "")[:300],
    )
    return HttpResponse(GIF, content_type="image/gif")


@require_GET
def site_script(request: HttpRequest, key: str) -> HttpResponse:
    """``/<key>.2.js``: in place of the site script the real library loads for a key.

    The real one carries the site's settings from Kissmetrics; the stand-in has none, so
    the page only loads this, and nothing from Kissmetrics' hosts.
    """
    return HttpResponse(
        f"/* Stand-in site script for key {key!r}: nothing to configure. */\n",
        content_type="text/javascript",
    )


def index(request: HttpRequest) -> HttpResponse:
    """The live page: people, their identities, properties and timelines."""
    return render(request, "tracker/index.html", _context())


@never_cache
def people_fragment(request: HttpRequest) -> HttpResponse:
    """The people part of the page, which the page fetches again every two seconds."""
    return render(request, "tracker/_people.html", _context())


@never_cache
def people_json(request: HttpRequest) -> JsonResponse:
    """The same, as JSON."""
    hits = list(Hit.objects.all())
    return JsonResponse({"hits": len(hits), "people": [person.as_dict() for person in group(hits)]})


@require_POST
def clear(request: HttpRequest) -> HttpResponse:
    """Forget every hit."""
    Hit.objects.all().delete()
    return redirect("tracker:index")


def _context() -> dict[str, object]:
    hits = list(Hit.objects.all())
    return {"people": group(hits), "hit_count": len(hits)}
