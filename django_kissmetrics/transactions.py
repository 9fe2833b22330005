"""Whether a call runs inside a real ``transaction.atomic()`` block, or in an event loop.

A command made inside a transaction is sent only if it commits (``on_commit``): nothing is
tracked for a signup that was rolled back.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, connections
from django.dispatch import receiver

__all__ = ["in_event_loop", "in_transaction", "running_loop"]

#: The running event loop or ``None``: asyncio's own non-raising check (in its
#: ``__all__``). ``getrunning_loop()`` raises when there is no loop, the common case
#: here, and an exception each time costs more than the rest of the check.
running_loop = asyncio._get_running_loop

#: This thread's default database connection, once looked up, with the generation below.
_thread = threading.local()
#: Changes when DATABASES does (in tests): every thread then looks its connection up again.
_generation = 0


@receiver(setting_changed, dispatch_uid="django_kissmetrics.transactions")
def _forget_connections(*, setting: str, **kwargs: Any) -> None:
    global _generation
    if setting == "DATABASES":
        _generation += 1


def in_transaction() -> bool:
    """Inside a real ``atomic()`` block (not one a TestCase wraps each test in)."""
    # A thread keeps its connection object for its whole life (Django's connections
    # are per thread), but looking it up goes through asgiref's Local and costs as
    # much as the rest of a km.record() call: look it up once per thread. Code in an
    # event loop has a connection per task, so it always asks.
    try:
        if running_loop() is not None:
            conn = connections[DEFAULT_DB_ALIAS]
        else:
            cached = getattr(_thread, "connection", None)
            if cached is None or cached[0] != _generation:
                cached = _thread.connection = (_generation, connections[DEFAULT_DB_ALIAS])
            conn = cached[1]
    except Exception:
        return False
    return conn.in_atomic_block and any(
        not getattr(block, "_from_testcase", False) for block in conn.atomic_blocks
    )


def in_event_loop() -> bool:
    """Whether this thread runs an asyncio event loop (async code must not touch the ORM)."""
    return running_loop() is not None
