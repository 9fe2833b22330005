"""URLs of the toolbar test site (tests/panel_site.py): the toolbar's own, and the suite's.

A module of its own: the toolbar's URLs import its models, which need it installed, and
it is installed only while a panel test runs.
"""

from __future__ import annotations

from django.urls import include, path

from tests.panel_site import buy, shop
from tests.urls import urlpatterns as site_urls

urlpatterns = [
    path("shop/", shop),
    path("buy/", buy),
    path("__debug__/", include("debug_toolbar.urls")),
    *site_urls,
]
