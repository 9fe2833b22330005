"""One stored hit of the stand-in tracking API."""

from __future__ import annotations

from django.db import models


class Hit(models.Model):
    """A request to ``/e`` (event), ``/s`` (properties) or ``/a`` (alias), as received."""

    KINDS = {"/e": "record", "/s": "set", "/a": "alias"}

    path = models.CharField(max_length=2)
    key = models.CharField(max_length=255, blank=True)
    person = models.CharField(max_length=255)
    #: The event name of ``/e``; the second identity of ``/a``.
    name = models.CharField(max_length=255, blank=True)
    properties = models.JSONField(default=dict)
    #: ``_t``: when it happened, as the sender says (Unix seconds).
    timestamp = models.BigIntegerField(null=True, blank=True)
    received = models.DateTimeField(auto_now_add=True)
    user_agent = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ("id",)

    def __str__(self) -> str:
        return f"{self.path} {self.person} {self.name}"

    @property
    def kind(self) -> str:
        """``record``, ``set`` or ``alias``."""
        return self.KINDS.get(self.path, self.path)

    @property
    def source(self) -> str:
        """``browser`` for a hit a web page sent, ``server`` for one this package sent."""
        return "browser" if "Mozilla/" in self.user_agent else "server"
