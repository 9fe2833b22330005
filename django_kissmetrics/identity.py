"""Identities: anonymous ids the way the Kissmetrics JavaScript library makes them, and users."""

from __future__ import annotations

import base64
import functools
import ipaddress
import re
import secrets
from typing import Any
from urllib.parse import quote, unquote

__all__ = [
    "cookie_domain",
    "decode_cookie",
    "encode_cookie",
    "is_anonymous_id",
    "new_anonymous_id",
    "user_identity",
]

_ANONYMOUS_ID = re.compile(r"[A-Za-z0-9+/=]{1,255}")


def user_identity(user: Any) -> str:
    """The default ``IDENTITY``: the user's primary key as text."""
    return str(user.pk)


def new_anonymous_id() -> str:
    """A fresh anonymous id: standard Base64 of 20 random bytes (28 characters)."""
    return base64.b64encode(secrets.token_bytes(20)).decode("ascii")


def is_anonymous_id(value: str) -> bool:
    """Whether ``value`` is a plausible anonymous id (Base64 alphabet, 1 to 255 characters)."""
    return _ANONYMOUS_ID.fullmatch(value) is not None


def encode_cookie(value: str) -> str:
    """``value`` percent-encoded exactly as JavaScript's ``encodeURIComponent`` does."""
    return quote(value, safe="!~*'()")


def decode_cookie(raw: str | None) -> str | None:
    """The anonymous id in a raw ``km_ai`` value, or ``None`` when it is not a plausible one.

    ``unquote``, not ``unquote_plus``: ``+`` is part of a Base64 id.
    """
    if not raw or len(raw) > 1024:
        return None
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
