"""Functions the tests name in ``SITES``, ``TRACK``, ``BEFORE_SEND`` and ``GLOBAL_PROPERTIES``."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from django_kissmetrics.commands import Command
from django_kissmetrics.track import every, not_staff, outside

#: How many times each hook ran, by name.
calls: dict[str, int] = {}


def _count(name: str) -> None:
    calls[name] = calls.get(name, 0) + 1


def rename(command: Command) -> Command:
    """``Bought`` becomes ``Purchased``; a property is added to every command."""
    _count("rename")
    if command.name == "Bought":
        command = command._replace(name="Purchased")
    if command.kind == "alias":
        return command
    return command._replace(properties={**command.properties, "shaped": True})


def drop_health(command: Command) -> Command | None:
    """``Checked Health`` is dropped; the rest goes unchanged."""
    _count("drop_health")
    return None if command.name == "Checked Health" else command


def boom(command: Command) -> Command:
    """A hook with a bug."""
    _count("boom")
    raise RuntimeError("the hook broke")


def not_a_command(command: Command) -> Any:
    """A hook that returns the wrong thing."""
    return {"kind": "record"}


def region(request: HttpRequest | None) -> dict[str, Any]:
    """``GLOBAL_PROPERTIES``: where the event came from."""
    _count("region")
    if request is None:
        return {"region": "eu", "where": "outside"}
    return {"region": "eu", "where": request.path, "plan": "global"}


def tenant_key(request: HttpRequest) -> str | None:
    """``SITES`` as a function: the key named by the ``tenant`` cookie, if known."""
    return {"acme": "acme-key", "globex": "globex-key"}.get(request.COOKIES.get("tenant", ""))


def broken(request: HttpRequest) -> bool:
    """A ``TRACK`` or ``SITES`` function with a bug."""
    raise RuntimeError("broken")


#: ``TRACK``: staff and the office (192.0.2.0/24) kept out.
office = every(not_staff, outside(["192.0.2.0/24"]))


def drop_all(command: Command) -> None:
    """Every command is dropped."""
    return None
