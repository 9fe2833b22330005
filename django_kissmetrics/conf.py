"""The ``KISSMETRICS`` setting: each key declared once, validated, reset on ``setting_changed``.

Every key is one field of :class:`Settings`: its type (the annotation), its default and
its documentation. Validation, :data:`DEFAULTS` and the documentation's settings table
(generated from the fields, ``docs/_ext/kissmetrics_settings.py``) all follow from that
one declaration.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

from .exceptions import KissmetricsError

__all__ = ["DEFAULTS", "DOCS", "ConfigurationError", "Settings", "get_settings", "load"]

FIVE_YEARS = 5 * 365 * 24 * 60 * 60


class ConfigurationError(KissmetricsError, ImproperlyConfigured):
    """The ``KISSMETRICS`` setting is wrong; the message names the key and the fix."""


def _key(
    default: Any,
    doc: str,
    *,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    accepts: tuple[type, ...] | None = None,
    convert: Callable[[Any], Any] | None = None,
    shown: str | None = None,
) -> Any:
    """Declare one ``KISSMETRICS`` key: a dataclass field carrying its rules as metadata.

    ``doc`` (Markdown) is the key's row in the documentation's settings table, and
    ``shown`` the default there when its value would not read well (``5 years``).
    ``accepts`` (what a user may write) and ``convert`` (what the code reads) are only
    for keys whose stored form differs from the written one; for the rest the accepted
    types come from the field's annotation.
    """
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "accepts": accepts}
    return dataclasses.field(default=default, metadata={**meta, "convert": convert, "shown": shown})


def _pattern(value: str | None) -> re.Pattern[str] | None:
    return re.compile(value, re.IGNORECASE) if value else None


def _path(value: str | PurePath | None) -> str | None:
    return None if value is None else os.fspath(value)


_NONE = type(None)
#: A script URL the tag may load: absolute http(s), scheme-relative, or a path of this site.
_SCRIPT_URL = re.compile(r"(https?:)?//[^/\s]+/\S*|/(?!/)\S*", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated ``KISSMETRICS`` setting, with every default filled in."""

    API_KEY: str | None = _key(
        None,
        (
            "Your site's key. Without it nothing is tracked or sent, the tag renders nothing, "
            "and a system check warns."
        ),
    )
    TRACKING_URL: str = _key(
        "https://trk.kissmetrics.io",
        "Where commands are sent (`/e`, `/s`, `/a` are appended). Must be http(s).",
    )
    BACKEND: str = _key(
        "celery",
        (
            '`"celery"`, `"sync"` (deliver in the request, no Celery), `"locmem"` (tests), '
            '`"disabled"`, or a dotted path to a `BaseBackend` subclass.'
        ),
    )
    IDENTITY: str = _key(
        "django_kissmetrics.identity.user_identity",
        (
            "Dotted path of a function `user -> str`: a logged-in user's identity. The "
            "default is the primary key as text."
        ),
    )
    COOKIE_NAME: str = _key(
        "km_ai", "The anonymous-id cookie; it must stay the one the JavaScript library reads."
    )
    COOKIE_DOMAIN: str | None = _key(
        None,
        (
            '`Domain` of the cookie, for example `".example.com"` to share it across '
            "subdomains. `None`: the request's host (host-only for `localhost` and IP "
            "addresses)."
        ),
    )
    COOKIE_MAX_AGE: int = _key(
        FIVE_YEARS, "Lifetime of the cookie, in seconds.", minimum=0, shown="5 years"
    )
    SIGNUP_EVENT: str | None = _key(
        "Signed Up", "Recorded on signup; `None`: alias and identify only."
    )
    LOGIN_EVENT: str | None = _key(
        "Logged In", "Recorded on login; `None`: alias and identify only."
    )
    LOGIN_EVENT_ON_SIGNUP: bool = _key(
        False,
        ("Also record `LOGIN_EVENT` for the login that completes a signup (in the same request)."),
    )
    HONOR_DNT: bool = _key(
        True,
        (
            "Visitors sending `DNT: 1` or `Sec-GPC: 1` get no cookie and no tracking, server "
            "or browser side."
        ),
    )
    TIMEOUT: float = _key(5.0, "Seconds to wait for the tracking server on each call.", minimum=0)
    MAX_RETRIES: int = _key(
        8, "Retries of a failed command before it is given up (logged and signalled).", minimum=0
    )
    RETRY_BACKOFF: float = _key(
        2.0,
        "Seconds before the first retry; doubles each time, with jitter (0.5x to 1.5x).",
        minimum=0,
    )
    RETRY_BACKOFF_MAX: float = _key(
        600.0,
        (
            "The longest wait between retries. Keep it well under the broker's visibility "
            "timeout (see Deploying)."
        ),
        minimum=0,
    )
    CELERY_QUEUE: str | None = _key(
        None, "Queue for the delivery task; `None`: Celery's default queue."
    )
    DELIVERY_CONCURRENCY: int = _key(
        16,
        (
            "Calls in flight at once while a worker delivers one batch (at most 16: the size "
            "of the connection pool). Threads start only when calls are slow (over 1 ms on "
            "average); on a fast link one thread is quickest."
        ),
        minimum=1,
    )
    PUBLISH: str = _key(
        "background",
        (
            '`"background"`: a per-process thread publishes the Celery messages, off the '
            'request. `"inline"`: publish in the request thread, as the response leaves the '
            "middleware (about 1 ms)."
        ),
        choices=("background", "inline"),
    )
    PUBLISH_WINDOW: float = _key(
        0.2,
        (
            "Seconds the background publisher gathers commands of several requests into one "
            "message (at most 500 commands each). Publishing one message costs about a "
            "millisecond of CPU whatever it carries, so a busy process spends about 1 ms / "
            "`PUBLISH_WINDOW` of its time on it: 0.5% at 0.2 s."
        ),
        minimum=0,
    )
    PUBLISH_QUEUE_SIZE: int = _key(
        10_000,
        (
            "Requests' batches the publisher may hold; beyond it, batches are logged at ERROR "
            "instead of queued."
        ),
        minimum=1,
    )
    ON_ENQUEUE_FAILURE: str = _key(
        "spool",
        (
            'When the broker cannot be reached: `"spool"` the commands on local disk and '
            'replay them once it answers; `"sync"`: deliver them directly from the publisher '
            'thread and spool what fails; `"log"`: no spool, log the commands at ERROR and '
            "send `delivery_failed` (so too for what a worker gives up)."
        ),
        choices=("spool", "sync", "log"),
    )
    SPOOL_DIR: str | None = _key(
        None,
        (
            "Folder of the spool (a SQLite file shared by every process of the site). `None`: "
            "`django-kissmetrics-<project>-<uid>` under the temp folder, `<project>` being "
            "the name of `BASE_DIR` (or the package of `ROOT_URLCONF`). In a container, mount "
            "a volume here."
        ),
        accepts=(str, PurePath, _NONE),
        convert=_path,
    )
    SPOOL_MAX_BYTES: int = _key(
        64 * 2**20,
        ("The most the spool holds; a batch that does not fit is logged at ERROR and signalled."),
        minimum=1,
        shown="64 MiB",
    )
    SPOOL_MAX_AGE: float = _key(
        7 * 24 * 3600.0,
        (
            "Seconds after its call a spooled command is given up (logged at ERROR and "
            "signalled) instead of replayed."
        ),
        minimum=0,
        shown="7 days",
    )
    EXCLUDE_PATHS: tuple[str, ...] = _key(
        ("/admin/", "/static/", "/media/", "/favicon.ico", "/robots.txt", "/health"),
        (
            "Path prefixes where visitors get no cookie and are not tracked (calls with an "
            "explicit `identity=` still go through)."
        ),
        accepts=(list, tuple),
        convert=tuple,
    )
    IGNORE_USER_AGENTS: re.Pattern[str] | None = _key(
        r"bot\b|crawl|spider|slurp|bingpreview|facebookexternalhit|mediapartners",
        "User agents that are not tracked, like excluded paths; `None` to track everyone.",
        accepts=(str, _NONE),
        convert=_pattern,
        shown="a regular expression matching common bots",
    )
    SCRIPT_URLS: tuple[str, str] = _key(
        ("//i.kissmetrics.io/i.js", "//scripts.kissmetrics.io/{key}.2.js"),
        (
            "The two scripts of the JavaScript library the tag loads, in this order; `{key}` "
            "becomes the API key. Serve them from your own domain (a path such as "
            '`"/km/i.js"`, or `https://`) and ad blockers leave them alone.'
        ),
        accepts=(list, tuple),
        convert=tuple,
    )
    CSP_NONCE_ATTRIBUTE: str | None = _key(
        "csp_nonce",
        (
            "The request attribute holding a Content-Security-Policy nonce (django-csp's); "
            "the script element carries it."
        ),
    )
    CONSENT: str | None = _key(
        None,
        (
            "Dotted path of a function `request -> bool`, true once the visitor agreed to "
            "analytics. Until then: no cookie, nothing sent about them, an inert loader (see "
            "Consent). `None`: no gate."
        ),
    )
    CONSENT_COOKIE_GROUP: str = _key(
        "analytics",
        (
            "The django-cookie-consent cookie group that "
            "`django_kissmetrics.consent.django_cookie_consent` reads."
        ),
    )
    CONSENT_SCRIPT_ATTRIBUTES: tuple[tuple[str, str], ...] = _key(
        (("type", "text/plain"), ("data-category", "analytics")),
        (
            "Attributes of the inert loader, the mark your consent manager looks for. It must "
            "keep a `type` the browser does not run."
        ),
        accepts=(dict, tuple),
        convert=lambda value: tuple(dict(value).items()),
        shown='`{"type": "text/plain", "data-category": "analytics"}`',
    )

    @functools.cached_property
    def enabled(self) -> bool:
        """Tracking is on: there is an API key and the backend is not ``disabled``."""
        return bool(self.API_KEY) and self.BACKEND != "disabled"


