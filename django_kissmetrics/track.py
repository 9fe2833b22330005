"""Keeping traffic out: ``TRACK`` and ready-made functions to name in it or wrap.

``TRACK`` names a function ``request -> bool``; when it answers false, the request's
visitor is not tracked, exactly as on an excluded path: no cookie, no loader, nothing
sent about them (calls that name someone with ``identity=`` still go).

Ready-made: :func:`not_staff` (staff and superusers out), :func:`not_internal` (the
addresses and ranges of ``INTERNAL_IPS`` out), :func:`not_staff_or_internal` (both), and
:func:`outside` and :func:`every` to build your own. None of them loads the session of a
visitor who has none, so an anonymous visitor still costs no query.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpRequest
from django.utils.module_loading import import_string

from .conf import get_settings
from .person import _lazy_session_user, stored_session

logger = logging.getLogger(__name__)

__all__ = [
    "every",
    "is_tracked",
    "not_internal",
    "not_staff",
    "not_staff_or_internal",
    "outside",
    "visitor_address",
]

Check = Callable[[HttpRequest], bool]
_Network = IPv4Network | IPv6Network
_Address = IPv4Address | IPv6Address

#: Dotted paths whose failure was logged: once per process, not once per request.
_logged: set[str] = set()
#: (address as sent, id() of the ranges) -> whether it is in them. A visitor's address
#: repeats request after request: ipaddress parses and compares it once.
_inside: dict[tuple[str, int], bool] = {}


@receiver(setting_changed, dispatch_uid="django_kissmetrics.track")
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "KISSMETRICS":
        _logged.clear()
        _inside.clear()


@functools.cache
def _check(path: str) -> Check:
    check: Check = import_string(path)
    return check


def is_tracked(request: HttpRequest, path: str) -> bool:
    """Whether ``TRACK`` (the function at ``path``) tracks this request's visitor; never raises.

    A function that cannot be imported or raises is logged at ERROR once per process and
    counts as "not tracked": the traffic it exists to keep out must not slip in.
    """
    try:
        return bool(_check(path)(request))
    except Exception:
        if path not in _logged:
            _logged.add(path)
            logger.exception("Kissmetrics: TRACK %r failed; its visitors are not tracked", path)
        return False


def not_staff(request: HttpRequest) -> bool:
    """False for a logged-in staff member or superuser.

    A visitor without a stored session is anonymous: their user is not loaded (no
    session read, no query).
    """
    user = getattr(request, "user", None)
    if user is None or (_lazy_session_user(user) and stored_session(request) is None):
        return True
    return not (getattr(user, "is_staff", False) or getattr(user, "is_superuser", False))


def visitor_address(request: HttpRequest) -> _Address | None:
    """The visitor's address: ``REMOTE_ADDR``, or ``TRUSTED_IP_HEADER`` when the site names one.

    The header's last entry is the one the site's own proxy wrote (earlier ones come
    from the visitor, who can write anything there). ``None`` when it is no address.
    """
    return _visitor_address(request, get_settings().TRUSTED_IP_HEADER)


def _visitor_address(request: HttpRequest, header: str | None) -> _Address | None:
    return _address(_address_text(request, header).strip())


def _address_text(request: HttpRequest, header: str | None) -> str:
    meta = request.META
    value = meta.get(header) if header else None
    return str(value.rsplit(",", 1)[-1] if value else meta.get("REMOTE_ADDR", ""))


def _in_ranges(request: HttpRequest, header: str | None, networks: tuple[_Network, ...]) -> bool:
    key = (_address_text(request, header), id(networks))
    try:
        return _inside[key]
    except KeyError:
        pass
    answer = _within(_address(key[0].strip()), networks)
    if len(_inside) >= 4096:
        _inside.clear()  # Bounded, whatever addresses and headers visitors send.
    _inside[key] = answer
    return answer


@functools.lru_cache(maxsize=1024)
def _address(text: str) -> _Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _within(address: _Address | None, networks: Iterable[_Network]) -> bool:
    if address is None:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1.
    return any(address in network for network in networks)


def not_internal(request: HttpRequest) -> bool:
    """False for a visitor whose address is in ``KISSMETRICS["INTERNAL_IPS"]``."""
    conf = get_settings()
    networks = conf.INTERNAL_IPS
    return not (networks and _in_ranges(request, conf.TRUSTED_IP_HEADER, networks))


def outside(ranges: Iterable[str]) -> Check:
    """A ``TRACK`` function: false for visitors from ``ranges`` (addresses or ``10.0.0.0/8``).

    The address is read as :func:`visitor_address` reads it. Wrap it in a module of
    your own: ``office = outside(["192.0.2.0/24"])``, then ``TRACK = "proj.kmtrack.office"``.
    """
    networks = tuple(ipaddress.ip_network(r, strict=False) for r in ranges)

    def check(request: HttpRequest) -> bool:
        return not _in_ranges(request, get_settings().TRUSTED_IP_HEADER, networks)

    return check


def every(*checks: Check) -> Check:
    """A ``TRACK`` function that tracks a visitor only when every one of ``checks`` does."""

    def check(request: HttpRequest) -> bool:
        # A loop, not all() over a generator: this runs on every request.
        for one in checks:  # noqa: SIM110
            if not one(request):
                return False
        return True

    return check


#: Staff, superusers and ``INTERNAL_IPS`` kept out (the address first: it costs nothing).
not_staff_or_internal = every(not_internal, not_staff)
not_staff_or_internal.__doc__ = "False for staff, superusers and visitors from ``INTERNAL_IPS``."
