"""A per-process publisher that puts commands on the Celery queue off the request thread.

A request only appends its commands to a bounded in-memory buffer (well under a
microsecond); a daemon thread publishes one Celery message per short window, coalescing
the commands of several requests. Started lazily, restarted after ``fork``, flushed at exit
and when a stop is signalled. What the broker does not take goes to the spool
(:mod:`django_kissmetrics.spool`), which the thread replays once the broker is back.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
from collections.abc import Sequence

from . import undelivered
from .commands import Command, loggable
from .conf import get_settings

logger = logging.getLogger(__name__)

__all__ = [
    "Publisher",
    "flush",
    "get_publisher",
    "publish",
    "publish_inline",
    "stop",
    "stop_signalled",
    "try_publish",
]

#: The most commands one Celery message carries.
MAX_BATCH = 500


def try_publish(commands: Sequence[Command]) -> BaseException | None:
    """Publish one Celery message; return the broker's error, or None once it is queued.

    With ``BACKEND = "tasks"`` it enqueues one Django Tasks task instead.
    """
    if get_settings().BACKEND == "tasks":
        from .tasks_backend import try_enqueue

        return try_enqueue(commands)
    from celery.result import EagerResult

    from .tasks import deliver

    try:
        result = deliver.apply_async(
            args=([c.to_wire() for c in commands],),
            queue=get_settings().CELERY_QUEUE,  # type: ignore[arg-type]  # None: the default.
            # Celery would otherwise put a repr() of every command in the message
            # headers for monitoring tools: the dearest part of publishing a batch.
            argsrepr=f"[<{len(commands)} Kissmetrics commands>]",  # type: ignore[call-arg]
            kwargsrepr="{}",
            # Celery's default retry policy holds the caller for seconds when the broker
            # is down; fail fast instead and fall back.
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.1},
        )
    except Exception as exc:
        return exc
    # Only an eager run (CELERY_TASK_ALWAYS_EAGER) can have failed by now: it swallows
    # the task's exception into the result. A real AsyncResult must not be asked: that
    # is a round trip to the result backend, and without one it raises, which would
    # report a queued batch as lost (and deliver it twice with ON_ENQUEUE_FAILURE="sync").
    if isinstance(result, EagerResult) and result.failed():
        undelivered.give_up(commands, result.result, "eager delivery failed")
    return None


def publish(commands: Sequence[Command]) -> bool:
    """Publish one Celery message now; if the broker fails, spool, deliver or log them.

    Never raises: this runs where nobody could handle an error. True when queued.
    """
    exc = try_publish(commands)
    if exc is None:
        return True
    undelivered.unqueued(commands, exc)
    return False


def publish_inline(commands: Sequence[Command]) -> None:
    """Publish in the calling thread (``PUBLISH = "inline"``); never raises.

    The caller does not touch the disk: what the broker refuses is handed to the
    publisher thread, which spools it (or delivers or logs it, as ``ON_ENQUEUE_FAILURE``
    says). Once a stop was signalled the caller deals with it itself.
    """
    exc = try_publish(commands)
    if exc is None:
        return
    if _stop_signalled or get_settings().ON_ENQUEUE_FAILURE == "log":
        undelivered.unqueued(commands, exc)
    else:
        get_publisher().take_unqueued(commands, exc)


#: Seconds between probes of a broker that failed: doubling from the first to the last.
PROBE_FIRST = 0.25
PROBE_MAX = 5.0


class Publisher:
    """The background thread and its bounded buffer.

    A request's hand-over is a ``deque.append``: no lock, and the thread is woken only
    by the first submission of a window, not by every request.

    When the broker fails, the batch goes to the spool and so does every later one
    (in order) until a probe finds the broker back: the thread then replays the spool,
    oldest first, and publishes normally again. It also replays what other processes
    left: at start, and whenever entries are due.
    """

    def __init__(self, maxsize: int, window: float) -> None:
        self.maxsize = maxsize
        self.window = window
        #: Submitted batches not yet published.
        self.pending: collections.deque[Sequence[Command]] = collections.deque()
        #: Batches published inline that the broker did not take, with its error.
        self.unqueued: collections.deque[tuple[Sequence[Command], BaseException]] = (
            collections.deque()
        )
        self._waiters: collections.deque[threading.Event] = collections.deque()
        self._wake = threading.Event()  # Something to publish, or a flush.
        self._hurry = threading.Event()  # A flush: end the window now.
        self._scheduled = False
        self._stopping = False
        #: A stop was signalled: publish each submission at once, in the caller.
        self.stop_signalled = _stop_signalled
        #: Held while a batch is being published, so that a caller publishing at stop
        #: waits for the thread's batch in flight rather than racing it.
        self._publishing = threading.Lock()
        #: The commands being published now (by the thread or a caller at stop).
        self.in_flight: Sequence[Command] = ()
        #: The broker failed: new batches go straight to the spool until a probe works.
        self.outage = False
        self._probe = PROBE_FIRST
        #: time.monotonic() of the next replay; None: nothing known to be due.
        self._replay_at: float | None = time.monotonic()  # What earlier processes left.
        self.thread = threading.Thread(target=self._run, name="kissmetrics-publisher", daemon=True)
        self.thread.start()

    def submit(self, commands: Sequence[Command]) -> None:
        """Hand ``commands`` over without blocking; log them if the buffer is full."""
        if len(self.pending) >= self.maxsize:
            undelivered.give_up(commands, None, "publisher queue full")
            return
        self.pending.append(tuple(commands))
        if self.stop_signalled:
            # The process may end as soon as this request is answered (uvicorn kills
            # itself with the signal): do not leave the commands to the thread's window.
            with self._publishing:
                self._publish_pending()
            return
        if not self._scheduled:
            self._scheduled = True
            self._wake.set()

    def take_unqueued(self, commands: Sequence[Command], exc: BaseException) -> None:
        """Spool (or deliver) commands an inline publish could not queue, in this thread."""
        self.unqueued.append((tuple(commands), exc))
        self._wake.set()

    def replay_after(self, delay: float) -> None:
        """Replay the spool in ``delay`` seconds (sooner if already due)."""
        due = time.monotonic() + delay
        if self._replay_at is None or due < self._replay_at:
            self._replay_at = due
        self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Publish everything submitted so far; wait at most ``timeout`` seconds.

        False when the thread did not finish in time.
        """
        if not self.thread.is_alive():
            return True
        done = threading.Event()
        self._waiters.append(done)
        self._hurry.set()
        self._wake.set()
        return done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Flush and end the thread."""
        self._stopping = True
        self.flush(timeout)
        self.thread.join(timeout)

    def flush_or_report(self, timeout: float, when: str) -> bool:
        """:meth:`flush`; then log at ERROR, in full, whatever the thread still holds.

        At a stop or at exit: the process may end before the thread publishes what it
        did not get to within ``timeout`` (a machine so busy that the thread is not
        scheduled, a broker that hangs), and that must not go unseen. True when nothing
        was left.
        """
        if self.flush(timeout):
            return True
        held = [*self.in_flight, *(c for batch in list(self.pending) for c in batch)]
        if held:
            logger.error(
                "Kissmetrics: %d command(s) not yet published %.1f s after %s; they are "
                "lost if the process ends before the publisher thread sends them: %s",
                len(held),
                timeout,
                when,
                loggable(held),
            )
        return not held

    def _publish_pending(self) -> None:
        batch: list[Command] = []
        while self.pending:
            batch.extend(self.pending.popleft())
        while self.unqueued:
            self._broker_failed(*self.unqueued.popleft())
        for start in range(0, len(batch), MAX_BATCH):
            chunk = batch[start : start + MAX_BATCH]
            self.in_flight = chunk
            try:
                if self.outage:
                    undelivered.keep(chunk, None, "broker down", replay=False)
                elif publish(chunk) is False:
                    self._broker_failed()
            finally:
                self.in_flight = ()

    def _broker_failed(
        self, commands: Sequence[Command] = (), exc: BaseException | None = None
    ) -> None:
        if commands and exc is not None:
            undelivered.unqueued(commands, exc)
        how = get_settings().ON_ENQUEUE_FAILURE
        if how == "log":
            return
        self.outage = how == "spool"
        # Probe soon: the broker may be back in a moment; later probes back off.
        due = time.monotonic() + PROBE_FIRST
        if self._replay_at is None or self._replay_at > due:
            self._probe = PROBE_FIRST
            self._replay_at = due

    def _replay(self) -> None:
        from .spool import SpoolError, get_spool, replay

        self._replay_at = None
        spool = get_spool()
        if spool is None:
            self.outage = False
            return
        try:
            with self._publishing:
                sent, error = replay(spool, try_publish)
            due = spool.next_due()
        except SpoolError as exc:
            logger.error("Kissmetrics: could not replay the spool: %s", exc)
            self.outage = False
            return
        if error is not None:
            # The broker is still away: probe again later, less often each time.
            self.outage = get_settings().ON_ENQUEUE_FAILURE == "spool"
            self._probe = min(self._probe * 2, PROBE_MAX)
            self._replay_at = time.monotonic() + self._probe
            return
        if sent:
            logger.info("Kissmetrics: replayed %d spooled command(s)", sent)
        self.outage = False
        self._probe = PROBE_FIRST
        if due is not None:
            # Entries another process holds, or a worker's that wait out their delay.
            self._replay_at = time.monotonic() + max(due - time.time(), PROBE_FIRST)

    def _run(self) -> None:
        while True:
            timeout = None
            if self._replay_at is not None:
                timeout = max(self._replay_at - time.monotonic(), 0.0)
            if self._wake.wait(timeout):
                self._wake.clear()
                # Let the window fill so that one message carries many requests'
                # commands; a flush cuts it short.
                self._hurry.wait(self.window)
                self._hurry.clear()
                self._scheduled = False
                # Waiters are taken before the commands: whatever was submitted before
                # a flush() began is then in this round.
                waiters = [self._waiters.popleft() for _ in range(len(self._waiters))]
                with self._publishing:
                    self._publish_pending()
                for waiter in waiters:
                    waiter.set()
                if self._stopping:
                    return
            if self._replay_at is not None and time.monotonic() >= self._replay_at:
                try:
                    self._replay()
                except Exception:  # The thread must live on: it carries every request.
                    logger.exception("Kissmetrics: replaying the spool failed")


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
                # A stop signalled while it was being made saw no publisher to tell.
                _publisher.stop_signalled = _publisher.stop_signalled or _stop_signalled
    return _publisher


def _replay_spooled(delay: float) -> None:
    # Commands this process spooled (a worker's, past MAX_RETRIES): its publisher
    # thread replays them through the broker once due, unless another process does first.
    get_publisher().replay_after(delay)


undelivered.on_spooled(_replay_spooled)


def flush(timeout: float = 5.0) -> None:
    """Publish whatever this process has queued (no-op when nothing was started)."""
    if _publisher is not None:
        _publisher.flush(timeout)


def stop(timeout: float = 5.0) -> None:
    """Flush and end this process's publisher; the next submission starts a fresh one."""
    global _publisher
    with _lock:
        current, _publisher = _publisher, None
    if current is not None:
        current.stop(timeout)


