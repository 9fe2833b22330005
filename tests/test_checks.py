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


needs_django_csp = pytest.mark.skipif(
    __import__("django").VERSION < (6, 0), reason="Django's own CSP is Django 6.0+"
)


def csp_ids(**policy: list[str]) -> list[str]:
    return ids(
        MIDDLEWARE=["django.middleware.csp.ContentSecurityPolicyMiddleware", *settings.MIDDLEWARE],
        SECURE_CSP=policy,
    )


@needs_django_csp
def test_djangos_csp_with_the_readme_policy_passes() -> None:
    from django.utils.csp import CSP

    hosts = ["https://i.kissmetrics.io", "scripts.kissmetrics.io"]
    assert (
        csp_ids(
            **{
                "default-src": [CSP.SELF],
                "script-src": [CSP.SELF, CSP.NONCE, *hosts],
                "img-src": [CSP.SELF, "https://trk.kissmetrics.io"],
            }
        )
        == []
    )
    # 'strict-dynamic' lets the nonce'd loader bring in the library from any host.
    assert (
        csp_ids(**{"script-src": [CSP.NONCE, CSP.STRICT_DYNAMIC], "img-src": ["*.kissmetrics.io"]})
        == []
    )


@needs_django_csp
def test_djangos_csp_without_a_nonce_or_the_hosts_warns() -> None:
    from django.utils.csp import CSP

    assert csp_ids(**{"default-src": [CSP.SELF]}) == [
        "django_kissmetrics.W006",
        "django_kissmetrics.W007",
    ]
    with override_settings(
        MIDDLEWARE=["django.middleware.csp.ContentSecurityPolicyMiddleware", *settings.MIDDLEWARE],
        SECURE_CSP={"default-src": [CSP.SELF], "script-src": [CSP.SELF, CSP.NONCE]},
    ):
        (message,) = check_settings()
    assert message.id == "django_kissmetrics.W007"
    assert message.msg.endswith(
        "script-src i.kissmetrics.io, script-src scripts.kissmetrics.io, "
        "img-src trk.kissmetrics.io."
    )
    # Images left unrestricted (no img-src, no default-src) need nothing.
    assert csp_ids(**{"script-src": [CSP.NONCE, "*.kissmetrics.io"]}) == []
    # The middleware alone, with no policy, sends no header: nothing to warn about.
    assert csp_ids() == []


def tasks_ids(tasks: dict[str, Any] | None, **keys: Any) -> list[str]:
    kissmetrics = {**settings.KISSMETRICS, "BACKEND": "tasks", **keys}
    overrides: dict[str, Any] = {"KISSMETRICS": kissmetrics}
    if tasks is not None:
        overrides["TASKS"] = tasks
    return ids(**overrides)


def framework_backend(name: str) -> dict[str, Any]:
    import django

    package = "django.tasks" if django.VERSION >= (6, 0) else "django_tasks"
    return {"default": {"BACKEND": f"{package}.backends.{name.lower()}.{name}Backend"}}


def test_tasks_backend_on_a_queue_passes() -> None:
    queue = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
    with override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, "django_tasks_db"]):
        assert tasks_ids(queue) == []


def test_tasks_backend_immediate_or_unset_warns_in_production() -> None:
    assert tasks_ids(None) == ["django_kissmetrics.W008"]  # TASKS unset: immediate.
    assert tasks_ids(framework_backend("Immediate")) == ["django_kissmetrics.W008"]
    with override_settings(DEBUG=True):
        assert tasks_ids(framework_backend("Immediate")) == []


def test_tasks_backend_dummy_or_a_missing_alias() -> None:
    assert tasks_ids(framework_backend("Dummy")) == ["django_kissmetrics.W009"]
    assert tasks_ids(None, TASKS_BACKEND="nope") == ["django_kissmetrics.E007"]


def test_tasks_backend_without_the_framework(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "django_kissmetrics.tasks_backend", None)
    assert tasks_ids(None) == ["django_kissmetrics.E006"]
