"""Signals this package sends."""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["delivery_failed"]

#: Sent once for commands that could not be delivered and will not be retried again:
#: the server refused them for good, or the spool could not keep them (full, past
#: ``SPOOL_MAX_AGE``, unusable, purged, or off with ``ON_ENQUEUE_FAILURE = "log"``).
#: Arguments: ``commands`` (a list of :class:`~django_kissmetrics.commands.Command`)
#: and ``error`` (the last exception, or ``None``).
delivery_failed = Signal()
