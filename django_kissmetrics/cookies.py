"""Writing ``km_ai``: its ``Domain`` for a request, and its ``Set-Cookie`` made cheaply.

A first visit is the one request that writes the cookie. Django builds a cookie
attribute by attribute and formats it again for the response; here the attributes are
built once by Django's own ``set_cookie()`` and the header text once per second, and
each new visitor's cookie only fills in its value.
"""

from __future__ import annotations

import time
from http.cookies import Morsel
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponseBase
from django.http.request import split_domain_port, validate_host
from django.utils.cache import patch_cache_control, patch_vary_headers
from django.utils.http import http_date

from .conf import get_settings
from .identity import cookie_domain, per_host

__all__ = [
    "AnonymousCookie",
    "anonymous_cookie",
    "cookie_domain_for",
    "delete_cookies",
    "set_anonymous_cookie",
]

#: (X-Forwarded-Host, Host) headers that passed ``request.get_host()`` -> cookie domain.
_domains: dict[tuple[str | None, str], str | None] = {}
#: The settings ``get_host()`` validates a host against.
_HOST_SETTINGS = frozenset(
    {"ALLOWED_HOSTS", "DEBUG", "USE_X_FORWARDED_HOST", "USE_X_FORWARDED_PORT", "KISSMETRICS"}
)


def cookie_domain_for(request: HttpRequest) -> str | None:
    """The ``Domain`` of ``km_ai`` for this request (``None``: host-only).

    ``COOKIE_DOMAIN`` when set; else the request's host, when it matches an
    ``ALLOWED_HOSTS`` entry other than ``"*"``; else ``None``.
    """
    configured = get_settings().COOKIE_DOMAIN
    if configured:
        return configured
    return per_host(
        request, _domains, lambda host: cookie_domain(host, None) if _named_host(host) else None
    )


def _named_host(host: str) -> bool:
    """``host`` matches an ``ALLOWED_HOSTS`` entry other than ``"*"``.

    A ``Domain`` follows the request's host only then: with ``"*"`` (or a honoured
    ``X-Forwarded-Host``) the host is whatever the request names, and a cookie for
    ``Domain=github.io`` would reach every site under it.
    """
    from django.conf import settings

    name, _ = split_domain_port(host)
    allowed = [h for h in settings.ALLOWED_HOSTS if h != "*"]
    return bool(name) and validate_host(name, allowed)


def delete_cookies(response: HttpResponseBase, request: HttpRequest, names: list[str]) -> None:
    """Delete the cookies ``names`` with the ``Domain`` and path ``km_ai`` is written with.

    A cookie is deleted only by one with the same name, domain and path: the library and
    the server both write them for :func:`cookie_domain_for` and ``/``. The response
    becomes ``Cache-Control: private`` with ``Vary: Cookie``, as with
    :func:`set_anonymous_cookie`.
    """
    domain = cookie_domain_for(request)
    for name in names:
        response.delete_cookie(name, path="/", domain=domain, samesite="Lax")
    _not_shared(response)


def _not_shared(response: HttpResponseBase) -> None:
    # A response that writes one visitor's cookie must never be stored by a shared cache
    # and handed to the next visitor (Django's own session and CSRF cookies get the same).
    # The view's max-age stays: the visitor's own browser may still keep the page.
    # Most responses have neither header: set, they are what Django's functions would
    # write, for a tenth of their cost on a first visit.
    headers = response.headers
    if "Cache-Control" in headers:
        patch_cache_control(response, private=True)
    else:
        headers["Cache-Control"] = "private"
    if "Vary" in headers:
        patch_vary_headers(response, ("Cookie",))
    else:
        headers["Vary"] = "Cookie"


@receiver(setting_changed, dispatch_uid="django_kissmetrics.cookies")
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting in _HOST_SETTINGS:
        _domains.clear()
        _prepared.clear()
        _by_host.clear()


