"""Acquisition events recorded by the server (``AUTO_EVENTS``), as the JavaScript library would.

The library records where a visitor came from: ``Visited Site`` once per 30-minute visit,
``Ad Campaign Hit`` for a URL tagged with ``utm_*`` (or Google's ``gclid``), ``Search
Engine Hit`` for a visitor from a search engine, and the person property ``Referrer`` for
one from another site. An ad blocker that stops the library stops all of them. The
middleware sees every first request, blocked or not, so it records them here instead,
with the names and values the library uses, and the tag tells the library to skip its
own (``KM_SKIP_*``).

A visit lives in the cookie :data:`VISIT_COOKIE`: the time it was last seen, in Unix
seconds, and a short digest of the campaign recorded in it. A request without a live
visit starts one. The cookie is rewritten at most once a :data:`REFRESH_SECONDS`, so that
a visit ends :data:`VISIT_SECONDS` after the visitor was last seen, as the library's
``km_vs`` does. No database, no session: one cookie read per request, a little parsing on
the first request of a visit.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

from django.core.exceptions import DisallowedHost
from django.core.signals import setting_changed
from django.dispatch import receiver

from . import commands as cmd
from .cookies import _HOST_SETTINGS, anonymous_cookie, cookie_domain_for

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponseBase

    from .conf import Settings
    from .tracker import RequestTracker

logger = logging.getLogger(__name__)

__all__ = [
    "REFRESH_SECONDS",
    "VISIT_COOKIE",
    "VISIT_SECONDS",
    "begin",
    "finish",
    "search_engine",
]

#: The cookie holding the current visit (``km_*``: withdrawing consent deletes it).
VISIT_COOKIE = "km_visit"
#: A visit ends this long after the visitor was last seen (the library's ``km_vs``).
VISIT_SECONDS = 1800
#: The visit cookie is rewritten at most this often (each rewrite is a ``Set-Cookie``).
REFRESH_SECONDS = 60

#: ``utm_*`` parameter -> the property the library records it as.
CAMPAIGN_PROPERTIES = (
    ("utm_source", "Campaign Source"),
    ("utm_medium", "Campaign Medium"),
    ("utm_campaign", "Campaign Name"),
    ("utm_term", "Campaign Terms"),
    ("utm_content", "Campaign Content"),
)

#: (name, host pattern, query parameters holding the terms), first match wins.
SEARCH_ENGINES: tuple[tuple[str, re.Pattern[str], tuple[str, ...]], ...] = tuple(
    (name, re.compile(pattern), params)
    for name, pattern, params in (
        ("Google", r"(?:.+\.)?google\.(?:com?\.)?[a-z]{2,3}", ("q",)),
        ("Bing", r"(?:.+\.)?bing\.com", ("q",)),
        ("Yahoo", r"(?:.+\.)?search\.yahoo\.(?:com?\.)?[a-z]{2,3}", ("p",)),
        ("DuckDuckGo", r"(?:.+\.)?duckduckgo\.com", ("q",)),
        ("Yandex", r"(?:.+\.)?yandex\.(?:com?\.)?[a-z]{2,3}|(?:.+\.)?ya\.ru", ("text",)),
        ("Baidu", r"(?:.+\.)?baidu\.com", ("wd", "word")),
        ("Ecosia", r"(?:.+\.)?ecosia\.org", ("q",)),
        ("Ask", r"(?:.+\.)?ask\.com", ("q",)),
        ("AOL", r"(?:.+\.)?search\.aol\.com", ("q", "query")),
    )
)

_STAMP = re.compile(r"(\d{1,12})(?:\.([0-9a-f]{1,8}))?")


def search_engine(referrer: str) -> tuple[str, str] | None:
    """(engine, search terms) when ``referrer`` is a search engine's page, else ``None``.

    The terms are ``""`` when the engine did not pass them on (most do not any more).
    """
    try:
        parts = urlsplit(referrer)
        host = (parts.hostname or "").rstrip(".")
    except ValueError:
        return None
    for name, pattern, params in SEARCH_ENGINES:
        if pattern.fullmatch(host):
            query = parse_qs(parts.query)
            terms = next((query[p][0] for p in params if query.get(p)), "")
            return name, terms
    return None


def _host(value: str) -> str:
    """A host as the library compares them: lower case, no port, no leading ``www.``."""
    host = value.lower().rsplit("@", 1)[-1]
    host = host.split("]", 1)[0] + "]" if host.startswith("[") else host.split(":", 1)[0]
    return host[4:] if host.startswith("www.") else host


def _from_elsewhere(referrer_host: str, request: HttpRequest, conf: Settings) -> bool:
    """Whether a referrer host is another site (not this host, nor the cookie's domain)."""
    here = _host(request.META.get("HTTP_HOST") or request.META.get("SERVER_NAME", ""))
    there = _host(referrer_host)
    if not there or there == here:
        return False
    shared = (conf.COOKIE_DOMAIN or "").lstrip(".").lower()
    return not (shared and (there == shared or there.endswith("." + shared)))


def _campaign(query: str) -> dict[str, str]:
    # parse_qsl, not request.GET: a QueryDict costs several times more to build.
    params = dict(parse_qsl(query))
    found = {prop: params[param] for param, prop in CAMPAIGN_PROPERTIES if params.get(param)}
    gclid = params.get("gclid")
    if gclid:
        found["gclid"] = gclid
    return found


def _digest(campaign: Mapping[str, str]) -> str:
    return format(zlib.crc32("\0".join(campaign.values()).encode("utf-8", "replace")), "x")


#: (X-Forwarded-Host, Host, secure) -> "scheme://host" that passed ``get_host()``.
_origins: dict[tuple[str | None, str, bool], str] = {}


@receiver(setting_changed, dispatch_uid="django_kissmetrics.acquisition")
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting in _HOST_SETTINGS:
        _origins.clear()


def _url(request: HttpRequest) -> str:
    """``request.build_absolute_uri()``, with the host validated once per ``Host`` header."""
    meta = request.META
    key = (meta.get("HTTP_X_FORWARDED_HOST"), meta.get("HTTP_HOST", ""), request.is_secure())
    origin = _origins.get(key)
    if origin is None:
        origin = f"{'https' if key[2] else 'http'}://{request.get_host()}"
        if len(_origins) >= 256:
            _origins.clear()  # Bounded, whatever hosts ALLOWED_HOSTS lets in.
        _origins[key] = origin
    return origin + request.get_full_path()


def begin(tracker: RequestTracker, conf: Settings) -> None:
    """On a tracked request: what it records (``tracker.acquired``) and the visit cookie.

    Called by the middleware for an active tracker only: bots, excluded paths, DNT/GPC
    and visitors who have not agreed never get here. Never raises.
    """
    try:
        _begin(tracker, conf)
    except DisallowedHost:
        pass  # Django answers 400 for that host (CommonMiddleware) or the site chose not to.
    except Exception:
        logger.exception("Kissmetrics: could not work out this request's acquisition events")


def _begin(tracker: RequestTracker, conf: Settings) -> None:
    request = tracker.request
    now = int(time.time())
    seen = _STAMP.fullmatch(request.COOKIES.get(VISIT_COOKIE, ""))
    stamp = int(seen[1]) if seen else 0
    # Another web server's clock may be a little ahead (and the stamp is whole seconds);
    # a stamp further in the future is not a visit: a visitor may write any cookie.
    live = -REFRESH_SECONDS < now - stamp < VISIT_SECONDS
    query = request.META.get("QUERY_STRING", "")
    events = conf.AUTO_EVENTS
    campaign: dict[str, str] = {}
    if ("utm_" in query or "gclid" in query) and "Ad Campaign Hit" in events:
        campaign = _campaign(query)
    digest = _digest(campaign) if campaign else (seen[2] or "" if seen and live else "")
    if live and (not campaign or (seen is not None and seen[2] == digest)):
        if now - stamp >= REFRESH_SECONDS:
            tracker.visit_cookie = _value(now, digest)
        return  # Inside a visit, nothing new: the common request.
    acquired: list[tuple[str | None, dict[str, str]]] = []
    url = _url(request)
    referrer = request.META.get("HTTP_REFERER", "")
    engine = None
    if not live:
        if "Visited Site" in events:
            acquired.append(("Visited Site", {"URL": url, "Referrer": referrer or "Direct"}))
        if referrer and ("Search Engine Hit" in events or campaign.get("gclid")):
            engine = search_engine(referrer)
        if (
            engine
            and "Search Engine Hit" in events
            and not (engine[0] == "Google" and campaign.get("gclid"))
        ):
            acquired.append(("Search Engine Hit", _search_properties(engine)))
    if campaign:
        properties = {**campaign, "URL": url}
        if engine and engine[0] == "Google" and campaign.get("gclid"):
            properties.update(_search_properties(engine))  # A paid click, as the library has it.
        acquired.append(("Ad Campaign Hit", properties))
    if not live and referrer and "Referrer" in events:
        try:
            host = urlsplit(referrer).netloc
        except ValueError:  # Not a URL: a visitor may send any header.
            host = ""
        if _from_elsewhere(host, request, conf):
            acquired.append((None, {"Referrer": referrer}))
    tracker.acquired = acquired
    tracker.acquired_at = now
    tracker.visit_cookie = _value(now, digest)


def _search_properties(engine: tuple[str, str]) -> dict[str, str]:
    name, terms = engine
    return {"Search Engine": name, "Search Terms": terms} if terms else {"Search Engine": name}


def _value(now: int, digest: str) -> str:
    return f"{now}.{digest}" if digest else str(now)


def finish(tracker: RequestTracker, response: HttpResponseBase) -> None:
    """As the response leaves: record what :func:`begin` found; write the visit cookie.

    Recorded through the tracker, for the person the request ends with, whatever the
    response is (a campaign link often lands on a redirect).
    """
    acquired, when = tracker.acquired, tracker.acquired_at
    person = tracker.identity if acquired else None  # Worked out once, for all of them.
    if person is not None:
        try:
            tracker.add_commands(
                [
                    cmd._record(person, name, properties, when)
                    if name is not None
                    else cmd.make_set(person, properties, when)
                    for name, properties in acquired
                ]
            )
        except (TypeError, ValueError):
            logger.exception("Kissmetrics: dropped this request's acquisition events")
    value = tracker.visit_cookie
    if value is not None:
        request = tracker.request
        response.cookies[VISIT_COOKIE] = anonymous_cookie(
            VISIT_COOKIE,
            value,
            max_age=VISIT_SECONDS,
            domain=cookie_domain_for(request),
            secure=request.is_secure(),
        )
