from __future__ import annotations

from allauth.account.views import SignupView
from django.contrib.auth import views as auth_views
from django.urls import include, path

from . import views

urlpatterns = [
    path("", views.page, name="page"),
    path("record/", views.record, name="record"),
    path("async-record/", views.async_record),
    path("nothing/", views.nothing),
    path("user/", views.user_page),
    path("js/", views.browser_then_redirect),
    path("atomic/", views.atomic),
    path("signup/", views.signup),
    path("invite/", views.invite),
    path("cached/", views.cached),
    path("boom/", views.boom),
    path("admin/thing/", views.record),
    path("login/", auth_views.LoginView.as_view(template_name="login.html")),
    path("logout/", auth_views.LogoutView.as_view()),
    path("accounts/signup/", SignupView.as_view(), name="account_signup"),
]

urlpatterns += [
    path("browser/page/", views.browser_page),
    path("browser/commands/", views.browser_commands),
    path("browser/tag/", views.browser_tag),
    path("browser/csp/", views.browser_csp),
    path("browser/vector/", views.browser_vector),
    path("browser/triggers/", views.browser_triggers),
]

urlpatterns += [
    path("cookies/", include("cookie_consent.urls")),
    path("consent/page/", views.consent_page),
    path("consent/explicit/", views.consent_explicit),
    path("consent/identify/", views.consent_identify),
    path("consent/named/", views.consent_named),
    path("consent/async-named/", views.async_consent_named),
]