class AnonymousCookie(Morsel[str]):
    """``km_ai`` for ``response.cookies``: a real ``Morsel`` with its text prepared.

    Every attribute is there for code that reads ``response.cookies``; ``OutputString``
    returns the prepared text while the cookie is as it was made, and formats it the
    usual way once anything was changed.
    """

    _text: str | None = None
    #: (name, value, attributes) the text was made from.
    _made: tuple[str, str, dict[str, Any]] | None = None

    def __init__(self, name: str, value: str, attributes: dict[str, Any], text: str) -> None:
        # Not Morsel.__init__, which sets every attribute to "" only for them to be
        # overwritten, nor Morsel.set(), which checks the name again: Django's
        # set_cookie() checked it when the attributes were prepared.
        dict.update(self, attributes)
        self._key = name
        self._value = self._coded_value = value
        self._made = (name, value, attributes)
        self._text = text

    def OutputString(self, attrs: Any = None) -> str:
        """The ``Set-Cookie`` value."""
        made = self._made
        if (
            made is not None
            and attrs is None
            and self._key is made[0]
            and self._coded_value is made[1]
            and dict.__eq__(self, made[2])
        ):
            return self._text  # type: ignore[return-value]
        return super().OutputString(attrs)


#: (name, max age, domain, secure) -> (expiry second, attributes, text with a "\0" value).
_prepared: dict[tuple[str, int, str | None, bool], tuple[int, dict[str, Any], str]] = {}
#: (X-Forwarded-Host, Host, secure) -> the _prepared entry for that request's cookie: what
#: set_anonymous_cookie() needs, in one lookup. Cleared with the settings it depends on.
_by_host: dict[tuple[str | None, str, bool], tuple[int, dict[str, Any], str]] = {}


def _prepare(name: str, max_age: int, domain: str | None, secure: bool, at: int) -> Any:
    response = HttpResponseBase()
    # Django's own set_cookie(), so the attributes are exactly what it writes.
    response.set_cookie(
        name,
        "",
        max_age=max_age,
        path="/",
        domain=domain,
        secure=secure,
        httponly=False,  # The JavaScript library must read it.
        samesite="Lax",
    )
    morsel = response.cookies[name]
    morsel["expires"] = http_date(at)
    morsel.set(name, "\0", "\0")  # A value no encoded id contains: replaced per visitor.
    return at, dict(morsel), morsel.OutputString()


def _prepared_for(
    name: str, max_age: int, domain: str | None, secure: bool, at: int
) -> tuple[int, dict[str, Any], str]:
    key = (name, max_age, domain, secure)
    prepared = _prepared.get(key)
    if prepared is None or prepared[0] != at:
        if len(_prepared) >= 64:
            _prepared.clear()
        prepared = _prepared[key] = _prepare(name, max_age, domain, secure, at)
    return prepared


def anonymous_cookie(
    name: str, value: str, *, max_age: int, domain: str | None, secure: bool
) -> AnonymousCookie:
    """The ``km_ai`` cookie holding ``value`` (already percent-encoded: no quoting)."""
    return _fill(
        name, value, _prepared_for(name, max_age, domain, secure, int(time.time()) + max_age)
    )


def _fill(name: str, value: str, prepared: tuple[int, dict[str, Any], str]) -> AnonymousCookie:
    # The one place a prepared cookie gets its visitor's value, for both functions here.
    _, attributes, text = prepared
    return AnonymousCookie(name, value, attributes, text.replace("\0", value, 1))


def set_anonymous_cookie(response: HttpResponseBase, request: HttpRequest, value: str) -> None:
    """Put ``km_ai`` holding ``value`` (percent-encoded) on ``response`` for ``request``.

    :func:`cookie_domain_for` and :func:`anonymous_cookie` in one step: a first visit's
    cookie costs one lookup per ``Host`` header and second. The response becomes
    ``Cache-Control: private`` (keeping its ``max-age``) with ``Vary: Cookie``: no shared
    cache may replay one visitor's id to another.
    """
    conf = get_settings()
    secure = request.is_secure()
    meta = request.META
    key = (meta.get("HTTP_X_FORWARDED_HOST"), meta.get("HTTP_HOST", ""), secure)
    at = int(time.time()) + conf.COOKIE_MAX_AGE
    name = conf.COOKIE_NAME
    ready = _by_host.get(key)
    if ready is None or ready[0] != at:
        domain = cookie_domain_for(request)
        ready = _prepared_for(name, conf.COOKIE_MAX_AGE, domain, secure, at)
        if key[1]:  # As in cookie_domain_for(): no Host header, no key.
            if len(_by_host) >= 256:
                _by_host.clear()
            _by_host[key] = ready
    response.cookies[name] = _fill(name, value, ready)
    _not_shared(response)
