"""System checks with stable ids."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from django_kissmetrics.checks import MIDDLEWARE, check_settings


def ids(**overrides: Any) -> list[str]:
    with override_settings(**overrides):
        return [m.id or "" for m in check_settings()]


def test_the_test_settings_pass() -> None:
    assert ids() == []


def test_middleware_missing() -> None:
    middleware = [m for m in settings.MIDDLEWARE if m != MIDDLEWARE]
    assert ids(MIDDLEWARE=middleware) == ["django_kissmetrics.W001"]


def test_middleware_before_authentication() -> None:
    middleware = [MIDDLEWARE, *[m for m in settings.MIDDLEWARE if m != MIDDLEWARE]]
    assert ids(MIDDLEWARE=middleware) == ["django_kissmetrics.E002", "django_kissmetrics.E002"]


def test_no_api_key_warns() -> None:
    assert ids(KISSMETRICS={"BACKEND": "locmem"}) == ["django_kissmetrics.W002"]
    with override_settings(KISSMETRICS={"BACKEND": "locmem"}):
        (warning,) = check_settings()
    assert "KISSMETRICS_API_KEY" in (warning.hint or "")


@pytest.mark.parametrize("url", ["ftp://trk.example", "trk.kissmetrics.io", "javascript:x"])
def test_tracking_url_must_be_http(url: str) -> None:
    assert ids(KISSMETRICS={"API_KEY": "k", "BACKEND": "locmem", "TRACKING_URL": url}) == [
        "django_kissmetrics.E001"
    ]


def test_unknown_key_is_an_error_naming_it() -> None:
    with override_settings(KISSMETRICS={"API_KEY": "k", "COOKIE_NAM": "x"}):
        (message,) = check_settings()
    assert message.id == "django_kissmetrics.E001"
    assert "'COOKIE_NAM'" in message.msg


@contextlib.contextmanager
def no_celery_app() -> Iterator[None]:
    """No Celery app loaded, as in a site that never imports one; restored afterwards."""
    from celery import _state

    previous = _state._tls.current_app
    _state._tls.current_app = None
    default = _state.default_app
    _state.default_app = None
    try:
        yield
    finally:
        _state._tls.current_app = previous
        _state.default_app = default


CELERY = {"API_KEY": "k", "BACKEND": "celery"}


def test_celery_backend_needs_a_celery_app() -> None:
    from tests.celery_app import app

    with no_celery_app():
        with override_settings(KISSMETRICS=CELERY):
            (message,) = check_settings()
        assert message.id == "django_kissmetrics.W003"
        assert "proj/__init__.py" in (message.hint or "")
        app.set_current()
        assert ids(KISSMETRICS=CELERY) == []


def test_celery_app_without_a_broker_warns_with_the_default_url() -> None:
    from celery import Celery

    with no_celery_app():
        app = Celery("proj", set_as_current=True)
        with override_settings(KISSMETRICS=CELERY):
            (message,) = check_settings()
        assert message.id == "django_kissmetrics.W004"
        assert "amqp://guest:**@localhost:5672//" in message.msg
        assert "CELERY_BROKER_URL" in (message.hint or "")
        # The sync backend needs no broker.
        assert ids(KISSMETRICS={**CELERY, "BACKEND": "sync"}) == []
        app.conf.task_always_eager = True  # Tasks run where they are queued.
        assert ids(KISSMETRICS=CELERY) == []
        app.conf.task_always_eager = False
        app.conf.broker_url = "redis://127.0.0.1:6379/0"
        assert ids(KISSMETRICS=CELERY) == []


def test_bad_backend_path_is_a_clear_error(km_settings: Any) -> None:
    from django_kissmetrics import ConfigurationError
    from django_kissmetrics.backends import get_backend

    km_settings(BACKEND="tests.nowhere.Backend")
    with pytest.raises(ConfigurationError, match="cannot be imported"):
        get_backend()
    km_settings(BACKEND="tests.backends.email_identity")
    with pytest.raises(ConfigurationError, match="not a BaseBackend subclass"):
        get_backend()


def test_pytest_plugin_is_registered(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.has_plugin("django_kissmetrics")


def test_a_site_without_contrib_auth_starts_and_tracks() -> None:
    # No users, so no login or signup to join: the anonymous visitor is still tracked.
    script = textwrap.dedent(
        """
        import django
        from django.conf import settings
        from django.http import HttpResponse
        from django.urls import path

        def view(request):
            from django_kissmetrics import km
            km.record("Viewed Home")
            return HttpResponse("home")

        urlpatterns = [path("", view)]
        settings.configure(
            INSTALLED_APPS=["django_kissmetrics"],
            MIDDLEWARE=["django_kissmetrics.middleware.KissmetricsMiddleware"],
            ROOT_URLCONF="__main__",
            ALLOWED_HOSTS=["testserver"],
            KISSMETRICS={"API_KEY": "k", "BACKEND": "locmem"},
        )
        django.setup()
        from django.core import checks
        from django.test import Client
        from django_kissmetrics import testing

        print([m.id for m in checks.run_checks()])
        response = Client().get("/")
        print(response.status_code, "km_ai" in response.cookies)
        print([(c.kind, c.name) for c in testing.outbox])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "200 True", "[('record', 'Viewed Home')]"]
