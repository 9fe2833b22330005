"""Where commands go: ``celery`` (default), ``tasks``, ``sync``, ``locmem``, ``disabled``,
or your own.

A backend is a subclass of :class:`BaseBackend` with one method, :meth:`~BaseBackend.send`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from . import publisher
from .commands import Command
from .conf import ConfigurationError, get_settings

logger = logging.getLogger(__name__)

__all__ = [
    "BaseBackend",
    "CeleryBackend",
    "DisabledBackend",
    "LocmemBackend",
    "SyncBackend",
    "TasksBackend",
    "get_backend",
]


class BaseBackend:
    """The base of every backend. ``send`` is called once per request (or per batch).

    ``send`` must not raise for a delivery problem: log it and call
    :func:`django_kissmetrics.delivery.give_up` so that nothing is lost silently.
    """

    #: ``send`` may wait on the network; under ASGI it is then run off the event loop.
    blocking = True

    def send(self, commands: Sequence[Command]) -> None:
        """Take responsibility for delivering ``commands``."""
        raise NotImplementedError


class DisabledBackend(BaseBackend):
    """Drops every command (tracking is off)."""

    blocking = False

    def send(self, commands: Sequence[Command]) -> None:
        """Drop ``commands``."""


class LocmemBackend(BaseBackend):
    """Keeps commands in :data:`django_kissmetrics.testing.outbox`, for tests."""

    blocking = False

    def send(self, commands: Sequence[Command]) -> None:
        """Append ``commands`` to the outbox."""
        _outbox().extend(commands)


@functools.cache
def _outbox() -> list[Command]:
    # Imported on first use: testing.py brings in the stand-in server's modules.
    from .testing import outbox

    return outbox


class SyncBackend(BaseBackend):
    """Delivers in the calling thread, without Celery: simple, but the caller waits."""

    def send(self, commands: Sequence[Command]) -> None:
        """Deliver ``commands`` now; log and signal the ones that fail."""
        from .delivery import deliver_now

        deliver_now(commands, "sync delivery failed")


class CeleryBackend(BaseBackend):
    """Queues one Celery task per batch, published off the request thread.

    With ``PUBLISH = "inline"`` the message is published in the calling thread instead.
    """

    def __init__(self) -> None:
        # Made anew when KISSMETRICS changes (get_backend's cache is cleared then).
        self.inline = get_settings().PUBLISH == "inline"
        #: Only inline publishing waits on the broker.
        self.blocking = self.inline

    def send(self, commands: Sequence[Command]) -> None:
        """Hand ``commands`` to the publisher."""
        if self.inline:
            publisher.publish_inline(commands)
        else:
            publisher.get_publisher().submit(commands)


class TasksBackend(CeleryBackend):
    """Queues one Django Tasks task per batch (:mod:`django_kissmetrics.tasks_backend`).

    Published off the request thread by the same publisher as Celery's batches.
    """


_ALIASES = {
    "celery": CeleryBackend,
    "tasks": TasksBackend,
    "sync": SyncBackend,
    "locmem": LocmemBackend,
    "disabled": DisabledBackend,
}


@functools.cache
def get_backend() -> BaseBackend:
    """The configured backend (``DisabledBackend`` when there is no API key nor ``SITES``)."""
    conf = get_settings()
    if not (conf.API_KEY or conf.SITES):
        return DisabledBackend()
    cls = _ALIASES.get(conf.BACKEND)
    if cls is None:
        try:
            cls = import_string(conf.BACKEND)
        except ImportError as exc:
            raise ConfigurationError(
                f"settings.KISSMETRICS['BACKEND'] {conf.BACKEND!r} cannot be imported: {exc}"
            ) from exc
        if not (isinstance(cls, type) and issubclass(cls, BaseBackend)):
            raise ConfigurationError(
                f"settings.KISSMETRICS['BACKEND'] {conf.BACKEND!r} is not a BaseBackend subclass"
            )
    return cls()


@receiver(setting_changed, dispatch_uid="django_kissmetrics.backends")
def _reset(*, setting: str, **kwargs: Any) -> None:
    # The backend is made from the settings: a changed KISSMETRICS makes a new one.
    if setting == "KISSMETRICS":
        get_backend.cache_clear()
