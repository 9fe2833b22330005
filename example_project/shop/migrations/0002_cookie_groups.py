"""The demo's cookie group for django-cookie-consent: "analytics", holding Kissmetrics' cookies."""

from django.db import migrations

KISSMETRICS_COOKIES = [
    ("km_ai", "Kissmetrics: your anonymous id, shared by the site and the browser library."),
    ("km_ni", "Kissmetrics: your named identity, written by the browser library."),
]


def add_group(apps, schema_editor):
    CookieGroup = apps.get_model("cookie_consent", "CookieGroup")
    Cookie = apps.get_model("cookie_consent", "Cookie")
    group, _ = CookieGroup.objects.get_or_create(
        varname="analytics",
        defaults={
            "name": "Analytics",
            "description": "Kissmetrics: which pages you visit and what you buy.",
        },
    )
    for name, description in KISSMETRICS_COOKIES:
        Cookie.objects.get_or_create(
            cookiegroup=group, name=name, domain="", defaults={"description": description}
        )


def remove_group(apps, schema_editor):
    apps.get_model("cookie_consent", "CookieGroup").objects.filter(varname="analytics").delete()


class Migration(migrations.Migration):
    dependencies = [
        ("shop", "0001_initial"),
        ("cookie_consent", "0004_cookie_natural_key"),
    ]

    operations = [migrations.RunPython(add_group, remove_group)]
