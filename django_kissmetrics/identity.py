"""Identities: anonymous ids the way the Kissmetrics JavaScript library makes them, and users."""

from __future__ import annotations

import binascii
import functools
import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, unquote

__all__ = [
    "cookie_domain",
    "decode_cookie",
    "encode_base64_id",
    "encode_cookie",
    "is_anonymous_id",
    "new_anonymous_id",
    "per_host",
    "user_identity",
]

# At least 20 characters (120 bits) and not all digits: a value a visitor could guess, or
# that could be someone's primary key or short username, is not an anonymous id.
_ANONYMOUS_ID = re.compile(r"(?![0-9]*\Z)[A-Za-z0-9+/=]{20,255}")


def user_identity(user: Any) -> str:
    """The default ``IDENTITY``: the user's primary key as text."""
    return str(user.pk)


def new_anonymous_id() -> str:
    """A fresh anonymous id: standard Base64 of 20 random bytes (28 characters)."""
    return binascii.b2a_base64(os.urandom(20), newline=False).decode("ascii")


def is_anonymous_id(value: str) -> bool:
    """Whether ``value`` can be an anonymous id: 20 to 255 characters of the Base64
    alphabet, not all digits.

    Shorter or all-digit values are what named identities look like (primary keys,
    usernames): trusting one would record the visitor as that person, and alias them at
    login. The ids this package and the JavaScript library make have 28 characters.
    """
    return _ANONYMOUS_ID.fullmatch(value) is not None


def encode_cookie(value: str) -> str:
    """``value`` percent-encoded exactly as JavaScript's ``encodeURIComponent`` does."""
    if is_anonymous_id(value):
        return encode_base64_id(value)  # Every cookie this package writes.
    return quote(value, safe="!~*'()")


def encode_base64_id(value: str) -> str:
    """:func:`encode_cookie` for a value known to be in the Base64 alphabet."""
    # encodeURIComponent changes only these three characters of the alphabet; three
    # replaces cost a tenth of quote().
    return value.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")


def decode_cookie(raw: str | None) -> str | None:
    """The anonymous id in a raw ``km_ai`` value, or ``None`` when it is not a plausible one.

    ``unquote``, not ``unquote_plus``: ``+`` is part of a Base64 id.
    """
    if not raw or len(raw) > 1024:
        return None
    # The escapes encode_cookie() writes, undone by hand: the same result as unquote()
    # whenever no other escape is left, at a fraction of its cost.
    value = raw.replace("%2B", "+").replace("%2F", "/").replace("%3D", "=")
    if "%" in value:
        value = unquote(raw)
    return value if is_anonymous_id(value) else None


@functools.lru_cache(maxsize=256)
def cookie_domain(host: str, configured: str | None) -> str | None:
    """The ``Domain`` attribute for ``km_ai``: the setting, else the host without its port.

    ``None`` (a host-only cookie) for ``localhost``, IP addresses and single-label hosts,
    where browsers refuse a ``Domain`` attribute.
    """
    if configured:
        return configured
    if host.startswith("["):
        return None  # An IPv6 literal.
    name = host.rsplit(":", 1)[0].rstrip(".").lower()
    if "." not in name or name.endswith(".localhost"):
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None


_V = TypeVar("_V")


def per_host(
    request: Any,
    cache: dict[tuple[str | None, str], _V | None],
    compute: Callable[[str], _V | None],
) -> _V | None:
    """``compute(request.get_host())``, remembered per Host header; ``None`` for a host
    Django refuses (it answers 400 elsewhere).

    A site answers to a handful of hosts, and validating one with ``get_host()`` each time
    costs more than everything else the middleware does for a returning visitor. At most
    256 are kept, whatever hosts ``ALLOWED_HOSTS`` lets in.
    """
    meta = request.META
    key = (meta.get("HTTP_X_FORWARDED_HOST"), meta.get("HTTP_HOST", ""))
    try:
        return cache[key]
    except KeyError:
        pass
    try:
        host = request.get_host()
    except Exception:
        return None
    value = compute(host)
    if key[1]:  # Without a Host header get_host() uses SERVER_NAME: not worth a key.
        if len(cache) >= 256:
            cache.clear()
        cache[key] = value
    return value
