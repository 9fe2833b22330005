"""Shaping every command at its call: ``GLOBAL_PROPERTIES``, then ``BEFORE_SEND``.

Both run once per command, where it is made (inside a request, so they see its
context, or outside one). ``GLOBAL_PROPERTIES`` goes under every event's own
properties; ``BEFORE_SEND`` then sees the whole command and returns it, changed or not,
or ``None`` to drop it. A hook that fails never breaks the page nor loses the command:
it is logged at ERROR once per process and the command goes on unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from . import commands as cmd
from .commands import Command
from .conf import Settings

if TYPE_CHECKING:
    from django.http import HttpRequest

logger = logging.getLogger(__name__)

__all__ = ["global_properties", "shape"]

#: Settings whose failure was logged: once per process, not once per command.
_logged: set[str] = set()
_NONE: dict[str, str] = {}


@receiver(setting_changed, dispatch_uid="django_kissmetrics.shaping")
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "KISSMETRICS":
        _logged.clear()
        _static.clear()


def _failed(what: str, detail: str) -> None:
    if what not in _logged:
        _logged.add(what)
        logger.exception("Kissmetrics: %s %s", what, detail)


@functools.cache
def _function(path: str) -> Callable[..., Any]:
    func: Callable[..., Any] = import_string(path)
    return func


#: id() of a dict setting -> (that dict, kept alive so the id stays its own; normalised).
_static: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}


def global_properties(conf: Settings, request: HttpRequest | None) -> Mapping[str, str]:
    """``GLOBAL_PROPERTIES`` for ``request`` (``None`` outside one), normalised; never raises."""
    setting = conf.GLOBAL_PROPERTIES
    if setting is None:
        return _NONE
    try:
        if isinstance(setting, dict):
            known = _static.get(id(setting))
            if known is None or known[0] is not setting:
                known = _static[id(setting)] = (setting, cmd._properties(setting, 0)[0])
            return known[1]
        return cmd._properties(_function(setting)(request), 0)[0]
    except Exception:
        _failed(f"GLOBAL_PROPERTIES {setting!r}", "failed; events go without them")
        return _NONE


def shape(
    command: Command,
    conf: Settings,
    request: HttpRequest | None = None,
    extra: Mapping[str, str] | None = None,
) -> Command | None:
    """``command`` with ``GLOBAL_PROPERTIES`` under its own, through ``BEFORE_SEND``.

    ``extra``: the global properties when the caller has them already (a request works
    them out once). ``None`` when ``BEFORE_SEND`` dropped the command. Never raises.
    """
    if command.kind == "record" and conf.GLOBAL_PROPERTIES is not None:
        shared = global_properties(conf, request) if extra is None else extra
        if shared:
            command = command._replace(properties={**shared, **command.properties})
    hook = conf.BEFORE_SEND
    if hook is None:
        return command
    try:
        shaped = _function(hook)(command)
        if shaped is None:
            dropped(command, hook)
            return None
        if not isinstance(shaped, Command):
            raise TypeError(f"returned {type(shaped).__name__}, not a Command or None")
        if shaped is not command:
            # The hook is the site's own code, but the wire must stay well formed.
            shaped = cmd.normalised(shaped)
    except Exception:
        _failed(f"BEFORE_SEND {hook!r}", "failed; the command is sent unchanged")
        return command
    return shaped


def dropped(command: Command, hook: str) -> None:
    """``BEFORE_SEND`` dropped ``command`` (the toolbar panel counts these)."""
    logger.debug("Kissmetrics: %s dropped %s", hook, command.to_dict())
