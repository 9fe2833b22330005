"""The ``KISSMETRICS`` setting: defaults, validation, and a cache reset on ``setting_changed``."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

from .exceptions import KissmetricsError

__all__ = ["DEFAULTS", "ConfigurationError", "Settings", "get_settings"]

FIVE_YEARS = 5 * 365 * 24 * 60 * 60

#: Every key of the ``KISSMETRICS`` setting with its default (see the README's table).
DEFAULTS: dict[str, Any] = {
    "API_KEY": None,
    "TRACKING_URL": "https://trk.kissmetrics.io",
    "BACKEND": "celery",
    "IDENTITY": "django_kissmetrics.identity.user_identity",
    "COOKIE_NAME": "km_ai",
    "COOKIE_DOMAIN": None,
    "COOKIE_MAX_AGE": FIVE_YEARS,
    "SIGNUP_EVENT": "Signed Up",
    "LOGIN_EVENT": "Logged In",
    "HONOR_DNT": True,
    "TIMEOUT": 5.0,
    "MAX_RETRIES": 8,
    "RETRY_BACKOFF": 2.0,
    "RETRY_BACKOFF_MAX": 600.0,
    "CELERY_QUEUE": None,
    "DELIVERY_CONCURRENCY": 16,
    "PUBLISH": "background",
    "PUBLISH_WINDOW": 0.2,
    "PUBLISH_QUEUE_SIZE": 10_000,
    "ON_ENQUEUE_FAILURE": "log",
    "EXCLUDE_PATHS": ["/admin/", "/static/", "/media/", "/favicon.ico", "/robots.txt", "/health"],
    "IGNORE_USER_AGENTS": r"bot\b|crawl|spider|slurp|bingpreview|facebookexternalhit|mediapartners",
    "CSP_NONCE_ATTRIBUTE": "csp_nonce",
}

_NUMBER = (int, float)
_TYPES: dict[str, tuple[type, ...]] = {
    "API_KEY": (str, type(None)),
    "TRACKING_URL": (str,),
    "BACKEND": (str,),
    "IDENTITY": (str,),
    "COOKIE_NAME": (str,),
    "COOKIE_DOMAIN": (str, type(None)),
    "COOKIE_MAX_AGE": (int,),
    "SIGNUP_EVENT": (str, type(None)),
    "LOGIN_EVENT": (str, type(None)),
    "HONOR_DNT": (bool,),
    "TIMEOUT": _NUMBER,
    "MAX_RETRIES": (int,),
    "RETRY_BACKOFF": _NUMBER,
    "RETRY_BACKOFF_MAX": _NUMBER,
    "CELERY_QUEUE": (str, type(None)),
    "DELIVERY_CONCURRENCY": (int,),
    "PUBLISH": (str,),
    "PUBLISH_WINDOW": _NUMBER,
    "PUBLISH_QUEUE_SIZE": (int,),
    "ON_ENQUEUE_FAILURE": (str,),
    "EXCLUDE_PATHS": (list, tuple),
    "IGNORE_USER_AGENTS": (str, type(None)),
    "CSP_NONCE_ATTRIBUTE": (str, type(None)),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "PUBLISH": ("background", "inline"),
    "ON_ENQUEUE_FAILURE": ("log", "sync"),
}


class ConfigurationError(KissmetricsError, ImproperlyConfigured):
    """The ``KISSMETRICS`` setting is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class Settings:
    """The validated ``KISSMETRICS`` setting, with every default filled in."""

    API_KEY: str | None
    TRACKING_URL: str
    BACKEND: str
    IDENTITY: str
    COOKIE_NAME: str
    COOKIE_DOMAIN: str | None
    COOKIE_MAX_AGE: int
    SIGNUP_EVENT: str | None
    LOGIN_EVENT: str | None
    HONOR_DNT: bool
    TIMEOUT: float
    MAX_RETRIES: int
    RETRY_BACKOFF: float
    RETRY_BACKOFF_MAX: float
    CELERY_QUEUE: str | None
    DELIVERY_CONCURRENCY: int
    PUBLISH: str
    PUBLISH_WINDOW: float
    PUBLISH_QUEUE_SIZE: int
    ON_ENQUEUE_FAILURE: str
    EXCLUDE_PATHS: tuple[str, ...]
    IGNORE_USER_AGENTS: re.Pattern[str] | None
    CSP_NONCE_ATTRIBUTE: str | None

    @functools.cached_property
    def enabled(self) -> bool:
        """Tracking is on: there is an API key and the backend is not ``disabled``."""
        return bool(self.API_KEY) and self.BACKEND != "disabled"


def _error(key: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"settings.KISSMETRICS[{key!r}] {problem}")


def _check_type(key: str, value: Any) -> None:
    types = _TYPES[key]
    # bool is an int in Python, but True is never a sensible timeout or retry count.
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
        raise _error(key, f"must be {names}, not {type(value).__name__} ({value!r})")


def load(user: Any) -> Settings:
    """Validate a ``KISSMETRICS`` dict and merge it with :data:`DEFAULTS`."""
    if user is None:
        user = {}
    if not isinstance(user, dict):
        raise ConfigurationError(f"settings.KISSMETRICS must be a dict, not {type(user).__name__}")
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise _error(unknown[0], f"is not a known key; the keys are {', '.join(DEFAULTS)}")
    values = {**DEFAULTS, **user}
    for key, value in values.items():
        _check_type(key, value)
        if key in _CHOICES and value not in _CHOICES[key]:
            raise _error(key, f"must be one of {', '.join(map(repr, _CHOICES[key]))}")
    url = urlsplit(values["TRACKING_URL"])
    if url.scheme not in ("http", "https") or not url.netloc:
        raise _error("TRACKING_URL", "must be an http:// or https:// URL")
    for key in ("TIMEOUT", "PUBLISH_WINDOW", "RETRY_BACKOFF", "RETRY_BACKOFF_MAX"):
        if values[key] < 0:
            raise _error(key, "must not be negative")
    for key in ("MAX_RETRIES", "DELIVERY_CONCURRENCY", "PUBLISH_QUEUE_SIZE"):
        if values[key] < (0 if key == "MAX_RETRIES" else 1):
            raise _error(key, "is too small")
    if not all(isinstance(p, str) for p in values["EXCLUDE_PATHS"]):
        raise _error("EXCLUDE_PATHS", "must be a list of path prefixes (str)")
    agents = values["IGNORE_USER_AGENTS"]
    try:
        pattern = re.compile(agents, re.IGNORECASE) if agents else None
    except re.error as exc:
        raise _error("IGNORE_USER_AGENTS", f"is not a regular expression: {exc}") from None
    values["EXCLUDE_PATHS"] = tuple(values["EXCLUDE_PATHS"])
    values["IGNORE_USER_AGENTS"] = pattern
    values["TIMEOUT"] = float(values["TIMEOUT"])
    values["TRACKING_URL"] = values["TRACKING_URL"].rstrip("/")
    return Settings(**values)


@functools.cache
def get_settings() -> Settings:
    """The current settings, validated once and cached until ``KISSMETRICS`` changes."""
    return load(getattr(django_settings, "KISSMETRICS", None))


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "KISSMETRICS":
        get_settings.cache_clear()
        from . import backends

        backends.get_backend.cache_clear()
