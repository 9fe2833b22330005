"""``kissmetrics_ping``: one test event through the configured path, reported hop by hop.

The hops, in order: the settings and the API key; with the ``celery`` backend, the broker,
then a worker taking the ping task (``django_kissmetrics.ping``) and its own settings
(``worker configuration``: a worker without an API key); with ``tasks``, the task
enqueued, then a worker picking it up; last, the tracking server's answer. A Celery worker
reports back through a queue of its own on the broker, so the ping works with a broker
alone, without a result backend; a task reports through its result. Any other backend sends
straight to the tracking server from this process.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from typing import Any

from . import delivery
from .checks import loaded_celery_app
from .client import KissmetricsClient
from .commands import Command, make_record
from .conf import ConfigurationError, Settings, get_settings
from .exceptions import TrackingError

__all__ = ["DEFAULT_IDENTITY", "EVENT", "PingFailed", "deliver_once", "run"]

#: The event the ping records; its ``token`` property tells one ping from another.
EVENT = "Kissmetrics Ping"
#: The person the ping records it for, unless ``--identity`` names another.
DEFAULT_IDENTITY = "kissmetrics-ping"

#: ``report(hop, detail)``: called once per hop that worked, in order.
Report = Callable[[str, str], None]


class PingFailed(Exception):
    """A hop failed; ``str()`` is the one line that names it."""

    def __init__(self, hop: str, message: str) -> None:
        super().__init__(f"{hop}: {message}")
        self.hop = hop


def run(identity: str, timeout: float, report: Report, api_key: str | None = None) -> str:
    """Send the ping event for ``identity``; return its token, or raise :class:`PingFailed`.

    Each hop that worked is passed to ``report``; the whole ping ends within about
    ``timeout`` seconds. ``api_key`` names the site (one of ``SITES``); default ``API_KEY``.
    """
    deadline = time.monotonic() + timeout
    try:
        conf = get_settings()
    except ConfigurationError as exc:
        raise PingFailed("settings", str(exc)) from None
    key = api_key or conf.API_KEY
    if not key:
        hint = " (SITES is set: name a site with --api-key)" if conf.SITES else ""
        raise PingFailed("settings", f'KISSMETRICS["API_KEY"] is not set: nothing is sent{hint}')
    if conf.BACKEND in ("disabled", "locmem"):
        raise PingFailed("settings", f'KISSMETRICS["BACKEND"] is {conf.BACKEND!r}: nothing is sent')
    token = secrets.token_hex(8)
    command = make_record(identity, EVENT, {"token": token}, api_key=key)
    which = "--api-key" if api_key else "API_KEY"
    report(
        "settings",
        f"BACKEND {conf.BACKEND!r}, TRACKING_URL {conf.TRACKING_URL}, "
        f"{which} {_masked(key)}; sending {EVENT!r} for {identity!r}, token {token}",
    )
    if conf.BACKEND == "celery":
        _through_celery(conf, command, deadline, report)
    elif conf.BACKEND == "tasks":
        try:
            from .tasks_backend import ping_through_tasks
        except ImportError:
            raise PingFailed("tasks", "Django Tasks is not installed (check E006)") from None
        ping_through_tasks(conf, command, deadline, report)
    else:
        report("delivery", f"BACKEND {conf.BACKEND!r}: straight from this process")
        _direct(conf, command, deadline, report)
    return token


def _masked(key: str) -> str:
    return f"{key[:4]}... ({len(key)} characters)" if len(key) > 8 else "(set)"


def _direct(conf: Settings, command: Command, deadline: float, report: Report) -> None:
    wait = max(0.1, min(conf.TIMEOUT, deadline - time.monotonic()))
    key = command.api_key or conf.API_KEY or ""
    client = KissmetricsClient(key, url=conf.TRACKING_URL, timeout=wait)
    started = time.monotonic()
    try:
        status: int | None = client.send(command)
        error = None
    except TrackingError as exc:
        status, error = exc.status, str(exc)
    _tracker_answer(conf.TRACKING_URL, status, error, time.monotonic() - started, "", report)


def deliver_once(wire: list[Any] | dict[str, Any]) -> dict[str, Any]:
    """The ping task's work on a worker, Celery's or Django Tasks': send the event once.

    The answer names the hop: ``worker configuration`` (with ``error``) when the worker's own
    settings fail, such as a worker without an API key, which must not read as the tracking
    server's fault; else ``tracking server``, with its ``url``, ``status`` and ``error``.
    No retries: the command is waiting for the answer.
    """
    command = Command.from_wire(wire)
    try:
        conf = get_settings()
        api = delivery.client(command.api_key)
    except ConfigurationError as exc:
        return {"hop": "worker configuration", "error": str(exc)}
    answer: dict[str, Any] = {
        "hop": "tracking server",
        "url": conf.TRACKING_URL,
        "status": None,
        "error": None,
    }
    try:
        answer["status"] = api.send(command)
    except TrackingError as exc:
        answer.update(status=exc.status, error=str(exc))
    except Exception as exc:  # Whatever else failed on the worker: say what it was.
        answer["error"] = f"{type(exc).__name__}: {exc}"
    return answer


def worker_answer(
    answer: dict[str, Any], conf: Settings, worker: str, took: float, report: Report
) -> None:
    """Report what :func:`deliver_once` returned on ``worker``, or raise the hop that failed."""
    if answer.get("hop") == "worker configuration":
        raise PingFailed(
            "worker configuration",
            f"{worker} took the task but cannot deliver: {answer.get('error')} in "
            "the worker's settings (does its environment lack KISSMETRICS_API_KEY, "
            "which this process has?)",
        )
    _tracker_answer(
        answer.get("url", conf.TRACKING_URL),
        answer.get("status"),
        answer.get("error"),
        took,
        f" (from {worker})",
        report,
    )


def _tracker_answer(
    url: str, status: int | None, error: str | None, took: float, where: str, report: Report
) -> None:
    if status is not None and 200 <= status < 300:
        report("tracking server", f"{url} answered {status} in {took:.2f} s{where}")
        return
    if status is not None:
        raise PingFailed("tracking server", f"tracking server answered {status} at {url}{where}")
    raise PingFailed("tracking server", f"tracking server unreachable at {url}{where}: {error}")


def _through_celery(conf: Settings, command: Command, deadline: float, report: Report) -> None:
    try:
        app = loaded_celery_app()
    except ImportError:
        raise PingFailed(
            "celery", 'BACKEND is "celery" but Celery is not installed (check E003)'
        ) from None
    if app is None:
        raise PingFailed("celery", "no Celery app is loaded (see check W003)")
    from kombu import Exchange, Queue
    from kombu.utils.url import maybe_sanitize_url

    from .tasks import ping

    if app.conf.task_always_eager:
        report("celery", "CELERY_TASK_ALWAYS_EAGER: tasks run in this process, no broker")
        _direct(conf, command, deadline, report)
        return
    queue = conf.CELERY_QUEUE or app.conf.task_default_queue
    timeout = deadline - time.monotonic()
    connection = app.connection_for_write(connect_timeout=max(0.1, min(timeout, 10)))
    # as_uri() alone shows an empty password as ":**@"; this masks only a real one.
    uri = maybe_sanitize_url(connection.as_uri(include_password=True))
    with connection:
        try:
            connection.ensure_connection(max_retries=0)
        except Exception as exc:
            raise PingFailed("broker", f"broker unreachable at {uri}: {exc}") from None
        report("broker", f"reachable at {uri}")
        name = f"django_kissmetrics.ping.{command.properties['token']}"
        # On the default exchange: a message routed by the queue's name, no binding left
        # behind. auto_delete and expires: the queue goes when the ping stops listening.
        reply_queue = Queue(
            name,
            exchange=Exchange(""),
            routing_key=name,
            durable=False,
            auto_delete=True,
            expires=max(timeout, 1) + 60,
        )
        # kombu takes a Queue here as well as a name; its type stubs know only the name.
        replies = connection.SimpleQueue(reply_queue, no_ack=True)  # type: ignore[arg-type]
        try:
            started = time.monotonic()
            try:
                ping.apply_async(
                    args=(command.to_wire(), name),
                    queue=conf.CELERY_QUEUE,  # type: ignore[arg-type]  # None: the default.
                    # A worker started later must not send a ping nobody waits for.
                    expires=max(timeout, 1),
                    retry=False,
                )
            except Exception as exc:
                raise PingFailed("broker", f"could not queue the ping at {uri}: {exc}") from None
            taken = _reply(replies, deadline)
            if taken is None:
                raise PingFailed(
                    "worker",
                    f"no worker consumed the ping task from queue {queue!r} in {timeout:.0f} s "
                    f"(is `celery -A proj worker` running on {uri}? A worker started before "
                    "this version has no django_kissmetrics.ping task: restart it)",
                )
            worker = taken.get("worker", "a worker")
            report(
                "worker",
                f"{worker} took the task from queue {queue!r} in "
                f"{time.monotonic() - started:.2f} s",
            )
            started = time.monotonic()
            answer = _reply(replies, deadline)
            if answer is None:
                raise PingFailed(
                    "tracking server",
                    f"{worker} took the task but reported no answer from the tracking server "
                    f"in {timeout:.0f} s",
                )
            worker_answer(answer, conf, worker, time.monotonic() - started, report)
        finally:
            replies.close()
            with contextlib.suppress(Exception):
                reply_queue(connection.default_channel).delete()


def _reply(replies: Any, deadline: float) -> dict[str, Any] | None:
    """The next reply from the worker, or ``None`` once ``deadline`` passed."""
    from queue import Empty

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    try:
        message = replies.get(block=True, timeout=remaining)
    except Empty:
        return None
    payload: dict[str, Any] = message.payload
    return payload
