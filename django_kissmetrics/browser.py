"""Browser-side commands: ``km.js.record()``, ``km.js.set()`` and the library's triggers."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import commands as cmd

if TYPE_CHECKING:
    from .tracker import RequestTracker

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_SESSION_BYTES",
    "MAX_SESSION_COMMANDS",
    "SESSION_BROWSER",
    "TRIGGERS",
    "BrowserCommands",
    "bounded",
    "json_value",
    "trigger_command",
]

#: The session key holding browser commands that wait for a page rendering the tag.
SESSION_BROWSER = "_km_browser"
#: The most browser commands the session keeps for the next page; older ones are dropped.
MAX_SESSION_COMMANDS = 32
#: The most bytes (as JSON) they take there: a signed-cookie session must stay under
#: the browser's 4 KB cookie limit with everything else it holds.
MAX_SESSION_BYTES = 2048

#: The library's trigger commands: record an event when something happens to an element.
TRIGGERS = ("trackClick", "trackSubmit", "trackClickOnOutboundLink")

# The library finds a trigger's elements by id ("#buy", or "buy") or by class name
# (".buy"), never by CSS selector: "form#signup" or "button.buy" would match nothing,
# silently. Refused here instead, where the developer sees it.
_SELECTOR = re.compile(r"[#.]?[A-Za-z0-9_-]+")


class BrowserCommands:
    """Commands for the Kissmetrics JavaScript library, emitted by ``{% kissmetrics_js %}``.

    Use them for events that should carry the library's automatic page properties.
    Values keep their JSON types (numbers stay numbers). Queued in a request that
    ends without rendering the tag (a redirect), they wait in the session for the
    next page that does, and are emitted once.
    """

    def __init__(self, tracker: RequestTracker) -> None:
        self._tracker = tracker

    def record(
        self, event: str | Mapping[str, Any] | None, properties: Mapping[str, Any] | None = None
    ) -> None:
        """``_kmq.push(["record", event, properties])``; without a name, :meth:`set`."""
        nameless = cmd.nameless_properties(event, properties)
        if nameless is not None:
            self.set(nameless)
            return
        self._tracker.push_browser(
            ["record", cmd._event_name(event), _browser_properties(properties)]
        )

    def set(self, properties: Mapping[str, Any]) -> None:
        """``_kmq.push(["set", properties])``."""
        self._tracker.push_browser(["set", _browser_properties(properties)])

    def track_click(
        self, selector: str, event: str, properties: Mapping[str, Any] | None = None
    ) -> None:
        """``_kmq.push(["trackClick", selector, event, properties])``.

        The library records ``event`` when the element is pressed (on ``mousedown``).
        ``selector`` is an element id (``"#buy"``) or a class name (``".buy"``).
        """
        self._trigger("trackClick", selector, event, properties)

    def track_submit(
        self, selector: str, event: str, properties: Mapping[str, Any] | None = None
    ) -> None:
        """``_kmq.push(["trackSubmit", selector, event, properties])``.

        The library records ``event`` when the form is submitted; it adds the form's
        fields only when ``LIBRARY_SETTINGS`` turns ``KM_SKIP_FORM_FIELDS`` off.
        """
        self._trigger("trackSubmit", selector, event, properties)

    def track_click_on_outbound_link(
        self, selector: str, event: str, properties: Mapping[str, Any] | None = None
    ) -> None:
        """``_kmq.push(["trackClickOnOutboundLink", selector, event, properties])``.

        The library records ``event`` on the click and follows the link about 250 ms
        later, so that the hit leaves before the page does.
        """
        self._trigger("trackClickOnOutboundLink", selector, event, properties)

    def _trigger(
        self, kind: str, selector: str, event: str, properties: Mapping[str, Any] | None
    ) -> None:
        command = trigger_command(kind, selector, event, properties)
        tracker = self._tracker
        if tracker.active:
            tracker.push_browser(command)
            tracker.note_trigger(command)


def trigger_command(
    kind: str, selector: object, event: object, properties: Mapping[str, Any] | None
) -> list[Any]:
    """The ``_kmq.push`` command of a trigger, checked (a developer mistake raises)."""
    if kind not in TRIGGERS:
        raise ValueError(f"Kissmetrics trigger must be one of {', '.join(TRIGGERS)}")
    if not isinstance(selector, str) or not _SELECTOR.fullmatch(selector):
        raise ValueError(
            f'Kissmetrics {kind} selector must be an element id ("#buy") or a class name '
            f'(".buy"), not {selector!r}: the library does not read CSS selectors'
        )
    return [kind, selector, cmd._event_name(event), _browser_properties(properties)]


def _browser_properties(properties: Mapping[str, Any] | None) -> dict[str, Any]:
    if properties is None:
        return {}
    if not isinstance(properties, Mapping):
        raise TypeError(f"Kissmetrics properties must be a dict, not {type(properties).__name__}")
    return {
        cmd._truncate(cmd._clean_text(str(k)), cmd.MAX_NAME_LENGTH, "property name"): json_value(v)
        for k, v in properties.items()
        if v is not None
    }


def json_value(value: Any) -> Any:
    """``value`` as a JSON type, when queued: the session stores it and the page reads it.

    Text, whole numbers, finite floats and booleans are kept; a ``Decimal`` becomes a
    number, a datetime ISO text (UTC, as on the server side), lists and dicts are
    converted item by item, and anything else becomes its text.
    """
    if value is None or type(value) in (str, int, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)  # An IntEnum, say: its plain number.
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (float, decimal.Decimal)):
        try:
            number = float(value)
        except ValueError:  # A signalling NaN.
            number = math.nan
        # NaN and infinities have no JSON form: their text, as the server side sends.
        return number if math.isfinite(number) else str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return cmd._value(value)
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return str(value)


def bounded(queued: Sequence[list[Any]]) -> list[list[Any]]:
    """The newest of ``queued`` that fit :data:`MAX_SESSION_COMMANDS` and
    :data:`MAX_SESSION_BYTES`; what is dropped is logged at WARNING.

    A ``clearIdentity`` (a logout) is always kept, once: without it the library would
    go on as the person who logged out.
    """
    clear = [c for c in queued if c and c[0] == "clearIdentity"][:1]
    if clear:
        queued = [c for c in queued if not c or c[0] != "clearIdentity"]
    kept: list[list[Any]] = []
    size = 0
    for command in reversed(queued):
        if len(kept) >= MAX_SESSION_COMMANDS:
            break
        # default=str: a value queued by an older version, or pushed raw, still sizes.
        size += len(json.dumps(command, default=str, separators=(",", ":")))
        if size > MAX_SESSION_BYTES:
            break
        kept.append(command)
    kept.reverse()
    if len(kept) < len(queued):
        dropped = queued[: len(queued) - len(kept)]
        logger.warning(
            "Kissmetrics: %d browser command(s) dropped, the oldest waiting for a page "
            "(the session keeps at most %d, %d bytes): %s",
            len(dropped),
            MAX_SESSION_COMMANDS,
            MAX_SESSION_BYTES,
            ", ".join(sorted({str(c[0]) if c else "?" for c in dropped})),
        )
    return [*clear, *kept]
