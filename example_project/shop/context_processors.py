"""Template context every page of the demo needs."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest


def demo(request: HttpRequest) -> dict[str, Any]:
    """Who Kissmetrics sees, and where the events go."""
    tracker = getattr(request, "km", None)
    return {
        "km_identity": tracker.identity if tracker is not None else None,
        "km_named": bool(tracker is not None and tracker.named),
        "tracking_url": settings.KISSMETRICS["TRACKING_URL"],
        "standin": settings.DEMO_STANDIN,
        # Not agreed to analytics yet (KISSMETRICS["CONSENT"]): the banner asks.
        "consent_pending": bool(tracker is not None and tracker.awaiting_consent),
    }
