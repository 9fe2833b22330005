"""The package's exceptions, rooted in :class:`KissmetricsError` (no Django import)."""

from __future__ import annotations


class KissmetricsError(Exception):
    """Base class of every error this package raises."""


class TrackingError(KissmetricsError):
    """The tracking server did not accept a command.

    ``status`` is the HTTP status (``None`` for a connection error or a timeout),
    ``retry_after`` the server's ``Retry-After`` in seconds when it sent one, and
    ``retriable`` tells whether sending the same command again may succeed.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @property
    def retriable(self) -> bool:
        """False for a 4xx answer other than 408 and 429: resending cannot help."""
        if self.status is None:
            return True
        return not (400 <= self.status < 500) or self.status in (408, 429)
