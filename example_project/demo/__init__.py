"""The demo site's project package.

The Celery app is imported here so that ``shared_task`` tasks (the package's delivery
task) bind to it whenever Django starts, in the web process as in a worker.
"""

from .celery import app as celery_app

__all__ = ["celery_app"]
