"""What a Celery worker checks before it consumes: it must be able to deliver.

The web process often reads the API key from the environment (``KISSMETRICS_API_KEY``)
and the worker's unit file forgets it. Such a worker would take every delivery task and
could send none of them, so it refuses to start its consumer: the messages wait in the
broker for a worker that can deliver them.
"""

from __future__ import annotations

import functools
from typing import Any

from .conf import ConfigurationError, Settings, get_settings

__all__ = ["NO_API_KEY", "check_can_deliver", "install"]

#: The one line that says what is missing and where to put it.
NO_API_KEY = (
    "KISSMETRICS['API_KEY'] is not set in this worker, so it cannot deliver any "
    "Kissmetrics command. Give the worker the key the web processes have (the settings "
    "usually read it from the KISSMETRICS_API_KEY environment variable: set it in the "
    "worker's environment too), or set KISSMETRICS['BACKEND'] = 'disabled' where "
    "tracking is meant to be off."
)


def check_can_deliver(conf: Settings | None = None) -> None:
    """Raise :class:`ConfigurationError` when this process would deliver without a key.

    Only the ``celery`` backend hands commands to workers; with any other backend a
    worker never sees a delivery task and needs no key. With ``SITES`` each command
    carries its site's key, so a worker needs none of its own.
    """
    conf = conf or get_settings()
    if conf.BACKEND == "celery" and not conf.API_KEY and not conf.SITES:
        raise ConfigurationError(NO_API_KEY)


# Celery is optional: the step class is made only where a worker starts.
@functools.cache
def _step_class() -> type[Any]:
    from celery import bootsteps

    class RequireApiKey(bootsteps.StartStopStep):
        """A worker bootstep that stops the worker before its consumer starts.

        Celery catches what a signal handler raises and starts the worker anyway; an
        error raised by a bootstep's ``start`` ends the worker with "Unrecoverable
        error" and exit status 1. The consumer is the worker's last step, so it never
        starts.
        """

        label = "Kissmetrics API key"

        def start(self, worker: Any) -> None:
            check_can_deliver()

    return RequireApiKey


def _add_step(sender: Any = None, **kwargs: Any) -> None:
    # worker_init comes before the worker builds its blueprint from app.steps.
    steps = sender.app.steps["worker"]
    if not any(getattr(step, "label", None) == "Kissmetrics API key" for step in steps):
        steps.add(_step_class())


def install() -> None:
    """Add the key check to every Celery worker this process starts (``AppConfig.ready``)."""
    try:
        from celery.signals import worker_init
    except ImportError:
        return
    worker_init.connect(_add_step, dispatch_uid="django_kissmetrics.require_api_key")