def _accepted(hint: Any) -> tuple[type, ...]:
    """The types a user may write for a field annotated ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _accepted(arg))
    if hint is float:
        return (int, float)  # 5 is as good a timeout as 5.0.
    return (typing.get_origin(hint) or hint,)


_FIELDS = dataclasses.fields(Settings)
_HINTS = typing.get_type_hints(Settings)
#: key -> the types its value may have.
_TYPES: dict[str, tuple[type, ...]] = {
    f.name: f.metadata["accepts"] or _accepted(_HINTS[f.name]) for f in _FIELDS
}

#: Every key of the ``KISSMETRICS`` setting with its default (see the settings table).
DEFAULTS: dict[str, Any] = {f.name: f.default for f in _FIELDS}
#: Every key with its documentation (Markdown).
DOCS: dict[str, str] = {f.name: f.metadata["doc"] for f in _FIELDS}


def _error(key: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"settings.KISSMETRICS[{key!r}] {problem}")


def _check(field: dataclasses.Field[Any], value: Any) -> Any:
    key, meta, accepted = field.name, field.metadata, _TYPES[field.name]
    # bool is an int in Python, but True is never a sensible timeout or retry count.
    if (isinstance(value, bool) and bool not in accepted) or not isinstance(value, accepted):
        names = " or ".join("None" if t is _NONE else t.__name__ for t in accepted)
        raise _error(key, f"must be {names}, not {type(value).__name__} ({value!r})")
    if meta["choices"] and value not in meta["choices"]:
        raise _error(key, f"must be one of {', '.join(map(repr, meta['choices']))}")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise _error(key, f"must be at least {meta['minimum']}, not {value!r}")
    return value


#: An HTML attribute name: nothing that could end the attribute or the tag.
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z_:][-A-Za-z0-9_:.]*")
#: ``type`` values that make a browser run a script: the inert loader must have none of them.
_SCRIPT_TYPES = frozenset({"", "text/javascript", "application/javascript", "module"})


def _check_script_attributes(value: Any) -> None:
    key = "CONSENT_SCRIPT_ATTRIBUTES"
    try:
        attributes = dict(value)
    except (TypeError, ValueError):
        raise _error(key, "must be a dict of attribute names to values") from None
    for name, value in attributes.items():
        if not isinstance(name, str) or not _ATTRIBUTE_NAME.fullmatch(name):
            raise _error(key, f"holds {name!r}, which is not an HTML attribute name")
        if not isinstance(value, str):
            raise _error(key, f"[{name!r}] must be str, not {type(value).__name__}")
    if str(attributes.get("type", "")).strip().lower() in _SCRIPT_TYPES:
        raise _error(key, 'needs a "type" the browser does not run, such as "text/plain"')


def load(user: Any) -> Settings:
    """Validate a ``KISSMETRICS`` dict and merge it with :data:`DEFAULTS`."""
    if user is None:
        user = {}
    if not isinstance(user, dict):
        raise ConfigurationError(f"settings.KISSMETRICS must be a dict, not {type(user).__name__}")
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise _error(unknown[0], f"is not a known key; the keys are {', '.join(DEFAULTS)}")
    values = {f.name: _check(f, user.get(f.name, f.default)) for f in _FIELDS}
    url = urlsplit(values["TRACKING_URL"])
    if url.scheme not in ("http", "https") or not url.netloc:
        raise _error("TRACKING_URL", "must be an http:// or https:// URL")
    if not all(isinstance(p, str) for p in values["EXCLUDE_PATHS"]):
        raise _error("EXCLUDE_PATHS", "must be a list of path prefixes (str)")
    scripts = values["SCRIPT_URLS"]
    valid = all(isinstance(u, str) and _SCRIPT_URL.fullmatch(u) for u in scripts)
    if len(scripts) != 2 or not valid:
        raise _error(
            "SCRIPT_URLS",
            "must be two script URLs (https://, // or /), "
            "like ('//i.kissmetrics.io/i.js', '//scripts.kissmetrics.io/{key}.2.js')",
        )
    _check_script_attributes(values["CONSENT_SCRIPT_ATTRIBUTES"])
    for field in _FIELDS:
        convert = field.metadata["convert"]
        if convert is not None:
            try:
                values[field.name] = convert(values[field.name])
            except re.error as exc:
                raise _error(field.name, f"is not a regular expression: {exc}") from None
    values["TIMEOUT"] = float(values["TIMEOUT"])
    values["SPOOL_MAX_AGE"] = float(values["SPOOL_MAX_AGE"])
    values["TRACKING_URL"] = values["TRACKING_URL"].rstrip("/")
    return Settings(**values)


@functools.cache
def get_settings() -> Settings:
    """The current settings, validated once and cached until ``KISSMETRICS`` changes."""
    return load(getattr(django_settings, "KISSMETRICS", None))


@receiver(setting_changed, dispatch_uid="django_kissmetrics.conf")
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "KISSMETRICS":
        get_settings.cache_clear()
