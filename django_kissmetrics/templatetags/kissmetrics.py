"""``{% kissmetrics_js %}``: the Kissmetrics loader and this page's ``_kmq.push`` commands.

``{% kissmetrics_track_click %}``, ``{% kissmetrics_track_submit %}`` and
``{% kissmetrics_track_outbound_link %}`` declare the library's triggers where the element is.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from django import template
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from ..browser import SESSION_BROWSER, trigger_command
from ..conf import Settings, get_settings
from ..cookies import cookie_domain_for
from ..person import stored_session
from ..tracker import RequestTracker

try:
    from django.middleware.csp import get_nonce as _django_nonce
except ImportError:  # Django < 6.0 has no CSP of its own.
    _django_nonce = None  # type: ignore[assignment,unused-ignore]

logger = logging.getLogger(__name__)
register = template.Library()

# Escaped so that no string can close the script element or start a comment in it.
# ensure_ascii also escapes U+2028 and U+2029, which end a line in older JavaScript.
_ESCAPES = {ord("<"): "\\u003C", ord(">"): "\\u003E", ord("&"): "\\u0026"}

LOADER = (
    "function _kms(u){setTimeout(function(){var d=document,"
    "f=d.getElementsByTagName('script')[0],s=d.createElement('script');"
    "s.type='text/javascript';s.async=true;s.src=u;"
    "f.parentNode.insertBefore(s,f);},1);}"
)


def js_value(value: Any) -> str:
    """``value`` as a JavaScript literal that is safe inside ``<script>``."""
    text = json.dumps(value, cls=DjangoJSONEncoder, ensure_ascii=True, separators=(",", ":"))
    return text.translate(_ESCAPES)


def _script(url: str) -> str:
    """The loader's call for ``url`` (``SCRIPT_URLS``), with ``{key}`` read from ``_kmk``."""
    return "_kms(" + "+_kmk+".join(js_value(part) for part in url.split("{key}")) + ");"


@functools.lru_cache(maxsize=64)
def _head(
    api_key: str | None,
    domain: str | None,
    scripts: tuple[str, ...],
    switches: tuple[tuple[str, int], ...] = (),
) -> list[str]:
    # The same for every page of a host: made once, not with two json.dumps per page.
    lines = ["var _kmq = _kmq || [];", f"var _kmk = _kmk || {js_value(api_key)};"]
    if domain:
        lines.append(f"var KM_COOKIE_DOMAIN = {js_value(domain)};")
    # The library reads its switches when it loads: they come before the loader.
    lines += [f"var {name} = {int(value)};" for name, value in switches]
    lines += [LOADER, *map(_script, scripts)]
    return lines


def _page_head(conf: Settings, request: Any, api_key: str | None) -> list[str]:
    return _head(api_key, cookie_domain_for(request), conf.SCRIPT_URLS, conf.library_switches)


def page_commands(tracker: RequestTracker) -> list[list[Any]]:
    """The ``_kmq.push`` commands for this page, in order; each is emitted once."""
    session = stored_session(tracker.request)
    pending = session.pop(SESSION_BROWSER, []) if session is not None else []
    queued = [*pending, *tracker.browser]
    # Taken, not copied: a template that renders the tag twice sends no event twice.
    tracker.browser = []
    tracker.browser_rendered = True
    person = tracker.identity  # Worked out once: it may read the session and the user.
    identify = [["identify", person]] if person and person != tracker.anonymous_id else []
    if not queued:
        return identify  # Most pages.
    clear = [c for c in queued if c and c[0] == "clearIdentity"][:1]
    rest = [c for c in queued if c and c[0] != "clearIdentity"]
    return [*clear, *identify, *rest]


def csp_nonce(request: Any, conf: Settings) -> str | None:
    """This request's CSP nonce: ``CSP_NONCE_ATTRIBUTE`` (django-csp's), else Django's own.

    Django's (6.0+) is lazy: reading it as text is what makes its middleware put it in
    the header, so it is read only when the request has one.
    """
    nonce = getattr(request, conf.CSP_NONCE_ATTRIBUTE or "", None)
    if not nonce and _django_nonce is not None:
        nonce = _django_nonce(request)
        if nonce is not None:
            nonce = str(nonce)
    return str(nonce) if nonce else None


def _nonce_attribute(request: Any, conf: Settings) -> str:
    nonce = csp_nonce(request, conf)
    return f' nonce="{escape(nonce)}"' if nonce else ""


