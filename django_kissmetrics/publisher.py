"""A per-process publisher that puts commands on the Celery queue off the request thread.

A request only appends its commands to a bounded in-memory queue (microseconds); a
daemon thread publishes one Celery message per short window, coalescing the commands
of several requests. Started lazily, restarted after ``fork``, flushed at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence

from .commands import Command
from .conf import get_settings

logger = logging.getLogger(__name__)

__all__ = ["Publisher", "get_publisher", "publish"]

#: The most commands one Celery message carries.
MAX_BATCH = 500
_STOP = object()


def publish(commands: Sequence[Command]) -> None:
    """Publish one Celery message now; on failure log the commands or deliver them.

    Never raises: this runs where nobody could handle an error.
    """
    from celery.result import EagerResult

    from . import delivery
    from .tasks import deliver

    conf = get_settings()
    try:
        result = deliver.apply_async(
            args=([c.to_dict() for c in commands],),
            queue=conf.CELERY_QUEUE,  # type: ignore[arg-type]  # None: the default queue.
            # Celery's default retry policy holds the caller for seconds when the broker
            # is down; fail fast instead and fall back below.
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.1},
        )
        # Only an eager run (CELERY_TASK_ALWAYS_EAGER) can have failed by now: it swallows
        # the task's exception into the result. A real AsyncResult must not be asked: that
        # is a round trip to the result backend, and without one it raises, which would
        # report a queued batch as lost (and deliver it twice with ON_ENQUEUE_FAILURE="sync").
        if isinstance(result, EagerResult) and result.failed():
            delivery.give_up(commands, result.result, "eager delivery failed")
    except Exception as exc:
        if conf.ON_ENQUEUE_FAILURE == "sync":
            logger.warning("Kissmetrics: could not queue (%s); delivering directly", exc)
            delivery.deliver_now(commands, "broker down, direct delivery failed")
        else:
            delivery.give_up(commands, exc, "could not queue")


class Publisher:
    """The background thread and its bounded queue."""

    def __init__(self, maxsize: int, window: float) -> None:
        self.queue: queue.Queue[object] = queue.Queue(maxsize)
        self.window = window
        self.thread = threading.Thread(target=self._run, name="kissmetrics-publisher", daemon=True)
        self.thread.start()

    def submit(self, commands: Sequence[Command]) -> None:
        """Hand ``commands`` over without blocking; log them if the queue is full."""
        try:
            self.queue.put_nowait(list(commands))
        except queue.Full:
            from .delivery import give_up

            give_up(commands, None, "publisher queue full")

    def flush(self, timeout: float = 5.0) -> None:
        """Publish everything submitted so far; wait at most ``timeout`` seconds."""
        done = threading.Event()
        try:
            self.queue.put(done, timeout=timeout)
        except queue.Full:
            return
        done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Flush and end the thread."""
        self.flush(timeout)
        try:
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            batch: list[Command] = []
            waiters: list[threading.Event] = []
            stop = False
            deadline = time.monotonic() + self.window
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, threading.Event):
                    waiters.append(item)
                else:
                    batch.extend(item)  # type: ignore[arg-type]
                if stop or waiters or len(batch) >= MAX_BATCH:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self.queue.get(timeout=remaining)
                except queue.Empty:
                    break
            for start in range(0, len(batch), MAX_BATCH):
                publish(batch[start : start + MAX_BATCH])
            for waiter in waiters:
                waiter.set()
            if stop:
                return


_publisher: Publisher | None = None
_lock = threading.Lock()


def get_publisher() -> Publisher:
    """This process's publisher, started on first use."""
    global _publisher
    if _publisher is None:
        with _lock:
            if _publisher is None:
                conf = get_settings()
                _publisher = Publisher(conf.PUBLISH_QUEUE_SIZE, conf.PUBLISH_WINDOW)
    return _publisher


def flush(timeout: float = 5.0) -> None:
    """Publish whatever this process has queued (no-op when nothing was started)."""
    if _publisher is not None:
        _publisher.flush(timeout)


def _after_fork() -> None:
    # The thread does not exist in a forked child; the child starts its own on first use.
    global _publisher, _lock
    _publisher = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
# Flush while thread pools still accept work: plain atexit handlers run only after
# threading has shut them down, and a batch's delivery needs one (eager mode, "sync").
# This is the hook concurrent.futures itself uses; atexit is the fallback.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(flush)
else:  # pragma: no cover
    atexit.register(flush)
