"""How the demo names its users in Kissmetrics (the ``IDENTITY`` setting)."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser


def username(user: AbstractBaseUser) -> str:
    """The user's username: readable in the stand-in tracker, unlike a primary key."""
    return user.get_username()
