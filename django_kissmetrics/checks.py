"""System checks ``django_kissmetrics.E001`` ... for settings and middleware order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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


def _tasks_problems(alias: str) -> list[CheckMessage]:
    """``BACKEND = "tasks"`` without Django Tasks, or with no queue behind it."""
    try:
        from .tasks_backend import task_backends
    except ImportError:
        return [
            Error(
                'KISSMETRICS["BACKEND"] is "tasks" but Django Tasks is not installed: it is '
                "part of Django 6.0+; before that it is the django-tasks backport.",
                hint='pip install "django-kissmetrics-sdk[tasks]", or use Django 6.0+.',
                id="django_kissmetrics.E006",
            )
        ]
    try:
        backend = task_backends[alias]
    except Exception as exc:
        return [
            Error(
                f'KISSMETRICS["TASKS_BACKEND"] is {alias!r}, which TASKS does not configure: {exc}',
                hint="Add it to TASKS, or name one of its aliases.",
                id="django_kissmetrics.E007",
            )
        ]
    kind = type(backend).__name__
    if kind == "DummyBackend":
        return [
            Warning(
                f"TASKS[{alias!r}] is the DummyBackend: it never runs a task, so no event is "
                "delivered.",
                hint="Configure a queue such as django_tasks_db.DatabaseBackend and run its "
                "worker (python manage.py db_worker).",
                id="django_kissmetrics.W009",
            )
        ]
    if kind == "ImmediateBackend" and not settings.DEBUG:
        return [
            Warning(
                f"TASKS[{alias!r}] is the ImmediateBackend"
                f"{'' if getattr(settings, 'TASKS', None) else ' (TASKS is not set)'}: each "
                "batch is delivered inside the web process, with no worker, no durable "
                "queue and no deferred retries.",
                hint="In production configure a queue such as django_tasks_db.DatabaseBackend "
                "and run its worker (python manage.py db_worker).",
                id="django_kissmetrics.W008",
            )
        ]
    return []


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


def _spool_problem(conf: Settings) -> CheckMessage | None:
    if conf.ON_ENQUEUE_FAILURE == "log":
        return None
    from .spool import default_dir, folder_problem

    problem = folder_problem(conf.SPOOL_DIR or default_dir())
    if problem is None:
        return None
    return Error(
        f"{problem[0].upper()}{problem[1:]}. The spool is not used: commands the broker "
        "does not take are logged instead.",
        hint="The spool holds people's identities and properties: it must be a folder "
        "of this user's own, mode 0700 (Troubleshooting, in the README).",
        id="django_kissmetrics.E005",
    )


CSP_MIDDLEWARE = "django.middleware.csp.ContentSecurityPolicyMiddleware"


def _host(url: str) -> str:
    """The host of a script or tracking URL; ``""`` for a path of this site."""
    return urlsplit(url if "//" in url else "").hostname or ""


def _allows(sources: list[str], host: str) -> bool:
    """A CSP source list lets the browser load from ``host`` (``""``: this site)."""
    for source in (str(s).strip("'").lower() for s in sources):
        if source in ("*", "https:", "http:", "strict-dynamic"):
            return True
        if not host:
            if source == "self":
                return True
            continue
        name = source.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
        if name == host or (name.startswith("*.") and host.endswith(name[1:])):
            return True
    return False


def _csp_problems(conf: Any) -> list[CheckMessage]:
    """Django's own CSP (6.0+) in force without what the tag and the library need."""
    if CSP_MIDDLEWARE not in getattr(settings, "MIDDLEWARE", []):
        return []
    from django.utils.csp import CSP  # type: ignore[import-not-found,unused-ignore]

    messages: list[CheckMessage] = []
    for name in ("SECURE_CSP", "SECURE_CSP_REPORT_ONLY"):
        policy = getattr(settings, name, None) or {}
        # A directive left out falls back to default-src; without that, anything goes.
        default = policy.get("default-src")
        scripts = policy.get("script-src", default)
        images = policy.get("img-src", default)
        if scripts is not None and CSP.NONCE not in scripts:
            messages.append(
                Warning(
                    f'{name}["script-src"] has no CSP.NONCE: the browser refuses the '
                    "{% kissmetrics_js %} script.",
                    hint='Add CSP.NONCE to "script-src" (Content Security Policy, in the README).',
                    id="django_kissmetrics.W006",
                )
            )
        missing = [
            f"script-src {_host(url) or 'self'}"
            for url in conf.SCRIPT_URLS
            if scripts is not None and not _allows(scripts, _host(url))
        ]
        tracker = urlsplit(conf.TRACKING_URL).hostname or ""
        if images is not None and not _allows(images, tracker):
            missing.append(f"img-src {tracker}")
        if missing:
            messages.append(
                Warning(
                    f"{name} does not allow what the Kissmetrics library loads: "
                    f"{', '.join(missing)}.",
                    hint="Add those hosts (Content Security Policy, in the README).",
                    id="django_kissmetrics.W007",
                )
            )
    return messages


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
    if conf.BACKEND == "tasks":
        messages += _tasks_problems(conf.TASKS_BACKEND)
    if conf.enabled:
        messages += _csp_problems(conf)
    if conf.CONSENT is not None:
        problem = _consent_problem(conf.CONSENT)
        if problem is not None:
            messages.append(problem)
    problem = _spool_problem(conf)
    if problem is not None:
        messages.append(problem)
    if "*" in getattr(settings, "ALLOWED_HOSTS", []) and not conf.COOKIE_DOMAIN:
        messages.append(
            Warning(
                'ALLOWED_HOSTS holds "*" and KISSMETRICS["COOKIE_DOMAIN"] is not set: the '
                "km_ai cookie is host-only, and the tag sets no KM_COOKIE_DOMAIN, for a "
                "host ALLOWED_HOSTS does not name (the request names any host it likes).",
                hint='Set KISSMETRICS["COOKIE_DOMAIN"] (".example.com"), or list your '
                "hosts in ALLOWED_HOSTS.",
                id="django_kissmetrics.W005",
            )
        )
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
