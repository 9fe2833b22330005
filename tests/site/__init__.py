"""A small site the server tests run under real servers, laid out as startproject makes one.

As Celery's guide says, the project package loads its Celery app.
"""

from tests.celery_app import app as celery_app

__all__ = ["celery_app"]
