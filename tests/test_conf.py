"""The KISSMETRICS setting: defaults, validation that names the key, reset on change."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from django_kissmetrics.conf import DEFAULTS, DOCS, get_settings, load


def test_defaults_fill_every_key() -> None:
    conf = load({"API_KEY": "k"})
    assert conf.TRACKING_URL == "https://trk.kissmetrics.io"
    assert conf.BACKEND == "celery"
    assert conf.COOKIE_NAME == "km_ai"
    assert conf.COOKIE_MAX_AGE == 5 * 365 * 24 * 3600
    assert conf.HONOR_DNT is True
    assert conf.enabled


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"API_KEYS": "k"}, "API_KEYS"),
        ({"TIMEOUT": "5"}, "TIMEOUT"),
        ({"HONOR_DNT": 1}, "HONOR_DNT"),
        ({"MAX_RETRIES": True}, "MAX_RETRIES"),
        ({"TRACKING_URL": "ftp://example.com"}, "TRACKING_URL"),
        ({"TRACKING_URL": "trk.kissmetrics.io"}, "TRACKING_URL"),
        ({"PUBLISH": "later"}, "PUBLISH"),
        ({"IGNORE_USER_AGENTS": "("}, "IGNORE_USER_AGENTS"),
        ({"EXCLUDE_PATHS": [1]}, "EXCLUDE_PATHS"),
        ({"SCRIPT_URLS": "//cdn.example/i.js"}, "SCRIPT_URLS"),
        ({"SCRIPT_URLS": ["//cdn.example/i.js"]}, "SCRIPT_URLS"),
        ({"SCRIPT_URLS": ["javascript:alert(1)", "/km/{key}.js"]}, "SCRIPT_URLS"),
        ({"SCRIPT_URLS": ["/km/i.js", "km.js"]}, "SCRIPT_URLS"),
        ({"SCRIPT_URLS": ["/km/i.js", "/km/ key.js"]}, "SCRIPT_URLS"),
    ],
)
def test_bad_settings_raise_naming_the_key(config: dict[str, object], key: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=repr(key).replace("[", r"\[")):
        load(config)


def test_script_urls_may_be_paths_scheme_relative_or_https() -> None:
    for urls in (
        ("/km/i.js", "https://cdn.example/km/{key}.2.js"),
        ("//a.example/i.js", "http://b.example/x"),
    ):
        loaded = load({"SCRIPT_URLS": list(urls)})
        assert list(loaded.SCRIPT_URLS) == list(urls)


def test_not_a_dict() -> None:
    with pytest.raises(ImproperlyConfigured, match="must be a dict"):
        load(["API_KEY"])


def test_no_key_means_disabled() -> None:
    assert not load({}).enabled
    assert not load({"API_KEY": "k", "BACKEND": "disabled"}).enabled


def test_cache_is_reset_when_the_setting_changes() -> None:
    before = get_settings()
    with override_settings(KISSMETRICS={"API_KEY": "other", "TIMEOUT": 1}):
        assert get_settings().API_KEY == "other"
        assert get_settings().TIMEOUT == 1.0
    assert get_settings() == before


def test_the_docs_settings_table_is_the_declaration() -> None:
    """The settings page's table is made from the fields: every key, in order, documented."""
    import re
    import sys
    from pathlib import Path

    docs = Path(__file__).parent.parent / "docs"
    assert "```{kissmetrics-settings}" in (docs / "settings.md").read_text()
    sys.path.insert(0, str(docs / "_ext"))
    try:
        from kissmetrics_settings import rows
    finally:
        sys.path.remove(str(docs / "_ext"))
    table = "\n".join(rows())
    keys = re.findall(r"^\| `([A-Z_]+)` \|", table, re.MULTILINE)
    assert keys == list(DEFAULTS)
    assert all(DOCS[key] for key in keys)
    assert "| `COOKIE_MAX_AGE` | 5 years |" in table
    assert '| `BACKEND` | `"celery"` |' in table
    # One table only: the README links to it rather than keeping a copy.
    readme = (docs.parent / "README.md").read_text()
    assert "| Key | Default |" not in readme


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"TIMEOUT": -1}, "at least 0"),
        ({"DELIVERY_CONCURRENCY": 0}, "at least 1"),
        ({"ON_ENQUEUE_FAILURE": "later"}, "must be one of"),
        ({"EXCLUDE_PATHS": "/admin/"}, "must be list or tuple"),
    ],
)
def test_declared_rules_are_enforced(config: dict[str, object], message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message):
        load(config)
