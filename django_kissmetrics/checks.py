"""System checks ``django_kissmetrics.E001`` ... for settings and middleware order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.utils.module_loading import import_string

from .conf import ConfigurationError, get_settings

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


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The checks: a valid setting, an API key, a usable backend, the middleware in place."""
    messages: list[CheckMessage] = []
    try:
        conf = get_settings()
    except ConfigurationError as exc:
        return [Error(str(exc), id="django_kissmetrics.E001")]
    if not conf.API_KEY:
        messages.append(
            Warning(
                'KISSMETRICS["API_KEY"] is not set: tracking is disabled.',
                hint=(
                    "Set it to your site's key from Kissmetrics' settings page, usually "
                    'read from the environment: os.environ.get("KISSMETRICS_API_KEY"). '
                    "Give the Celery worker the same variable."
                ),
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
