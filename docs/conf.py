"""Sphinx configuration: MyST Markdown pages, the furo theme, the settings-table directive."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# The package from this checkout (unless an installed one comes first), and the extension.
sys.path[:0] = [str(DOCS / "_ext"), str(DOCS.parent)]

import django_kissmetrics  # noqa: E402

project = "django-kissmetrics"
author = "django-kissmetrics contributors"
copyright = "django-kissmetrics contributors"
release = version = django_kissmetrics.__version__

extensions = ["myst_parser", "kissmetrics_settings"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "examples/README.md"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
html_theme = "furo"
html_title = f"django-kissmetrics {release}"
# Pages written for GitHub name the images beside them; nothing else to copy.
html_static_path: list[str] = []
