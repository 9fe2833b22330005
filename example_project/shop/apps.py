"""The shop app."""

from __future__ import annotations

from django.apps import AppConfig


class ShopConfig(AppConfig):
    """``shop``: Tinyboard, a made-up kanban service with plans to buy."""

    name = "shop"
    verbose_name = "Shop"
