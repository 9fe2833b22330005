"""The :class:`Command` value: one record, set or alias, normalised once, at the call.

This module imports nothing from Django so that it can be used (and tested) on its own.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_VALUE_BYTES",
    "Command",
    "CommandKind",
    "make_alias",
    "make_record",
    "make_set",
    "to_timestamp",
]

#: Identities, event names and property names longer than this are truncated.
MAX_NAME_LENGTH = 255
#: Property values longer than this many UTF-8 bytes are truncated.
MAX_VALUE_BYTES = 8192

CommandKind = Literal["record", "set", "alias"]
PATHS: dict[str, str] = {"record": "/e", "set": "/s", "alias": "/a"}
# Transport fields a caller must not smuggle in as properties: they would overwrite
# the key, the person, the event name or the time on the wire.
_RESERVED = frozenset({"_k", "_p", "_n", "_t", "_d"})
_SURROGATES = re.compile("[\ud800-\udfff]")
_NAME_SEPARATORS = re.compile("[,:]")


@dataclass(frozen=True)
class Command:
    """One call to the tracking API, ready to send and safe to send again.

    ``timestamp`` is the Unix time of the call: it travels as ``_t`` with ``_d=1``, so
    a command delivered late, or twice, is still the same record to Kissmetrics.
    ``name`` is the event name for ``record`` and the second identity for ``alias``.
    """

    kind: CommandKind
    person: str
    name: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    timestamp: int = 0

    @property
    def path(self) -> str:
        """The tracking API path: ``/e``, ``/s`` or ``/a``."""
        return PATHS[self.kind]

    def params(self, key: str) -> list[tuple[str, str]]:
        """The query parameters to send with API key ``key``."""
        out = [("_k", key), ("_p", self.person)]
        if self.name is not None:
            out.append(("_n", self.name))
        if self.kind != "alias":
            out += [("_t", str(self.timestamp)), ("_d", "1")]
            out += list(self.properties.items())
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form, for a Celery message or a log line."""
        return {
            "kind": self.kind,
            "person": self.person,
            "name": self.name,
            "properties": dict(self.properties),
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Command:
        """The inverse of :meth:`to_dict`."""
        return cls(
            kind=data["kind"],
            person=data["person"],
            name=data.get("name"),
            properties=dict(data.get("properties") or {}),
            timestamp=int(data["timestamp"]),
        )


def to_timestamp(value: dt.datetime | float | int | str | None) -> int:
    """Whole Unix seconds from a datetime, a number, numeric text or ``None`` (now)."""
    if value is None:
        return int(time.time())
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            # A naive datetime is taken as UTC: the only reading that does not depend
            # on the machine the code happens to run on.
            value = value.replace(tzinfo=dt.timezone.utc)
        return int(value.timestamp())
    if isinstance(value, bool):
        raise TypeError("timestamp must be a datetime or Unix seconds, not a bool")
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"timestamp must be a datetime or Unix seconds, not {value!r}") from None


def _clean_text(text: str) -> str:
    # A lone surrogate cannot be UTF-8 encoded, so it could never be sent.
    return _SURROGATES.sub("\ufffd", text)


def _truncate(text: str, limit: int, what: str) -> str:
    if len(text) > limit:
        logger.warning("Kissmetrics %s truncated from %d to %d characters", what, len(text), limit)
        return text[:limit]
    return text


def _identity(value: object, what: str = "identity") -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"Kissmetrics {what} must be text, not {type(value).__name__}")
    text = _clean_text(str(value)).strip()
    if not text:
        raise ValueError(f"Kissmetrics {what} must not be empty")
    # Strip again after the cut, so that normalising twice gives the same identity.
    return _truncate(text, MAX_NAME_LENGTH, what).rstrip()


def _event_name(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"Kissmetrics event name must be text, not {type(value).__name__}")
    return _identity(value, "event name")


def _value(value: object) -> str:
    if isinstance(value, bool):
        # As JavaScript writes them, so the browser and the server agree.
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, (int, float, decimal.Decimal)):
        text = str(value)
    elif isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
            text = value.isoformat() + "Z"
        else:
            text = value.isoformat()
    elif isinstance(value, (dt.date, dt.time)):
        text = value.isoformat()
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str, ensure_ascii=False)
    else:
        text = str(value)
    text = _clean_text(text)
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_VALUE_BYTES:
        logger.warning(
            "Kissmetrics property value truncated from %d to %d bytes",
            len(encoded),
            MAX_VALUE_BYTES,
        )
        text = encoded[:MAX_VALUE_BYTES].decode("utf-8", "ignore")
    return text


def _properties(
    properties: Mapping[str, Any] | None, timestamp: dt.datetime | float | int | None
) -> tuple[dict[str, str], int]:
    if properties is None:
        properties = {}
    if not isinstance(properties, Mapping):
        raise TypeError(f"Kissmetrics properties must be a dict, not {type(properties).__name__}")
    out: dict[str, str] = {}
    when: Any = timestamp
    for raw_name, value in properties.items():
        name = _clean_text(str(raw_name))
        if name == "_t":
            # The documented back-dating form: record("Signed Up", {"_d": 1, "_t": ...}).
            if timestamp is None and value is not None:
                when = value
            continue
        if name == "_d":
            continue  # Always sent as 1: every command carries the time of its call.
        if value is None:
            continue
        # Checked after normalising: " _p" or "_k:" would otherwise reach the wire as
        # a second transport field.
        name = _truncate(_NAME_SEPARATORS.sub(" ", name).strip(), MAX_NAME_LENGTH, "property name")
        name = name.rstrip()
        if name in _RESERVED:
            logger.warning("Kissmetrics property %r dropped: it is a transport field", raw_name)
            continue
        if not name:
            logger.warning("Kissmetrics property with an empty name dropped")
            continue
        out[name] = _value(value)
    return out, to_timestamp(when)


def make_record(
    person: object,
    event: object,
    properties: Mapping[str, Any] | None = None,
    timestamp: dt.datetime | float | int | None = None,
) -> Command:
    """A normalised ``record`` command (see the README for the rules)."""
    name = _event_name(event)
    props, ts = _properties(properties, timestamp)
    return Command("record", _identity(person), name, props, ts)


def make_set(
    person: object,
    properties: Mapping[str, Any],
    timestamp: dt.datetime | float | int | None = None,
) -> Command:
    """A normalised ``set`` command."""
    props, ts = _properties(properties, timestamp)
    return Command("set", _identity(person), None, props, ts)


def make_alias(person: object, identity: object) -> Command:
    """A normalised ``alias`` command joining two identities."""
    return Command("alias", _identity(person), _identity(identity), {}, to_timestamp(None))
