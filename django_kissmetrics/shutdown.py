"""Flush the publisher when the process is told to stop, under any server.

Exit hooks are not enough: uvicorn puts back the default SIGTERM handler after its
graceful shutdown and raises the signal again, so the process dies by it and no exit
hook runs. So when the app loads in the main thread, a SIGTERM and SIGINT handler is
put in front of the one in place (the server's own, which it then calls). On a stop it
flushes what the publisher holds, and from then on the publisher publishes each
submission at once, in the caller: requests that finish during the graceful shutdown
are published before they are answered, so nothing waits in a window when the
process ends.

Servers that install their handlers after loading the app (daphne, hypercorn, Celery)
replace this one; they end the process normally, and the exit hook flushes.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from . import publisher

__all__ = ["install"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_previous: dict[int, Any] = {}


def _on_stop(signum: int, frame: FrameType | None) -> None:
    previous = _previous.get(signum, signal.SIG_DFL)
    if previous is signal.SIG_IGN:
        return
    publisher.stop_signalled()
    if callable(previous):
        previous(signum, frame)
        return
    # The default action (end the process) once the commands are out.
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def install() -> bool:
    """Chain the stop handler in front of the current SIGTERM and SIGINT handlers.

    Only from the main thread (Python allows no other) and once per process. True when
    installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in _SIGNALS:
        current = signal.getsignal(signum)
        if current is _on_stop or current is None:
            continue  # None: a handler not set from Python, which cannot be chained.
        _previous[signum] = current
        signal.signal(signum, _on_stop)
    return True
