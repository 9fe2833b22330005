"""The demo's URLs: the shop at ``/``, the stand-in tracker at ``/tracker/``."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("shop.urls")),
    path("tracker/", include("tracker.urls")),
    path("cookies/", include("cookie_consent.urls")),
    path("admin/", admin.site.urls),
]
