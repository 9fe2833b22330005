"""The private Python and Django APIs the package relies on, each pinned by a test.

Each was kept because the request budget needs it (or, for the exit hook, because
delivery at exit does). A Python or Django release that changes one fails here, by
name, instead of somewhere downstream; CI runs the oldest supported Django and the
latest.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from typing import Any

from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.middleware import SessionMiddleware
from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from django.utils.functional import SimpleLazyObject, empty

from django_kissmetrics import person, publisher, transactions
from django_kissmetrics.testing import StandInTracker

# --- asyncio._get_running_loop: the running loop or None, without raising ----------------


def test_running_loop_is_asyncios_non_raising_check() -> None:
    assert transactions.running_loop is asyncio._get_running_loop
    assert transactions.running_loop() is None
    assert not transactions.in_event_loop()


def test_running_loop_finds_the_loop_inside_a_coroutine() -> None:
    async def inside() -> tuple[Any, bool]:
        return transactions.running_loop(), transactions.in_event_loop()

    loop = asyncio.new_event_loop()
    try:
        found, in_loop = loop.run_until_complete(inside())
    finally:
        loop.close()
    assert found is loop
    assert in_loop


# --- AuthenticationMiddleware's lazy user (SimpleLazyObject internals) -------------------


def _through_auth(request: HttpRequest) -> HttpRequest:
    """``request`` after SessionMiddleware and AuthenticationMiddleware, view not yet run."""

    def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    SessionMiddleware(view).process_request(request)
    AuthenticationMiddleware(view).process_request(request)
    return request


def test_the_auth_middlewares_user_is_recognised_before_it_loads() -> None:
    request = _through_auth(RequestFactory().get("/"))
    user = request.__dict__["user"]
    assert type(user) is SimpleLazyObject
    state = object.__getattribute__(user, "__dict__")
    assert state["_wrapped"] is empty, "SimpleLazyObject no longer keeps _wrapped"
    assert state["_setupfunc"].__module__ == person._AUTH_MIDDLEWARE
    assert person._lazy_session_user(user)
    # Recognising it did not load it (loading reads the session, and marks it accessed).
    assert object.__getattribute__(user, "__dict__")["_wrapped"] is empty
    assert not request.session.accessed


def test_a_loaded_or_foreign_user_is_asked_instead() -> None:
    request = _through_auth(RequestFactory().get("/"))
    user = request.__dict__["user"]
    assert not user.is_authenticated  # Loads it.
    assert not person._lazy_session_user(user)
    assert not person._lazy_session_user(AnonymousUser())
    assert not person._lazy_session_user(SimpleLazyObject(AnonymousUser))


# --- Atomic._from_testcase and connection.atomic_blocks ----------------------------------


def test_testcase_blocks_are_marked_and_real_ones_are_not(db: None) -> None:
    # pytest-django's db fixture wraps the test in TestCase's atomic blocks.
    assert connection.in_atomic_block
    assert connection.atomic_blocks, "connection.atomic_blocks is gone"
    assert all(getattr(b, "_from_testcase", None) is True for b in connection.atomic_blocks)
    assert not transactions.in_transaction()
    with transaction.atomic():
        assert getattr(connection.atomic_blocks[-1], "_from_testcase", None) is False
        assert transactions.in_transaction()
    assert not transactions.in_transaction()


# --- threading._register_atexit: a flush at exit may still use a thread pool ----------------


def test_register_atexit_runs_while_thread_pools_still_take_work() -> None:
    assert publisher._register is threading._register_atexit
    script = textwrap.dedent(
        """
        import atexit, threading
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1)

        def use_pool(when):
            try:
                print(when, pool.submit(lambda: "ran").result(), flush=True)
            except RuntimeError as error:
                print(when, "refused:", error, flush=True)

        threading._register_atexit(use_pool, "threading")
        atexit.register(use_pool, "atexit")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    lines = done.stdout.splitlines()
    assert "threading ran" in lines
    # Why plain atexit is only the fallback: by then the pools refuse new work.
    assert any(line.startswith("atexit refused:") for line in lines), lines


def test_a_process_that_just_exits_delivers_what_its_publisher_held() -> None:
    # Eager Celery: the exit hook's flush delivers through the HTTP client, whose event
    # loop starts there (in the exiting thread where Python refuses a new one: 3.12.0-3.12.2).
    # No flush is called: only the exit hook can send the 40 events.
    with StandInTracker() as tracker:
        tracker.delay = 0.005
        script = textwrap.dedent(
            f"""
            import django
            from django.conf import settings

            settings.configure(
                INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes",
                                "django_kissmetrics"],
                DATABASES={{"default": {{"ENGINE": "django.db.backends.sqlite3",
                                         "NAME": ":memory:"}}}},
                KISSMETRICS={{"API_KEY": "k", "BACKEND": "celery",
                              "TRACKING_URL": "{tracker.url}", "PUBLISH_WINDOW": 60}},
            )
            django.setup()
            from celery import Celery
            app = Celery("exit", broker="memory://")
            app.conf.task_always_eager = True
            app.set_default()
            from django_kissmetrics import km
            with km.batch():
                for i in range(40):
                    km.record("Exited", {{"i": i}}, identity="exit@example.com")
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        hits = tracker.wait_for(40, timeout=10)
    assert sorted(int(h.properties["i"]) for h in hits) == list(range(40))
    assert "not delivered" not in done.stderr
