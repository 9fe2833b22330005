"""The :class:`Command` value: one record, set or alias, normalised once, at the call.

This module imports nothing from Django so that it can be used (and tested) on its own.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, NamedTuple
from urllib.parse import quote_plus

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_URL_BYTES",
    "MAX_VALUE_BYTES",
    "Command",
    "CommandKind",
    "loggable",
    "make_alias",
    "make_record",
    "make_set",
    "nameless_properties",
    "normalised",
    "to_timestamp",
]

#: Identities, event names and property names longer than this are truncated.
MAX_NAME_LENGTH = 255
#: Property values longer than this many UTF-8 bytes are truncated.
MAX_VALUE_BYTES = 8192
#: The longest URL a command may make: its longest values are cut to fit.
MAX_URL_BYTES = 8192
#: What :data:`MAX_URL_BYTES` keeps for the tracking URL, the API key, ``_t`` and ``_d``.
_URL_RESERVE = 320

CommandKind = Literal["record", "set", "alias"]
PATHS: dict[str, str] = {"record": "/e", "set": "/s", "alias": "/a"}
# Transport fields a caller must not smuggle in as properties: they would overwrite
# the key, the person, the event name or the time on the wire.
_RESERVED = frozenset({"_k", "_p", "_n", "_t", "_d"})
_SURROGATES = re.compile("[\ud800-\udfff]")
_NAME_SEPARATORS = re.compile("[,:]")
_NO_PROPERTIES: Mapping[str, str] = MappingProxyType({})
_new_tuple = tuple.__new__


class Command(NamedTuple):
    """One call to the tracking API, ready to send and safe to send again.

    ``timestamp`` is the Unix time of the call: it travels as ``_t`` with ``_d=1``, so
    a command delivered late, or twice, is still the same record to Kissmetrics.
    ``name`` is the event name for ``record`` and the second identity for ``alias``.
    ``api_key`` is the site it belongs to (``SITES``, an ``api_key=`` argument or
    ``API_KEY``, fixed when it is made); ``None``: whatever key delivers it.
    Immutable (a named tuple: one is made per tracked call, and a tuple is the cheapest
    immutable value to make).
    """

    kind: CommandKind
    person: str
    name: str | None = None
    properties: Mapping[str, str] = _NO_PROPERTIES
    timestamp: int = 0
    api_key: str | None = None

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
            "api_key": self.api_key,
        }

    def to_wire(self) -> list[Any]:
        """The compact JSON-safe form a Celery message carries: the fields in order.

        The key is the sixth item when there is one; a five-item form (a message queued
        before keys travelled) is read as a command without a key.
        """
        properties = self.properties
        wire = [
            self.kind,
            self.person,
            self.name,
            properties if type(properties) is dict else dict(properties),
            self.timestamp,
        ]
        if self.api_key is not None:
            wire.append(self.api_key)
        return wire

    @classmethod
    def from_wire(cls, data: Sequence[Any] | Mapping[str, Any]) -> Command:
        """The inverse of :meth:`to_wire` (the :meth:`to_dict` form is read too)."""
        if isinstance(data, Mapping):
            return cls.from_dict(data)
        kind, person, name, properties, timestamp, *key = data
        api_key = key[0] if key and isinstance(key[0], str) and key[0] else None
        return cls(kind, person, name, dict(properties or {}), int(timestamp), api_key)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Command:
        """The inverse of :meth:`to_dict`."""
        return cls(
            kind=data["kind"],
            person=data["person"],
            name=data.get("name"),
            properties=dict(data.get("properties") or {}),
            timestamp=int(data["timestamp"]),
            api_key=data.get("api_key") or None,
        )


def to_timestamp(value: dt.datetime | float | int | str | None) -> int:
    """Whole Unix seconds from a datetime, a number, numeric text or ``None`` (now)."""
    if type(value) is int:
        return value
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
    if text.isascii():
        return text  # Nearly every name and value: skip the regex.
    # A lone surrogate cannot be UTF-8 encoded, so it could never be sent.
    return _SURROGATES.sub("\ufffd", text)


def _truncate(text: str, limit: int, what: str) -> str:
    if len(text) > limit:
        logger.warning("Kissmetrics %s truncated from %d to %d characters", what, len(text), limit)
        return text[:limit]
    return text


def _identity(value: object, what: str = "identity") -> str:
    if type(value) is str and 0 < len(value) <= MAX_NAME_LENGTH and value.isascii():
        text: str = value
        if not (text[0].isspace() or text[-1].isspace()):
            return text  # Already normal (an anonymous id, a user's identity).
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"Kissmetrics {what} must be text, not {type(value).__name__}")
    text = _clean_text(str(value)).strip()
    if not text:
        raise ValueError(f"Kissmetrics {what} must not be empty")
    # Strip again after the cut, so that normalising twice gives the same identity.
    return _truncate(text, MAX_NAME_LENGTH, what).rstrip()


#: Event name -> its normal form, for names that normalise without a warning. A site
#: records a few dozen events, each many times: normalise each once.
_EVENT_NAMES: dict[str, str] = {}
#: Raw property name -> its normal form, for names that are sent (not a transport
#: field, not empty) and normalise without a warning.
_PROPERTY_NAMES: dict[str, str] = {}
#: Each cache stops growing here, whatever names hostile input makes up.
_CACHE_LIMIT = 4096


def _event_name(value: object) -> str:
    if type(value) is str:
        name = _EVENT_NAMES.get(value)
        if name is not None:
            return name
    elif not isinstance(value, str):
        raise TypeError(f"Kissmetrics event name must be text, not {type(value).__name__}")
    name = _identity(value, "event name")
    if type(value) is str and len(value) <= MAX_NAME_LENGTH and len(_EVENT_NAMES) < _CACHE_LIMIT:
        _EVENT_NAMES[value] = name
    return name


def _value(value: object) -> str:
    kind = type(value)
    if kind is str:
        text: str = value  # type: ignore[assignment]
        if len(text) <= MAX_VALUE_BYTES and text.isascii():
            return text  # The common case: nothing to clean, nothing to cut.
    elif kind is int or kind is float:
        return str(value)  # Short and ASCII (not bool: its type is bool).
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


def _property_name(raw_name: object, cleaned: str) -> str:
    """The normal form of a property name; remembered when it is one that is sent."""
    if "," in cleaned or ":" in cleaned or len(cleaned) > MAX_NAME_LENGTH:
        name = _NAME_SEPARATORS.sub(" ", cleaned).strip()
        return _truncate(name, MAX_NAME_LENGTH, "property name").rstrip()
    name = cleaned.strip()
    if (
        name
        and name not in _RESERVED
        and type(raw_name) is str
        and len(_PROPERTY_NAMES) < _CACHE_LIMIT
    ):
        _PROPERTY_NAMES[raw_name] = name
    return name


def _back_date(value: object) -> float | None:
    """A ``_t`` property's time: only a finite number; anything else is dropped.

    Properties are often visitor input (``request.GET.dict()``): text there must neither
    fail the request nor set the event's time.
    """
    if isinstance(value, (int, float, decimal.Decimal)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            number = math.nan
        if math.isfinite(number) and abs(number) < 2**40:
            return number
    logger.warning(
        "Kissmetrics property _t dropped: it is not a number of Unix seconds (%s)",
        type(value).__name__,
    )
    return None


def _properties(
    properties: Mapping[str, Any] | None, timestamp: dt.datetime | float | int | None
) -> tuple[dict[str, str], int]:
    if properties is None:
        return {}, int(time.time()) if timestamp is None else to_timestamp(timestamp)
    if type(properties) is not dict and not isinstance(properties, Mapping):
        raise TypeError(f"Kissmetrics properties must be a dict, not {type(properties).__name__}")
    out: dict[str, str] = {}
    when: Any = timestamp
    known = _PROPERTY_NAMES
    for raw_name, value in properties.items():
        name = known.get(raw_name)
        if name is not None:
            # A name seen before, and nearly always a short ASCII text value: no calls.
            if type(value) is str and len(value) <= MAX_VALUE_BYTES and value.isascii():
                out[name] = value
            elif value is not None:
                out[name] = _value(value)
            continue
        cleaned = _clean_text(raw_name if type(raw_name) is str else str(raw_name))
        if cleaned == "_t":
            # The documented back-dating form: record("Signed Up", {"_d": 1, "_t": ...}).
            if timestamp is None and value is not None:
                when = _back_date(value)
            continue
        if cleaned == "_d" or value is None:
            continue  # _d: always sent as 1, as every command carries its time.
        # Normalised before the check below: " _p" or "_k:" would otherwise reach the
        # wire as a second transport field.
        name = _property_name(raw_name, cleaned)
        if name in _RESERVED:
            logger.warning("Kissmetrics property %r dropped: it is a transport field", raw_name)
        elif not name:
            logger.warning("Kissmetrics property with an empty name dropped")
        else:
            out[name] = _value(value)
    return out, int(time.time()) if when is None else to_timestamp(when)


def _fit_url(person: str, name: str | None, props: dict[str, str]) -> dict[str, str]:
    """``props`` cut so that the command's URL stays within :data:`MAX_URL_BYTES`.

    The longest values are cut first, to a common length; properties that cannot fit
    even with empty values are dropped. Either is logged at WARNING.
    """
    size = sum(map(len, props)) + sum(map(len, props.values()))
    # Percent-encoding makes a character at most 12 bytes (4 UTF-8 bytes, 3 each):
    # nearly every command is far below the limit and costs only the sums above.
    budget = MAX_URL_BYTES - _URL_RESERVE - 12 * (len(person) + len(name or ""))
    if 12 * size + 2 * len(props) <= budget:
        return props
    budget = MAX_URL_BYTES - _URL_RESERVE - len(quote_plus(person)) - len(quote_plus(name or ""))
    names = {k: len(quote_plus(k)) + 2 for k in props}  # "&k=".
    values = {k: len(quote_plus(v)) for k, v in props.items()}
    if sum(names.values()) + sum(values.values()) <= budget:
        return props
    out = props
    used = sum(names.values())
    if used > budget // 2:
        # So many names that values would have no room: keep the first ones.
        out, used = {}, 0
        for k, v in props.items():
            if used + names[k] > budget // 2:
                break
            out[k], used = v, used + names[k]
        logger.warning(
            "Kissmetrics command cut to %d of %d properties: its URL would pass %d bytes",
            len(out),
            len(props),
            MAX_URL_BYTES,
        )
        values = {k: values[k] for k in out}
    room = budget - used
    if sum(values.values()) <= room:
        return out
    out = dict(out)
    # The common cap of the longest values: the largest c with sum(min(v, c)) <= room.
    lengths = sorted(values.values())
    cap, left = 0, room
    for n, length in enumerate(lengths):
        share = left // (len(lengths) - n)
        if length > share:
            cap = share
            break
        left -= length
    else:  # pragma: no cover  (everything fitted: returned above)
        return out
    for k, length in values.items():
        if length > cap:
            out[k] = _fit_encoded(props[k], cap)
    logger.warning(
        "Kissmetrics property values cut to %d encoded bytes: the command's URL would "
        "pass %d bytes",
        cap,
        MAX_URL_BYTES,
    )
    return out


def _fit_encoded(text: str, budget: int) -> str:
    """The longest start of ``text`` whose percent-encoded form takes ``budget`` bytes."""
    low, high = 0, min(len(text), budget)
    while low < high:
        middle = (low + high + 1) // 2
        if len(quote_plus(text[:middle])) <= budget:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def make_record(
    person: object,
    event: object,
    properties: Mapping[str, Any] | None = None,
    timestamp: dt.datetime | float | int | None = None,
    api_key: str | None = None,
) -> Command:
    """A normalised ``record`` command (see the README for the rules)."""
    return _record(_identity(person), event, properties, timestamp, api_key)


def _record(
    person: str,
    event: object,
    properties: Mapping[str, Any] | None,
    timestamp: dt.datetime | float | int | None,
    api_key: str | None = None,
) -> Command:
    # make_record() for a person already in normal form (a request's current person).
    name = _EVENT_NAMES.get(event) if type(event) is str else None
    if name is None:
        name = _event_name(event)
    props, ts = _properties(properties, timestamp)
    if props:
        props = _fit_url(person, name, props)
    # tuple.__new__, not Command(...): the named tuple's __new__ is one more Python call.
    return _new_tuple(Command, ("record", person, name, props, ts, api_key))


def nameless_properties(
    event: object, properties: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """The properties to set when ``record`` names no event; ``None`` when it names one.

    As in every Kissmetrics library, ``record`` without a name is ``set``: ``record(None,
    props)``, ``record("", props)`` and ``record(props)`` all set ``props``.
    """
    if event is None or (type(event) is str and not event):
        return {} if properties is None else properties
    if isinstance(event, Mapping):
        if properties is not None:
            raise TypeError(
                "Kissmetrics record(properties) takes the properties once: "
                "record(properties) or record(None, properties)"
            )
        return event
    return None


def make_set(
    person: object,
    properties: Mapping[str, Any],
    timestamp: dt.datetime | float | int | None = None,
    api_key: str | None = None,
) -> Command:
    """A normalised ``set`` command."""
    props, ts = _properties(properties, timestamp)
    identity = _identity(person)
    return Command("set", identity, None, _fit_url(identity, None, props), ts, api_key)


def make_alias(person: object, identity: object, api_key: str | None = None) -> Command:
    """A normalised ``alias`` command joining two identities."""
    return Command(
        "alias", _identity(person), _identity(identity), _NO_PROPERTIES, int(time.time()), api_key
    )


def normalised(command: Command) -> Command:
    """``command`` in normal form again (after a hook changed it); the time and key kept."""
    if command.kind not in PATHS:
        raise ValueError(f"Kissmetrics command kind must be one of {sorted(PATHS)}")
    if command.kind == "alias":
        name = _identity(command.name, "identity")
        return command._replace(person=_identity(command.person), name=name)
    props, _ = _properties(command.properties, 0)
    if command.kind == "set":
        return command._replace(person=_identity(command.person), properties=props)
    return command._replace(
        person=_identity(command.person), name=_event_name(command.name), properties=props
    )


def loggable(commands: Sequence[Command]) -> str:
    """``commands`` as JSON for a log line: in full, so that they can be sent again by
    hand, but with only the last four characters of each API key."""
    return json.dumps(
        [{**c.to_dict(), "api_key": c.api_key and "..." + c.api_key[-4:]} for c in commands],
        ensure_ascii=False,
    )
