"""The pytest plugin (entry point ``pytest11``): the ``km_outbox`` fixture for your tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .commands import Command


@pytest.fixture
def km_outbox() -> Iterator[list[Command]]:
    """Switch to the ``locmem`` backend and yield the (empty) outbox of sent commands."""
    from django.conf import settings
    from django.test import override_settings

    from .testing import outbox

    config = dict(getattr(settings, "KISSMETRICS", None) or {})
    config["BACKEND"] = "locmem"
    if not config.get("API_KEY"):
        config["API_KEY"] = "test-key"
    with override_settings(KISSMETRICS=config):
        outbox.clear()
        try:
            yield outbox
        finally:
            outbox.clear()