#: Defines ``kissmetricsStart()``: runs the inert loader just before it, once, as a live
#: script carrying the same nonce. Nothing runs if the loader already did (``_kms`` is
#: its function), whether a consent manager or an earlier call started it.
STARTER = (
    "(function(c){var e=c.previousElementSibling,n=c.nonce;"
    "window.kissmetricsStart=function(){if(window._kms)return;"
    "var s=document.createElement('script');if(n)s.nonce=n;s.text=e.text;"
    "c.parentNode.insertBefore(s,c.nextSibling);};})(document.currentScript);"
)


def _inert(request: Any, tracker: RequestTracker) -> SafeString:
    """The loader for a visitor who has not agreed: inert until a consent manager runs it.

    No command and no identity: nothing about this visitor is known or sent yet.
    """
    conf = get_settings()
    lines = _page_head(conf, tracker.request, tracker.api_key or conf.API_KEY)
    nonce = _nonce_attribute(request, conf)
    marks = "".join(f' {name}="{escape(value)}"' for name, value in conf.CONSENT_SCRIPT_ATTRIBUTES)
    return mark_safe(
        f"<script{marks}{nonce}>\n" + "\n".join(lines) + "\n</script>"
        f"<script{nonce}>{STARTER}</script>"
    )


@register.simple_tag(takes_context=True)
def kissmetrics_js(context: template.Context) -> SafeString | str:
    """The loader script; empty for a visitor who is not tracked or outside a request.

    A visitor who has not agreed (``CONSENT``) gets it inert, with ``kissmetricsStart()``.
    """
    request = context.get("request")
    tracker = getattr(request, "km", None)
    if not isinstance(tracker, RequestTracker) or not (tracker.active or tracker.awaiting_consent):
        return ""
    try:
        if not tracker.active:
            return _inert(request, tracker)
        conf = get_settings()
        # The request's site (SITES) names the key.
        lines = [*_page_head(conf, tracker.request, tracker.api_key or conf.API_KEY)]
        for command in page_commands(tracker):
            try:
                lines.append(f"_kmq.push({js_value(command)});")
            except (TypeError, ValueError):
                # One unserialisable value must not cost the page its loader and the rest.
                logger.exception("Kissmetrics: dropped a browser command that is not JSON")
        attr = _nonce_attribute(request, conf)
    except Exception:
        logger.exception("Kissmetrics: could not render {% kissmetrics_js %}")
        return ""
    return mark_safe(f"<script{attr}>\n" + "\n".join(lines) + "\n</script>")


def _trigger(
    context: template.Context,
    kind: str,
    selector: str,
    event: str,
    properties: dict[str, Any] | None,
    more: dict[str, Any],
) -> SafeString | str:
    """A trigger's ``_kmq.push`` as a script of its own, where the element is.

    Empty for a visitor who is not tracked, or has not agreed yet (as ``km.js``).
    A developer mistake (a CSS selector, no event name) raises, as ``km.js`` does.
    """
    command = trigger_command(kind, selector, event, {**(properties or {}), **more})
    request = context.get("request")
    tracker = getattr(request, "km", None)
    if not isinstance(tracker, RequestTracker) or not tracker.active:
        return ""
    tracker.note_trigger(command)
    try:
        push = f"var _kmq = _kmq || [];_kmq.push({js_value(command)});"
        attr = _nonce_attribute(request, get_settings())
    except (TypeError, ValueError):
        logger.exception("Kissmetrics: dropped a trigger that is not JSON")
        return ""
    return mark_safe(f"<script{attr}>{push}</script>")


def _trigger_tag(name: str, kind: str, example: str) -> None:
    """Register ``{% name selector event [properties=dict] [name=value ...] %}``."""

    def tag(
        context: template.Context,
        selector: str,
        event: str,
        properties: dict[str, Any] | None = None,
        **more: Any,
    ) -> SafeString | str:
        return _trigger(context, kind, selector, event, properties, more)

    tag.__name__ = tag.__qualname__ = name
    tag.__doc__ = f"``{example}``: ``_kmq.push([{kind!r}, ...])`` where the element is."
    register.simple_tag(takes_context=True, name=name)(tag)


_trigger_tag(
    "kissmetrics_track_click",
    "trackClick",
    '{% kissmetrics_track_click "#buy" "Clicked Buy" plan="pro" %}',
)
_trigger_tag(
    "kissmetrics_track_submit",
    "trackSubmit",
    '{% kissmetrics_track_submit "#signup" "Submitted Signup" %}',
)
_trigger_tag(
    "kissmetrics_track_outbound_link",
    "trackClickOnOutboundLink",
    '{% kissmetrics_track_outbound_link ".partner" "Left For Partner" %}',
)
