"""Settings of the demo site.

Environment variables:

- ``DEMO_PORT`` (default 8000): the port ``runserver`` listens on; the stand-in tracker's
  URL is built from it, so ``make demo PORT=...`` passes it along.
- ``DEMO_DB``: the SQLite file (default ``example_project/db.sqlite3``).
- ``KISSMETRICS_SECOND_API_KEY``: the key of the second site, ``http://localhost:<port>/``.
- ``KISSMETRICS_API_KEY`` and ``KISSMETRICS_TRACKING_URL``: send to a real Kissmetrics
  site (``https://trk.kissmetrics.io``) instead of the stand-in tracker.
- ``CELERY_BROKER_URL`` (for example ``redis://127.0.0.1:6379/0``): queue deliveries to a
  real broker; then run ``celery -A demo worker -l info`` from ``example_project/`` with
  the same environment.
- ``DEMO_BACKEND=tasks`` (``make demo-tasks``): deliver through Django Tasks instead, queued
  in the demo's own database by django-tasks-db; run ``python manage.py db_worker`` from
  ``example_project/`` beside it (``make demo-tasks`` does). No broker at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import django

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-a-secret")
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

DEMO_PORT = int(os.environ.get("DEMO_PORT", "8000"))

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_kissmetrics",
    "shop",
    "tracker",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # After sessions and authentication: it needs request.session and request.user.
    "django_kissmetrics.middleware.KissmetricsMiddleware",
]

ROOT_URLCONF = "demo.urls"
WSGI_APPLICATION = "demo.wsgi.application"
ASGI_APPLICATION = "demo.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "shop.context_processors.demo",
            ]
        },
    }
]

# The stand-in tracker writes each hit from another runserver thread while a page
# request may be writing too: WAL and immediate transactions let SQLite queue those
# writers instead of failing with "database is locked". Django 5.1 has options for
# both; before it, demo.sqlite does the same.
_sqlite_options: dict[str, Any] = {"timeout": 20}
_sqlite_engine = "demo.sqlite"
if django.VERSION >= (5, 1):
    _sqlite_engine = "django.db.backends.sqlite3"
    _sqlite_options |= {
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }

DATABASES = {
    "default": {
        "ENGINE": _sqlite_engine,
        "NAME": os.environ.get("DEMO_DB") or BASE_DIR / "db.sqlite3",
        "OPTIONS": _sqlite_options,
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "pricing"
LOGOUT_REDIRECT_URL = "home"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"

# --- Kissmetrics -------------------------------------------------------------------------

STANDIN_TRACKING_URL = f"http://127.0.0.1:{DEMO_PORT}/tracker"

KISSMETRICS = {
    "API_KEY": os.environ.get("KISSMETRICS_API_KEY") or "demo-key",
    "TRACKING_URL": os.environ.get("KISSMETRICS_TRACKING_URL") or STANDIN_TRACKING_URL,
    "BACKEND": "celery",
    # People in the stand-in tracker read better as "alice" than as a primary key.
    "IDENTITY": "shop.identity.username",
    # The stand-in tracker's own endpoints and its live page are not visitors of the shop.
    "EXCLUDE_PATHS": [
        "/admin/",
        "/static/",
        "/media/",
        "/favicon.ico",
        "/robots.txt",
        "/health",
        "/tracker/",
    ],
    # Where visitors come from, recorded by the server even when an ad blocker stops the
    # library: open the shop as /?utm_source=demo and the tracker shows an Ad Campaign Hit.
    "AUTO_EVENTS": ["Visited Site", "Ad Campaign Hit", "Search Engine Hit", "Referrer"],
    # A second site on the same server: http://localhost:<port>/ is tracked under a key
    # of its own (the tracker's page shows each person's site); 127.0.0.1 uses API_KEY.
    "SITES": {"localhost": os.environ.get("KISSMETRICS_SECOND_API_KEY") or "demo-second-key"},
    # Staff (the admin's users) are not counted as visitors.
    "TRACK": "django_kissmetrics.track.not_staff",
}

# --- Consent -----------------------------------------------------------------------------

# Nobody is tracked until they accept the "analytics" cookie group in the banner, kept by
# django-cookie-consent (the group is made by shop's migration 0002).
INSTALLED_APPS += ["cookie_consent"]
KISSMETRICS["CONSENT"] = "django_kissmetrics.consent.django_cookie_consent"
COOKIE_CONSENT_SUCCESS_URL = "/"

#: While events go to the stand-in tracker, the pages never load the real Kissmetrics
#: library (it would send the demo's events to Kissmetrics): the tag loads the demo's
#: stand-in library (shop/static/shop/kmq.js) and site script (the tracker's) instead.
DEMO_STANDIN = KISSMETRICS["TRACKING_URL"] == STANDIN_TRACKING_URL
if DEMO_STANDIN:
    KISSMETRICS["SCRIPT_URLS"] = (
        f"/static/shop/kmq.js?url={quote(STANDIN_TRACKING_URL, safe='')}",
        "/tracker/{key}.2.js",
    )

# --- Celery ------------------------------------------------------------------------------

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "")
if not CELERY_BROKER_URL:
    # No broker: each task runs where it is queued, that is in the package's publisher
    # thread of the web process, which then calls the stand-in tracker over HTTP.
    # runserver is threaded, so it answers that call while serving the page.
    CELERY_TASK_ALWAYS_EAGER = True
    CELERY_BROKER_URL = "memory://localhost/"
CELERY_TASK_IGNORE_RESULT = True
# With Redis, a message a killed worker had taken comes back after this many seconds;
# the package's longest retry backoff (RETRY_BACKOFF_MAX, 600 s) stays well under it.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}

# --- Django Tasks (DEMO_BACKEND=tasks) -----------------------------------------------------

if os.environ.get("DEMO_BACKEND") == "tasks":
    KISSMETRICS["BACKEND"] = "tasks"
    # Below Django 6.0 the framework is the django-tasks backport.
    INSTALLED_APPS += [*(["django_tasks"] if django.VERSION < (6, 0) else []), "django_tasks_db"]
    TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}

# --- Logging -----------------------------------------------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "quiet_polling": {
            "()": "django.utils.log.CallbackFilter",
            "callback": lambda record: "/tracker/people" not in record.getMessage(),
        },
    },
    "formatters": {
        "plain": {"format": "%(levelname)s %(name)s: %(message)s"},
        "django.server": {
            "()": "django.utils.log.ServerFormatter",
            "format": "[{server_time}] {message}",
            "style": "{",
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        # The tracker page polls every two seconds; those lines would bury the hits.
        "django.server": {
            "class": "logging.StreamHandler",
            "formatter": "django.server",
            "filters": ["quiet_polling"],
        },
    },
    "loggers": {
        "django_kissmetrics": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django.server": {"handlers": ["django.server"], "level": "INFO", "propagate": False},
    },
}

if CELERY_BROKER_URL.startswith("memory://"):
    # In eager mode an unexpected error inside the delivery task is reported only by
    # Celery's tracer, whose log a web process does not show by default. (A worker
    # sets up its own logging.)
    LOGGING["loggers"]["celery.app.trace"] = {  # type: ignore[index]
        "handlers": ["console"],
        "level": "WARNING",
        "propagate": False,
    }
