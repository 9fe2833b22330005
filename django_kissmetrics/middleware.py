"""``KissmetricsMiddleware``: a tracker per request, the ``km_ai`` cookie, one delivery."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponseBase

from .backends import get_backend
from .conf import get_settings
from .identity import cookie_domain, decode_cookie, encode_cookie
from .tracker import SESSION_BROWSER, RequestTracker, _current

logger = logging.getLogger(__name__)

__all__ = ["KissmetricsMiddleware"]


def _do_not_track(request: HttpRequest) -> bool:
    # META, not request.headers: building the headers mapping costs more than the check.
    meta = request.META
    return meta.get("HTTP_DNT") == "1" or meta.get("HTTP_SEC_GPC") == "1"


@functools.lru_cache(maxsize=1024)
def _is_bot(agent: str, pattern: re.Pattern[str]) -> bool:
    # A site sees a few hundred distinct user agents: cache the regex's answer.
    return pattern.search(agent) is not None


def start(request: HttpRequest) -> RequestTracker:
    """Make the request's tracker: decide whether this visitor is tracked, read ``km_ai``."""
    conf = get_settings()
    if not conf.enabled:
        return RequestTracker(request, active=False, allow_explicit=False)
    if conf.HONOR_DNT and _do_not_track(request):
        return RequestTracker(request, active=False, allow_explicit=False)
    agent = request.META.get("HTTP_USER_AGENT", "")
    if request.path_info.startswith(conf.EXCLUDE_PATHS) or (
        conf.IGNORE_USER_AGENTS is not None and _is_bot(agent[:512], conf.IGNORE_USER_AGENTS)
    ):
        # Not this visitor, but code here may still track someone by name
        # (an admin action about a customer).
        return RequestTracker(request, active=False, allow_explicit=True)
    anonymous = decode_cookie(request.COOKIES.get(conf.COOKIE_NAME))
    return RequestTracker(request, anonymous_id=anonymous)


def cookie_domain_for(request: HttpRequest) -> str | None:
    """The ``Domain`` of ``km_ai`` for this request (``None``: host-only)."""
    try:
        host = request.get_host()
    except Exception:  # DisallowedHost: Django answers 400 elsewhere; no Domain here.
        return None
    return cookie_domain(host, get_settings().COOKIE_DOMAIN)


def deliver(tracker: RequestTracker) -> None:
    """Send the request's commands to the backend as one delivery."""
    commands = tracker.close()
    if commands:
        tracker._send(commands)


def write_cookies(tracker: RequestTracker, response: HttpResponseBase) -> None:
    """Set ``km_ai`` exactly as the JavaScript library would write it."""
    if not tracker.new_anonymous_id or tracker.anonymous_id is None:
        return
    conf = get_settings()
    request = tracker.request
    domain = cookie_domain_for(request)
    response.set_cookie(
        conf.COOKIE_NAME,
        encode_cookie(tracker.anonymous_id),
        max_age=conf.COOKIE_MAX_AGE,
        path="/",
        domain=domain,
        secure=request.is_secure(),
        httponly=False,  # The JavaScript library must read it.
        samesite="Lax",
    )
    if tracker.logged_out:
        response.delete_cookie("km_ni", path="/", domain=domain, samesite="Lax")


def keep_browser_commands(tracker: RequestTracker) -> None:
    """Keep browser commands the page did not emit for the next page that does."""
    if not tracker.browser or tracker.browser_rendered:
        return
    session = getattr(tracker.request, "session", None)
    if session is None:
        logger.warning(
            "Kissmetrics: %d browser command(s) dropped: no page rendered "
            "{%% kissmetrics_js %%} and there is no session to keep them in",
            len(tracker.browser),
        )
        return
    session[SESSION_BROWSER] = [*session.get(SESSION_BROWSER, []), *tracker.browser]


def finish(tracker: RequestTracker, response: HttpResponseBase) -> None:
    """Everything the middleware does as the response leaves; never raises."""
    try:
        deliver(tracker)
        write_cookies(tracker, response)
        keep_browser_commands(tracker)
    except Exception:
        logger.exception("Kissmetrics: error while finishing a request")


class KissmetricsMiddleware:
    """Binds a tracker to each request (``request.km`` and ``km``) and delivers its commands.

    Put it after ``SessionMiddleware`` and ``AuthenticationMiddleware``. Works under
    WSGI and ASGI.
    """

    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        """Handle one request (returns a coroutine under ASGI)."""
        if self.async_mode:
            return self.__acall__(request)
        tracker = self._start(request)
        token = _current.set(tracker)
        try:
            response = self.get_response(request)
        finally:
            _current.reset(token)
        finish(tracker, response)  # type: ignore[arg-type]
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        """The ASGI path: the same, without blocking the event loop."""
        tracker = self._start(request)
        token = _current.set(tracker)
        try:
            response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        finally:
            _current.reset(token)
        backend = get_backend()
        if (
            tracker.has_deferred
            or (tracker.browser and not tracker.browser_rendered)
            or getattr(backend, "blocking", True)
        ):
            # Resolving a user, writing the session or a blocking delivery touch the
            # database or the network: not on the event loop.
            await sync_to_async(finish, thread_sensitive=True)(tracker, response)
        else:
            finish(tracker, response)
        return response

    @staticmethod
    def _start(request: HttpRequest) -> RequestTracker:
        try:
            tracker = start(request)
        except Exception:
            logger.exception("Kissmetrics: error while starting a request; not tracking it")
            tracker = RequestTracker(request, active=False, allow_explicit=False)
        request.km = tracker  # type: ignore[attr-defined]
        return tracker
