"""Test helpers: a backend that counts deliveries; identity functions (e-mail, username, broken)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from django_kissmetrics.backends import BaseBackend
from django_kissmetrics.commands import Command


class CountingBackend(BaseBackend):
    """Keeps each delivery (one list per ``send``)."""

    calls: ClassVar[list[list[Command]]] = []

    def send(self, commands: Sequence[Command]) -> None:
        self.calls.append(list(commands))


def email_identity(user: Any) -> str:
    return str(user.email)


def username_identity(user: Any) -> str:
    return str(user.username)


def empty_identity(user: Any) -> str:
    """A broken IDENTITY: an empty identity is not one."""
    return ""
