"""Fixtures: a stand-in tracker on loopback, a real Redis broker and a real Celery worker."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from django.test import override_settings

from django_kissmetrics.testing import StandInTracker

IN_CI = os.environ.get("CI") == "true"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need(reason: str) -> None:
    """Skip outside CI, fail in CI: under CI=true nothing may be skipped."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


class RedisServer:
    """A redis-server subprocess on a port of its own, for tests that stop the broker."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            need("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [
                str(binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not redis_answers(self.url):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under KM_TEST_INSTALLED (CI's wheel run) the package must be the installed one."""
    if os.environ.get("KM_TEST_INSTALLED"):
        import django_kissmetrics

        where = os.path.dirname(django_kissmetrics.__file__)
        if "site-packages" not in where.split(os.sep):
            pytest.exit(f"KM_TEST_INSTALLED: django_kissmetrics comes from {where}", 3)


@pytest.fixture(autouse=True)
def fresh_publisher() -> Iterator[None]:
    """A publisher of each test's own: one left probing a broker that a test took away
    would replay the next test's spool."""
    from django_kissmetrics import publisher

    yield
    publisher.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis to use as the broker: the one on 6379 if it answers, else one we start."""
    from django.conf import settings

    if redis_answers(settings.REDIS_URL):
        yield settings.REDIS_URL
        return
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def tracker() -> Iterator[StandInTracker]:
    """A stand-in tracking server on 127.0.0.1."""
    with StandInTracker() as server:
        yield server


def km_config(**overrides: Any) -> dict[str, Any]:
    from django.conf import settings

    return {**settings.KISSMETRICS, **overrides}


@pytest.fixture
def km_settings() -> Iterator[Any]:
    """``km_settings(**keys)`` overrides KISSMETRICS keys for the rest of the test."""
    stack: list[Any] = []

    def apply(**overrides: Any) -> None:
        ctx = override_settings(KISSMETRICS=km_config(**overrides))
        ctx.enable()
        stack.append(ctx)

    yield apply
    for ctx in reversed(stack):
        ctx.disable()


@pytest.fixture
def celery_app(redis_url: str) -> Any:
    from tests.celery_app import app

    app.conf.broker_url = redis_url
    app.conf.broker_connection_retry_on_startup = True
    app.set_current()
    app.set_default()
    redis = __import__("redis").Redis.from_url(redis_url)
    redis.delete("celery", "unacked", "unacked_index")
    return app


@pytest.fixture
def celery_worker(celery_app: Any) -> Iterator[Any]:
    """A real Celery worker, in this process, consuming from the real Redis broker."""
    import logging

    from celery.contrib.testing.worker import start_worker

    # Celery takes over the root logger; later caplog-based tests need it back.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with start_worker(
        celery_app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=10
    ) as worker:
        try:
            yield worker
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)


@pytest.fixture
def own_broker(celery_app: Celery) -> Iterator[RedisServer]:
    """A Redis this test can stop, and a Celery app in this process that publishes to it."""
    server = RedisServer()
    server.start()
    app = Celery("broker-outage")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.update(broker_url=server.url)
    # The publisher thread finds the task through the default app.
    app.set_default()
    app.set_current()
    try:
        yield server
    finally:
        server.stop()
        celery_app.set_default()
        celery_app.set_current()
