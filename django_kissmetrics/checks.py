"""System checks ``django_kissmetrics.E001`` ... for settings and middleware order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.http.request import validate_host
from django.utils.module_loading import import_string

from .conf import ConfigurationError, Settings, get_settings

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["check_settings", "loaded_celery_app"]

MIDDLEWARE = "django_kissmetrics.middleware.KissmetricsMiddleware"
AFTER = (
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
)


def loaded_celery_app() -> Celery | None:
    """The site's Celery app, or ``None`` when only Celery's fallback app exists (W003).

    Raises ``ImportError`` without Celery.
    """
    from celery import _state

    app = _state.get_current_app()
    if app is getattr(_state, "default_app", None) and app.main == "default":
        return None
    return app


def _celery_problem() -> CheckMessage | None:
    try:
        app = loaded_celery_app()
    except ImportError:
        return Error(
            'KISSMETRICS["BACKEND"] is "celery" but Celery is not installed.',
            hint='pip install "django-kissmetrics-sdk[celery]", or use the "sync" backend.',
            id="django_kissmetrics.E003",
        )
    if app is None:
        return Warning(
            'KISSMETRICS["BACKEND"] is "celery" but no Celery app is loaded, so events are '
            "queued by Celery's fallback app, which reads none of your CELERY_ settings.",
            hint="Create proj/celery.py with your Celery app and add "
            "'from .celery import app as celery_app' to proj/__init__.py "
            "(Install, in the django-kissmetrics-sdk README).",
            id="django_kissmetrics.W003",
        )
    conf = app.conf
    # Without a broker URL Celery connects to amqp://guest@localhost// and, while that is
    # down, every batch fails to queue; eager mode runs tasks where they are queued.
    if not (conf.broker_url or conf.broker_write_url) and not conf.task_always_eager:
        return Warning(
            f'KISSMETRICS["BACKEND"] is "celery" but the Celery app {app.main!r} has no '
            f"broker configured: events go to Celery's default, {app.connection().as_uri()}.",
            hint="Set CELERY_BROKER_URL (for example 'redis://127.0.0.1:6379/0') and "
            "run a worker: celery -A proj worker -l info.",
            id="django_kissmetrics.W004",
        )
    return None


#: The adapter for django-cookie-consent, which needs that app installed.
COOKIE_CONSENT_ADAPTER = "django_kissmetrics.consent.django_cookie_consent"


def _consent_problem(path: str) -> CheckMessage | None:
    try:
        import_string(path)
    except ImportError as exc:
        problem = f"cannot be imported ({exc})"
    else:
        if path != COOKIE_CONSENT_ADAPTER or apps.is_installed("cookie_consent"):
            return None
        problem = 'needs "cookie_consent" in INSTALLED_APPS (pip install django-cookie-consent)'
    return Error(
        f'KISSMETRICS["CONSENT"] = {path!r} {problem}: every visitor counts as not agreed.',
        hint="Point it at a function request -> bool.",
        id="django_kissmetrics.E004",
    )


#: The settings that name a function, with what it is called with, and what a failure does.
_HOOKS = {
    "SITES": ("request -> key | None", "no request is tracked"),
    "TRACK": ("request -> bool", "no visitor is tracked"),
    "BEFORE_SEND": ("Command -> Command | None", "commands are sent unchanged"),
    "GLOBAL_PROPERTIES": ("request | None -> dict", "events go without them"),
}


def _hook_problems(conf: Settings) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    for key, (shape, outcome) in _HOOKS.items():
        path = getattr(conf, key)
        if not isinstance(path, str):
            continue
        try:
            target = import_string(path)
        except ImportError as exc:
            problem = f"cannot be imported ({exc})"
        else:
            if callable(target):
                continue
            problem = "is not callable"
        messages.append(
            Error(
                f'KISSMETRICS["{key}"] = {path!r} {problem}: {outcome}.',
                hint=f"Point it at a function {shape}.",
                id="django_kissmetrics.E008",
            )
        )
    return messages


def _sites_problems(sites: dict[str, str | None]) -> list[CheckMessage]:
    allowed = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]  # What Django allows then.
    unserved = [host for host in sites if not validate_host(host.lstrip("."), allowed)]
    if not unserved:
        return []
    return [
        Warning(
            f'KISSMETRICS["SITES"] names {", ".join(map(repr, unserved))}, which '
            "ALLOWED_HOSTS does not serve: those keys are never used.",
            hint="Add the host to ALLOWED_HOSTS, or correct the SITES entry.",
            id="django_kissmetrics.W010",
        )
    ]


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The checks: a valid setting, an API key, a usable backend, the middleware in place."""
    messages: list[CheckMessage] = []
    try:
        conf = get_settings()
    except ConfigurationError as exc:
        return [Error(str(exc), id="django_kissmetrics.E001")]
    if not (conf.API_KEY or conf.SITES):
        messages.append(
            Warning(
                'KISSMETRICS["API_KEY"] is not set: tracking is disabled.',
                hint="Set it to your site's key from Kissmetrics' settings page.",
                id="django_kissmetrics.W002",
            )
        )
    if conf.BACKEND == "celery":
        problem = _celery_problem()
        if problem is not None:
            messages.append(problem)
    if conf.CONSENT is not None:
        problem = _consent_problem(conf.CONSENT)
        if problem is not None:
            messages.append(problem)
    messages += _hook_problems(conf)
    if isinstance(conf.SITES, dict):
        messages += _sites_problems(conf.SITES)
    middleware = list(getattr(settings, "MIDDLEWARE", []))
    if MIDDLEWARE not in middleware:
        messages.append(
            Warning(
                f"{MIDDLEWARE} is not in MIDDLEWARE: no km_ai cookie, no current person.",
                hint="Add it after AuthenticationMiddleware.",
                id="django_kissmetrics.W001",
            )
        )
    else:
        index = middleware.index(MIDDLEWARE)
        for other in AFTER:
            if other in middleware and middleware.index(other) > index:
                messages.append(
                    Error(
                        f"{MIDDLEWARE} must come after {other} in MIDDLEWARE.",
                        hint="It needs request.session and request.user.",
                        id="django_kissmetrics.E002",
                    )
                )
    return messages
