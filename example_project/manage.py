#!/usr/bin/env python
"""The demo site's command line: ``python manage.py migrate``, ``runserver``, ..."""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Run a Django management command with the demo's settings."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
