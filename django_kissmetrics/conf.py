"""The ``KISSMETRICS`` setting: each key declared once, validated, reset on ``setting_changed``.

Every key is one field of :class:`Settings`: its type (the annotation), its default and
its documentation. Validation, :data:`DEFAULTS` and the documentation's settings table
(generated from the fields, ``docs/_ext/kissmetrics_settings.py``) all follow from that
one declaration.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

from .exceptions import KissmetricsError

__all__ = [
    "AUTO_EVENT_SWITCHES",
    "DEFAULTS",
    "DOCS",
    "LIBRARY_SWITCHES",
    "ConfigurationError",
    "Settings",
    "get_settings",
    "load",
]

FIVE_YEARS = 5 * 365 * 24 * 60 * 60

#: The ``KM_*`` switches the Kissmetrics JavaScript library reads (``LIBRARY_SETTINGS``).
LIBRARY_SWITCHES = (
    "KM_SKIP_VISITED_SITE",
    "KM_SKIP_PAGE_VIEW",
    "KM_SKIP_UTM",
    "KM_SKIP_SEARCH_ENGINE",
    "KM_SKIP_REFERRER",
    "KM_SKIP_URL",
    "KM_SKIP_FORM_FIELDS",
    "KM_SKIP_RETURNING",
)
#: Each ``AUTO_EVENTS`` item, and the switch that stops the library recording it as well.
AUTO_EVENT_SWITCHES = {
    "Visited Site": "KM_SKIP_VISITED_SITE",
    "Ad Campaign Hit": "KM_SKIP_UTM",
    "Search Engine Hit": "KM_SKIP_SEARCH_ENGINE",
    "Referrer": "KM_SKIP_REFERRER",
}


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


def _sites(value: dict[str, str | None] | str | None) -> dict[str, str | None] | str | None:
    if not isinstance(value, dict):
        return value
    out: dict[str, str | None] = {}
    for host, key in value.items():
        literal = isinstance(host, str) and host.startswith("[") and host.endswith("]")
        if not isinstance(host, str) or not host.strip(". ") or any(c in host for c in "/ "):
            raise ValueError(f"holds {host!r}, which is not a host or .domain")
        if ":" in host and not literal:  # A port, or an IPv6 address without its brackets.
            raise ValueError(f"holds {host!r}, which is not a host or .domain")
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError(f"[{host!r}] must be an API key (str) or None, not {key!r}")
        # Hosts compare without case and without the dot that ends a fully qualified name.
        out[host.lower().rstrip(".")] = key
    return out


def _networks(value: list[str] | tuple[str, ...]) -> tuple[IPv4Network | IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(str(v).strip(), strict=False) for v in value)
    except ValueError as exc:
        raise ValueError(f"holds an entry that is no address or range: {exc}") from None


_NONE = type(None)
#: A script URL the tag may load: absolute http(s), scheme-relative, or a path of this site.
_SCRIPT_URL = re.compile(r"(https?:)?//[^/\s]+/\S*|/(?!/)\S*", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated ``KISSMETRICS`` setting, with every default filled in."""

    API_KEY: str | None = _key(
        None,
        (
            "Your site's key. Without it nothing is tracked or sent, the tag renders "
            "nothing, and a system check warns."
        ),
    )
    TRACKING_URL: str = _key(
        "https://trk.kissmetrics.io",
        "Where commands are sent (`/e`, `/s`, `/a` are appended). Must be http(s).",
    )
    BACKEND: str = _key(
        "celery",
        (
            '`"celery"`, `"tasks"` (Django Tasks: see [Install with Django '
            'Tasks](install-tasks.md)), `"sync"` (deliver in the '
            'request, no Celery), `"locmem"` (tests), `"disabled"`, or a dotted path to a '
            "`BaseBackend` subclass."
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
            "subdomains. `None`: the request's host when it matches an `ALLOWED_HOSTS` "
            'entry other than `"*"`; else (and for `localhost` and IP addresses) '
            "host-only."
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
            "Visitors sending `DNT: 1` or `Sec-GPC: 1` get no cookie and no tracking, "
            "server or browser side."
        ),
    )
    TIMEOUT: float = _key(5.0, "Seconds to wait for the tracking server on each call.", minimum=0)
    MAX_RETRIES: int = _key(
        8, "Retries of a failed command before it is given up (logged and signalled).", minimum=0
    )
    RETRY_BACKOFF: float = _key(
        2.0,
        ("Seconds before the first retry; doubles each time, with jitter (0.5x to 1.5x)."),
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
    TASKS_BACKEND: str = _key(
        "default",
        ('With `"BACKEND": "tasks"`: the alias in `TASKS` that the delivery task is enqueued on.'),
    )
    TASKS_QUEUE: str | None = _key(
        None,
        (
            'With `"BACKEND": "tasks"`: the queue of the delivery task; `None`: the '
            "backend's default queue."
        ),
    )
    DELIVERY_CONCURRENCY: int = _key(
        256,
        (
            "The most calls a worker process has in flight to the tracker at once, and so "
            "the most connections it keeps open there (shared by every batch and thread "
            "of the process). A batch larger than that is sent by that many calls at a "
            "time, never more sockets or pending calls. One process then keeps a core "
            "busy against a tracker 50 ms away (about 5,000 events/s there); lower it to "
            "be gentler, raise it for a tracker farther away."
        ),
        minimum=1,
    )
    PUBLISH: str = _key(
        "background",
        (
            '`"background"`: a per-process thread publishes the Celery messages, off the '
            'request. `"inline"`: publish in the request thread, as the response leaves '
            "the middleware (about 1 ms)."
        ),
        choices=("background", "inline"),
    )
    PUBLISH_WINDOW: float = _key(
        0.2,
        (
            "Seconds the background publisher gathers commands of several requests into "
            "one message (at most 500 commands each). Publishing one message costs about "
            "a millisecond of CPU whatever it carries, so a busy process spends about 1 "
            "ms / `PUBLISH_WINDOW` of its time on it: 0.5% at 0.2 s."
        ),
        minimum=0,
    )
    PUBLISH_QUEUE_SIZE: int = _key(
        10_000,
        (
            "Requests' batches the publisher may hold; beyond it, batches are logged at "
            "ERROR instead of queued."
        ),
        minimum=1,
    )
    ON_ENQUEUE_FAILURE: str = _key(
        "spool",
        (
            'When the broker cannot be reached: `"spool"` the commands on local disk and '
            'replay them once it answers; `"sync"`: deliver them directly from the '
            'publisher thread and spool what fails; `"log"`: no spool, log the commands '
            "at ERROR and send `delivery_failed` (so too for what a worker gives up)."
        ),
        choices=("spool", "sync", "log"),
    )
    SPOOL_DIR: str | None = _key(
        None,
        (
            "Folder of the spool (a SQLite file shared by every process of the site). "
            "`None`: `django-kissmetrics-<project>-<uid>-<hash>` under the temp folder, "
            "`<hash>` being of the absolute `BASE_DIR` (or of the settings module when "
            "there is none): one spool per site and user, whatever the project folder is "
            "named. It must be this user's own, mode 0700 (see Troubleshooting). In a "
            "container, mount a volume here."
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
            "Path prefixes where visitors get no cookie and are not tracked (calls with "
            "an explicit `identity=` still go through)."
        ),
        accepts=(list, tuple),
        convert=tuple,
    )
    IGNORE_USER_AGENTS: re.Pattern[str] | None = _key(
        r"bot\b|crawl|spider|slurp|bingpreview|facebookexternalhit|mediapartners",
        ("User agents that are not tracked, like excluded paths; `None` to track everyone."),
        accepts=(str, _NONE),
        convert=_pattern,
        shown="a regular expression matching common bots",
    )
    SCRIPT_URLS: tuple[str, str] = _key(
        ("//i.kissmetrics.io/i.js", "//scripts.kissmetrics.io/{key}.2.js"),
        (
            "The two scripts of the JavaScript library the tag loads, in this order; "
            "`{key}` becomes the API key. Serve them from your own domain (a path such as "
            '`"/km/i.js"`, or `https://`) and ad blockers leave them alone.'
        ),
        accepts=(list, tuple),
        convert=tuple,
    )
    CSP_NONCE_ATTRIBUTE: str | None = _key(
        "csp_nonce",
        (
            "The request attribute holding a Content-Security-Policy nonce "
            "(django-csp's); the script element carries it."
        ),
    )
    CONSENT: str | None = _key(
        None,
        (
            "Dotted path of a function `request -> bool`, true once the visitor agreed to "
            "analytics. Until then: no cookie, nothing sent about them, an inert loader "
            "(see Consent). `None`: no gate."
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
            "Attributes of the inert loader, the mark your consent manager looks for. It "
            "must keep a `type` the browser does not run."
        ),
        accepts=(dict, tuple),
        convert=lambda value: tuple(dict(value).items()),
    )
    SITES: dict[str, str | None] | str | None = _key(
        None,
        (
            "Several Kissmetrics sites in one project: a dict of host "
            '(`"shop.example.com"`, or `".example.com"` for a domain and its subdomains) '
            "to API key (`None`: not tracked), or a dotted path of a function `request -> "
            "key \\| None`. Hosts in no entry use `API_KEY` (see Several sites)."
        ),
        accepts=(dict, str, _NONE),
        convert=_sites,
    )
    TRACK: str | None = _key(
        None,
        (
            "Dotted path of a function `request -> bool`; false: this visitor is not "
            "tracked, as on an excluded path. Ready-made: "
            "`django_kissmetrics.track.not_staff`, `.not_internal`, "
            "`.not_staff_or_internal` (see Keeping traffic out)."
        ),
    )
    INTERNAL_IPS: tuple[IPv4Network | IPv6Network, ...] = _key(
        (),
        (
            'Addresses and ranges (`"10.0.0.0/8"`, `"2001:db8::/32"`) that '
            "`django_kissmetrics.track.not_internal` keeps out."
        ),
        accepts=(list, tuple),
        convert=_networks,
    )
    TRUSTED_IP_HEADER: str | None = _key(
        None,
        (
            "The `request.META` key of a header that your own proxy sets to the visitor's "
            'address (`"HTTP_X_FORWARDED_FOR"`: its last entry is read). `None`: '
            "`REMOTE_ADDR`. Name it only behind a proxy that overwrites it."
        ),
    )
    BEFORE_SEND: str | None = _key(
        None,
        (
            "Dotted path of a function `Command -> Command \\| None`, run once on each "
            "command where it is made; `None` drops it (see Shaping every command)."
        ),
    )
    GLOBAL_PROPERTIES: dict[str, Any] | str | None = _key(
        None,
        (
            "Properties under every event's own: a dict, or a dotted path of a function "
            "`request \\| None -> dict` (`None` outside a request)."
        ),
        accepts=(dict, str, _NONE),
        convert=lambda value: dict(value) if isinstance(value, dict) else value,
    )

    AUTO_EVENTS: tuple[str, ...] = _key(
        (),
        (
            'Acquisition events the middleware records on the server, any of `"Visited '
            'Site"`, `"Ad Campaign Hit"`, `"Search Engine Hit"`, `"Referrer"`; the tag '
            "then tells the library to skip its own (see Acquisition events)."
        ),
        accepts=(list, tuple),
        convert=tuple,
    )
    LIBRARY_SETTINGS: tuple[tuple[str, int], ...] = _key(
        (),
        (
            "The JavaScript library's switches the tag sets before the loader, name -> "
            "`True`/`False`: `KM_SKIP_VISITED_SITE`, `KM_SKIP_PAGE_VIEW`, `KM_SKIP_UTM`, "
            "`KM_SKIP_SEARCH_ENGINE`, `KM_SKIP_REFERRER`, `KM_SKIP_URL`, "
            "`KM_SKIP_FORM_FIELDS`, `KM_SKIP_RETURNING`. Another name raises. "
            "`KM_SKIP_FORM_FIELDS` is on unless set to `False` here (see Triggers)."
        ),
        accepts=(dict, tuple),
        convert=lambda value: tuple((k, int(v)) for k, v in dict(value).items()),
    )

    @functools.cached_property
    def library_switches(self) -> tuple[tuple[str, int], ...]:
        """The ``KM_*`` switches the tag sets before the loader, in order.

        ``KM_SKIP_FORM_FIELDS`` is on unless ``LIBRARY_SETTINGS`` turns it off, and each
        ``AUTO_EVENTS`` item turns its switch on: the server records that event instead.
        """
        switches = {"KM_SKIP_FORM_FIELDS": 1, **dict(self.LIBRARY_SETTINGS)}
        for event in self.AUTO_EVENTS:
            switches[AUTO_EVENT_SWITCHES[event]] = 1
        return tuple(switches.items())

    @functools.cached_property
    def enabled(self) -> bool:
        """Tracking is on: an API key (or ``SITES``), and the backend is not ``disabled``."""
        return bool(self.API_KEY or self.SITES) and self.BACKEND != "disabled"

    @functools.cached_property
    def shaping(self) -> bool:
        """``BEFORE_SEND`` or ``GLOBAL_PROPERTIES`` is set: each command goes through them."""
        return self.BEFORE_SEND is not None or self.GLOBAL_PROPERTIES is not None


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


def _check_library(values: dict[str, Any]) -> None:
    events = values["AUTO_EVENTS"]
    for event in events:
        if event not in AUTO_EVENT_SWITCHES:
            raise _error(
                "AUTO_EVENTS",
                f"holds {event!r}; the events are {', '.join(map(repr, AUTO_EVENT_SWITCHES))}",
            )
    key = "LIBRARY_SETTINGS"
    try:
        switches = dict(values[key])
    except (TypeError, ValueError):
        raise _error(key, "must be a dict of KM_* names to True or False") from None
    for name, value in switches.items():
        if name == "KM_COOKIE_DOMAIN":
            raise _error(key, "may not set KM_COOKIE_DOMAIN: the tag sets it from COOKIE_DOMAIN")
        if name not in LIBRARY_SWITCHES:
            raise _error(
                key,
                f"holds {name!r}, which the library does not read; "
                f"the names are {', '.join(LIBRARY_SWITCHES)}",
            )
        if not isinstance(value, (bool, int)) or value not in (0, 1):
            raise _error(key, f"[{name!r}] must be True or False, not {value!r}")
        owner = next((e for e in events if AUTO_EVENT_SWITCHES[e] == name), None)
        if owner is not None and not value:
            raise _error(
                key,
                f"[{name!r}] is False while AUTO_EVENTS records {owner!r} on the server: "
                "the library would count it a second time",
            )


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
    _check_library(values)
    for field in _FIELDS:
        convert = field.metadata["convert"]
        if convert is not None:
            try:
                values[field.name] = convert(values[field.name])
            except re.error as exc:
                raise _error(field.name, f"is not a regular expression: {exc}") from None
            except ValueError as exc:
                raise _error(field.name, str(exc)) from None
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
