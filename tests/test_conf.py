"""The KISSMETRICS setting: defaults, validation that names the key, reset on change."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from django_kissmetrics.conf import DEFAULTS, get_settings, load


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
    ],
)
def test_bad_settings_raise_naming_the_key(config: dict[str, object], key: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=repr(key).replace("[", r"\[")):
        load(config)


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


def test_every_default_is_documented_in_the_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [key for key in DEFAULTS if f"`{key}`" not in readme]
    assert not missing
