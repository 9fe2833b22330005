"""``KissmetricsMiddleware``: a tracker per request, the ``km_ai`` cookie, one delivery."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponseBase
from django.utils.cache import patch_vary_headers

from . import acquisition
from .backends import get_backend
from .browser import SESSION_BROWSER, bounded
from .conf import get_settings
from .consent import agreed
from .cookies import delete_cookies, set_anonymous_cookie
from .identity import decode_cookie, encode_base64_id
from .person import SESSION_IDENTITY, stored_session
from .sites import key_for_request
from .track import is_tracked
from .tracker import SESSION_ALIASED, RequestTracker, _current

logger = logging.getLogger(__name__)

__all__ = ["KissmetricsMiddleware"]


#: User agent -> whether IGNORE_USER_AGENTS matches it. A site sees a few hundred
#: distinct agents; the regular expression runs once for each.
_bots: dict[str, bool] = {}


def _is_bot(agent: str, pattern: re.Pattern[str]) -> bool:
    # Keyed on what is matched: a 64 KB agent is kept as its first 512 characters.
    key = agent[:512]
    try:
        return _bots[key]
    except KeyError:
        pass
    answer = pattern.search(key) is not None
    if len(_bots) >= 1024:
        _bots.clear()  # Bounded, whatever agents visitors send.
    _bots[key] = answer
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
    key = conf.API_KEY if conf.SITES is None else key_for_request(request, conf)
    if key is None:
        # A host of no site: nothing about anyone is sent from here.
        return RequestTracker(request, active=False, allow_explicit=False)
    bots = conf.IGNORE_USER_AGENTS
    if (
        request.path_info.startswith(conf.EXCLUDE_PATHS)
        or (bots is not None and _is_bot(meta.get("HTTP_USER_AGENT", ""), bots))
        or (conf.TRACK is not None and not is_tracked(request, conf.TRACK))
    ):
        # Not this visitor, but code here may still track someone by name
        # (an admin action about a customer).
        return RequestTracker(request, active=False, allow_explicit=True, api_key=key)
    if conf.CONSENT is not None and not agreed(request, conf.CONSENT):
        return _not_agreed(request, conf.COOKIE_NAME, key)
    cookies = request.COOKIES
    raw = cookies.get(conf.COOKIE_NAME)
    anonymous = decode_cookie(raw)
    if anonymous is None or _LIBRARY_NAMED in cookies:
        tracker = _claimed(request, conf.CONSENT is not None, raw, anonymous, key)
    else:
        tracker = RequestTracker(request, anonymous_id=anonymous, api_key=key)
        if conf.CONSENT is not None:
            tracker.gated = True
    if conf.AUTO_EVENTS:
        acquisition.begin(tracker, conf)
    return tracker


#: The cookies of a visitor besides ``COOKIE_NAME``: the library's, all named ``km_*``.
_LIBRARY_COOKIE_PREFIX = "km_"
#: The library's cookie for the named identity it was given by ``identify``.
_LIBRARY_NAMED = "km_ni"


def _claimed(
    request: HttpRequest, gated: bool, raw: str | None, anonymous: str | None, key: str
) -> RequestTracker:
    # km_ai is missing, is no anonymous id, or may be a named one: once the library has
    # identified someone (km_ni) it writes their identity into km_ai too. Such a value
    # is never the visitor's anonymous id; it is kept only if it is the logged-in
    # person's own identity (write_cookies() decides, when the user is known).
    claimed = None
    if anonymous is not None:
        named = request.COOKIES.get(_LIBRARY_NAMED)
        if named and unquote(named) == anonymous:
            anonymous, claimed = None, anonymous
    elif raw and len(raw) <= 1024:
        claimed = unquote(raw)
    tracker = RequestTracker(request, anonymous_id=anonymous, api_key=key)
    if claimed:
        tracker.claimed_id = claimed
    tracker.gated = gated
    return tracker


def _not_agreed(request: HttpRequest, cookie_name: str, key: str) -> RequestTracker:
    # As on an excluded path: nothing about this visitor, but calls naming someone
    # (the site's own dealings with a customer) still go.
    tracker = RequestTracker(request, active=False, allow_explicit=True, api_key=key)
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


#: A cookie name a ``Set-Cookie`` header can carry (an RFC 6265 token).
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: The most cookies one response deletes: a visitor (or a sibling subdomain) can send
#: any number of ``km_*`` cookies.
MAX_DELETED_COOKIES = 32


def forget(tracker: RequestTracker, response: HttpResponseBase) -> None:
    """Consent withdrawn: drop what the session kept, then delete the Kissmetrics cookies.

    Only names a header can carry, at most :data:`MAX_DELETED_COOKIES`, ``COOKIE_NAME``
    and ``km_ni`` first; one that cannot be deleted does not stop the others.
    """
    request = tracker.request
    session = stored_session(request)
    if session is not None:
        # A fresh start: a later agreement is a new anonymous person, not the old one.
        for key in _SESSION_KEYS:
            session.pop(key, None)
    name = get_settings().COOKIE_NAME
    held = sorted(n for n in _held(request, name) if n not in (name, "km_ni"))
    names = [n for n in (name, "km_ni", *held) if _COOKIE_NAME.fullmatch(n)]
    for cookie in names[:MAX_DELETED_COOKIES]:
        try:
            delete_cookies(response, request, [cookie])
        except Exception:
            logger.warning("Kissmetrics: could not delete the cookie %r", cookie[:64])


def write_cookies(tracker: RequestTracker, response: HttpResponseBase) -> None:
    """Set ``km_ai`` exactly as the JavaScript library would write it."""
    if not tracker.new_anonymous_id or tracker.anonymous_id is None:
        return
    claimed = tracker.claimed_id
    if claimed is not None and not tracker.logged_out and claimed == tracker.identity:
        # The library wrote this logged-in person's identity into km_ai: replacing it
        # on every page would only start a tug of war with the library.
        return
    request = tracker.request
    # Only new_anonymous_id() sets it when new_anonymous_id is true: Base64.
    set_anonymous_cookie(response, request, encode_base64_id(tracker.anonymous_id))
    if tracker.logged_out or (claimed is not None and _LIBRARY_NAMED in request.COOKIES):
        # The library reads km_ni before km_ai: left in place, it would go on recording
        # this browser's events under the person named there.
        delete_cookies(response, request, [_LIBRARY_NAMED])


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
    session[SESSION_BROWSER] = bounded([*session.get(SESSION_BROWSER, []), *tracker.browser])


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
        conf = get_settings()
        # Each names a function of the site's, which may query the database.
        return not (conf.CONSENT is None and conf.TRACK is None and not isinstance(conf.SITES, str))
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
            # The site's CONSENT, TRACK or SITES function may query the database: not on
            # the event loop.
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
            or tracker.claimed_id is not None  # write_cookies() may load the user.
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
