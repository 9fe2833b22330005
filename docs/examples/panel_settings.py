# proj/settings.py
from debug_toolbar.settings import PANELS_DEFAULTS

DEBUG_TOOLBAR_PANELS = [*PANELS_DEFAULTS, "django_kissmetrics.panels.KissmetricsPanel"]
