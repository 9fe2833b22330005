"""WSGI config, exactly as ``django-admin startproject`` writes it."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.site.settings")

application = get_wsgi_application()
