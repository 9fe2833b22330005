"""``KissmetricsMiddleware``: a tracker per request, the ``km_ai`` cookie, one delivery."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponseBase
from django.utils.cache import patch_vary_headers

from . import acquisition
from .backends import get_backend
from .browser import SESSION_BROWSER
from .conf import get_settings
from .consent import agreed
from .cookies import delete_cookies, set_anonymous_cookie
from .identity import decode_cookie, encode_base64_id
from .person import SESSION_IDENTITY, stored_session
from .tracker import SESSION_ALIASED, RequestTracker, _current

logger = logging.getLogger(__name__)

__all__ = ["KissmetricsMiddleware"]


#: User agent -> whether IGNORE_USER_AGENTS matches it. A site sees a few hundred
#: distinct agents; the regular expression runs once for each.
_bots: dict[str, bool] = {}


def _is_bot(agent: str, pattern: re.Pattern[str]) -> bool:
    try:
        return _bots[agent]
    except KeyError:
        pass
    answer = pattern.search(agent[:512]) is not None
    if len(_bots) >= 1024:
        _bots.clear()  # Bounded, whatever agents visitors send.
    _bots[agent] = answer
    return answer


@receiver(setting_changed, dispatch_uid="django_kissmetrics.middleware")
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "KISSMETRICS":
        _bots.clear()  # The pattern may have changed.


def start(request: HttpRequest) -> RequestTracker:
    """Make the request's tracker (``request.km``): is this visitor tracked, what is ``km_ai``.

    Never raises: a failure here must not cost the visitor the page.
    """
    try:
        tracker = _make_tracker(request)
    except Exception:
        logger.exception("Kissmetrics: error while starting a request; not tracking it")
        tracker = RequestTracker(request, active=False, allow_explicit=False)
    request.km = tracker  # type: ignore[attr-defined]
    return tracker


def _make_tracker(request: HttpRequest) -> RequestTracker:
    conf = get_settings()
    # META, not request.headers: building the headers mapping costs more than the checks.
    meta = request.META
    if not conf.enabled or (
        conf.HONOR_DNT and (meta.get("HTTP_DNT") == "1" or meta.get("HTTP_SEC_GPC") == "1")
    ):
        return RequestTracker(request, active=False, allow_explicit=False)
    bots = conf.IGNORE_USER_AGENTS
    if request.path_info.startswith(conf.EXCLUDE_PATHS) or (
        bots is not None and _is_bot(meta.get("HTTP_USER_AGENT", ""), bots)
    ):
        # Not this visitor, but code here may still track someone by name
        # (an admin action about a customer).
        return RequestTracker(request, active=False, allow_explicit=True)
    if conf.CONSENT is not None and not agreed(request, conf.CONSENT):
        return _not_agreed(request, conf.COOKIE_NAME)
    tracker = RequestTracker(
        request, anonymous_id=decode_cookie(request.COOKIES.get(conf.COOKIE_NAME))
    )
    if conf.CONSENT is not None:
        tracker.gated = True
    if conf.AUTO_EVENTS:
        acquisition.begin(tracker, conf)
    return tracker


#: The cookies of a visitor besides ``COOKIE_NAME``: the library's, all named ``km_*``.
_LIBRARY_COOKIE_PREFIX = "km_"


def _not_agreed(request: HttpRequest, cookie_name: str) -> RequestTracker:
    # As on an excluded path: nothing about this visitor, but calls naming someone
    # (the site's own dealings with a customer) still go.
    tracker = RequestTracker(request, active=False, allow_explicit=True)
    tracker.awaiting_consent = tracker.gated = True
    if _held(request, cookie_name):
        tracker.withdrawn = True
    return tracker


def _held(request: HttpRequest, cookie_name: str) -> list[str]:
    # Empty values are deleted cookies a client still sends (Django's test client does).
    return [
        name
        for name, value in request.COOKIES.items()
        if value and (name == cookie_name or name.startswith(_LIBRARY_COOKIE_PREFIX))
    ]


#: What the session keeps for Kissmetrics: dropped when consent is withdrawn.
_SESSION_KEYS = (SESSION_BROWSER, SESSION_IDENTITY, SESSION_ALIASED)


def forget(tracker: RequestTracker, response: HttpResponseBase) -> None:
    """Consent withdrawn: delete the visitor's Kissmetrics cookies and what the session kept."""
    request = tracker.request
    name = get_settings().COOKIE_NAME
    delete_cookies(response, request, sorted({name, "km_ni", *_held(request, name)}))
    session = stored_session(request)
    if session is not None:
        # A fresh start: a later agreement is a new anonymous person, not the old one.
        for key in _SESSION_KEYS:
            session.pop(key, None)


def write_cookies(tracker: RequestTracker, response: HttpResponseBase) -> None:
    """Set ``km_ai`` exactly as the JavaScript library would write it."""
    if not tracker.new_anonymous_id or tracker.anonymous_id is None:
        return
    request = tracker.request
    # Only new_anonymous_id() sets it when new_anonymous_id is true: Base64.
    set_anonymous_cookie(response, request, encode_base64_id(tracker.anonymous_id))
    if tracker.logged_out:
        delete_cookies(response, request, ["km_ni"])


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
        if tracker.acquired or tracker.visit_cookie is not None:
            acquisition.finish(tracker, response)
        commands = tracker.close()
        if commands:
            tracker._send(commands)
        if tracker.new_anonymous_id:
            write_cookies(tracker, response)
        if tracker.browser:
            keep_browser_commands(tracker)
        if tracker.gated:
            # The page (live or inert loader) depends on the consent cookie: a shared
            # cache must not hand one visitor's answer to another.
            patch_vary_headers(response, ("Cookie",))
            if tracker.withdrawn:
                forget(tracker, response)
    except Exception:
        logger.exception("Kissmetrics: error while finishing a request")


def _gated() -> bool:
    try:
        return get_settings().CONSENT is not None
    except Exception:
        return False  # start() logs what is wrong with the settings.


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
        tracker = start(request)
        token = _current.set(tracker)
        try:
            response = self.get_response(request)
        finally:
            _current.reset(token)
        finish(tracker, response)  # type: ignore[arg-type]
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        """The ASGI path: the same, without blocking the event loop."""
        if _gated():
            # The site's CONSENT function may query the database: not on the event loop.
            tracker = await sync_to_async(start, thread_sensitive=True)(request)
        else:
            tracker = start(request)
        token = _current.set(tracker)
        try:
            response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        finally:
            _current.reset(token)
        backend = get_backend()
        if (
            tracker.has_deferred
            or tracker.acquired  # Working out the person may read the session and the user.
            or (tracker.browser and not tracker.browser_rendered)
            or tracker.withdrawn  # Reads and writes the session.
            or getattr(backend, "blocking", True)
        ):
            # Resolving a user, writing the session or a blocking delivery touch the
            # database or the network: not on the event loop.
            await sync_to_async(finish, thread_sensitive=True)(tracker, response)
        else:
            finish(tracker, response)
        return response
