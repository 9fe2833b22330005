"""The stand-in tracker's URLs: the tracking API's paths, a site script, the live page."""

from __future__ import annotations

from django.urls import path

from . import views

app_name = "tracker"
urlpatterns = [
    path("e", views.collect, {"path": "/e"}, name="record"),
    path("s", views.collect, {"path": "/s"}, name="set"),
    path("a", views.collect, {"path": "/a"}, name="alias"),
    path("<str:key>.2.js", views.site_script, name="site-script"),
    path("", views.index, name="index"),
    path("people/", views.people_fragment, name="people"),
    path("people.json", views.people_json, name="people-json"),
    path("clear/", views.clear, name="clear"),
]
