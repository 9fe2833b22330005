"""Kissmetrics for Django: one person from the first anonymous page view to the customer.

``from django_kissmetrics import km`` and call ``km.record("Viewed Pricing")`` in a view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ConfigurationError", "KissmetricsError", "TrackingError", "km"]
__version__ = "0.1.0"

from .exceptions import KissmetricsError, TrackingError

if TYPE_CHECKING:
    from .conf import ConfigurationError
    from .tracker import km


def __getattr__(name: str) -> Any:
    # Lazy so that importing the package (in settings, in a Celery app) does not
    # import Django's ORM before the app registry is ready.
    if name == "km":
        from .tracker import km

        return km
    if name == "ConfigurationError":
        from .conf import ConfigurationError

        return ConfigurationError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
