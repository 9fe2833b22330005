"""A per-process publisher that puts commands on the Celery queue off the request thread.

A request only appends its commands to a bounded in-memory buffer (well under a
microsecond); a daemon thread publishes one Celery message per short window, coalescing
the commands of several requests. Started lazily, restarted after ``fork``, flushed at exit.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
from collections.abc import Sequence

from .commands import Command
from .conf import get_settings

logger = logging.getLogger(__name__)

__all__ = ["Publisher", "get_publisher", "publish"]

#: The most commands one Celery message carries.
MAX_BATCH = 500


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
            args=([c.to_wire() for c in commands],),
            queue=conf.CELERY_QUEUE,  # type: ignore[arg-type]  # None: the default queue.
            # Celery would otherwise put a repr() of every command in the message
            # headers for monitoring tools: the dearest part of publishing a batch.
            argsrepr=f"[<{len(commands)} Kissmetrics commands>]",  # type: ignore[call-arg]
            kwargsrepr="{}",
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
    """The background thread and its bounded buffer.

    A request's hand-over is a ``deque.append``: no lock, and the thread is woken only
    by the first submission of a window, not by every request.
    """

    def __init__(self, maxsize: int, window: float) -> None:
        self.maxsize = maxsize
        self.window = window
        #: Submitted batches not yet published.
        self.pending: collections.deque[Sequence[Command]] = collections.deque()
        self._waiters: collections.deque[threading.Event] = collections.deque()
        self._wake = threading.Event()  # Something to publish, or a flush.
        self._hurry = threading.Event()  # A flush: end the window now.
        self._scheduled = False
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="kissmetrics-publisher", daemon=True)
        self.thread.start()

    def submit(self, commands: Sequence[Command]) -> None:
        """Hand ``commands`` over without blocking; log them if the buffer is full."""
        if len(self.pending) >= self.maxsize:
            from .delivery import give_up

            give_up(commands, None, "publisher queue full")
            return
        self.pending.append(tuple(commands))
        if not self._scheduled:
            self._scheduled = True
            self._wake.set()

    def flush(self, timeout: float = 5.0) -> None:
        """Publish everything submitted so far; wait at most ``timeout`` seconds."""
        if not self.thread.is_alive():
            return
        done = threading.Event()
        self._waiters.append(done)
        self._hurry.set()
        self._wake.set()
        done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Flush and end the thread."""
        self._stopping = True
        self.flush(timeout)
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            # Let the window fill so that one message carries many requests' commands;
            # a flush cuts it short.
            self._hurry.wait(self.window)
            self._hurry.clear()
            self._scheduled = False
            # Waiters are taken before the commands: whatever was submitted before a
            # flush() began is then in this round.
            waiters = [self._waiters.popleft() for _ in range(len(self._waiters))]
            batch: list[Command] = []
            for _ in range(len(self.pending)):
                batch.extend(self.pending.popleft())
            for start in range(0, len(batch), MAX_BATCH):
                publish(batch[start : start + MAX_BATCH])
            for waiter in waiters:
                waiter.set()
            if self._stopping:
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