#: A stop was signalled to this process (see :mod:`django_kissmetrics.shutdown`).
_stop_signalled = False


def stop_signalled(timeout: float = 5.0) -> None:
    """The process is stopping: publish now, and publish every later submission at once."""
    global _stop_signalled
    _stop_signalled = True
    current = _publisher
    if current is None:
        return
    current.stop_signalled = True
    if threading.current_thread() is not current.thread:
        # The thread publishes, not this one: a signal handler can interrupt a thread
        # that holds the broker connection's locks, and would then wait on itself.
        current.flush_or_report(timeout, "a stop was signalled")


def _at_exit(timeout: float = 5.0) -> None:
    # The last chance: the publisher thread is a daemon, gone with the interpreter.
    current = _publisher
    if current is not None and threading.current_thread() is not current.thread:
        current.flush_or_report(timeout, "the process began to exit")


def _after_fork() -> None:
    # The thread does not exist in a forked child; the child starts its own on first use.
    global _publisher, _lock, _stop_signalled
    _publisher = None
    _lock = threading.Lock()
    _stop_signalled = False


os.register_at_fork(after_in_child=_after_fork)
# Flush while thread pools still accept work: plain atexit handlers run only after
# threading has shut them down, and a batch's delivery needs one (eager mode, "sync").
# This is the hook concurrent.futures itself uses; atexit is the fallback.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_at_exit)
else:  # pragma: no cover
    atexit.register(_at_exit)
