"""Browser-side commands: ``km.js.record()`` and ``km.js.set()``, for the JavaScript library."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import commands as cmd

if TYPE_CHECKING:
    from .tracker import RequestTracker

__all__ = ["SESSION_BROWSER", "BrowserCommands"]

#: The session key holding browser commands that wait for a page rendering the tag.
SESSION_BROWSER = "_km_browser"


class BrowserCommands:
    """Commands for the Kissmetrics JavaScript library, emitted by ``{% kissmetrics_js %}``.

    Use them for events that should carry the library's automatic page properties.
    Values keep their JSON types (numbers stay numbers). Queued in a request that
    ends without rendering the tag (a redirect), they wait in the session for the
    next page that does, and are emitted once.
    """

    def __init__(self, tracker: RequestTracker) -> None:
        self._tracker = tracker

    def record(self, event: str, properties: Mapping[str, Any] | None = None) -> None:
        """``_kmq.push(["record", event, properties])``."""
        self._tracker.push_browser(
            ["record", cmd._event_name(event), _browser_properties(properties)]
        )

    def set(self, properties: Mapping[str, Any]) -> None:
        """``_kmq.push(["set", properties])``."""
        self._tracker.push_browser(["set", _browser_properties(properties)])


def _browser_properties(properties: Mapping[str, Any] | None) -> dict[str, Any]:
    if properties is None:
        return {}
    if not isinstance(properties, Mapping):
        raise TypeError(f"Kissmetrics properties must be a dict, not {type(properties).__name__}")
    return {
        cmd._truncate(cmd._clean_text(str(k)), cmd.MAX_NAME_LENGTH, "property name"): v
        for k, v in properties.items()
        if v is not None
    }
