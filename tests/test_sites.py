"""Several Kissmetrics sites in one project: ``SITES``, ``api_key=``, and the key on each command.

The key a command is made with is the key it is delivered with: through the publisher, a
real broker and a real worker whose own settings name another key, retries and the spool.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client

from django_kissmetrics import km, publisher, spool
from django_kissmetrics.commands import Command, make_alias, make_record, make_set
from django_kissmetrics.delivery import deliver
from django_kissmetrics.sites import key_for_host
from django_kissmetrics.testing import StandInTracker
from tests.conftest import RedisServer, wait_until
from tests.servers import SiteProcess
from tests.worker import WorkerProcess

SITES = {"shop.test": "shop-key", ".blog.test": "blog-key", "www.blog.test": "www-blog-key"}
FAST = {"RETRY_BACKOFF": 0.05, "RETRY_BACKOFF_MAX": 1.0, "TIMEOUT": 2.0}


def kmk(html: str) -> str | None:
    """The key the tag gave the library (``_kmk``), or ``None`` without a tag."""
    found = re.search(r"var _kmk = _kmk \|\| (\"[^\"]*\"|null);", html)
    return None if found is None else json.loads(found.group(1))


# Which key a host gets.


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("shop.test", "shop-key"),
        ("SHOP.test:8000", "shop-key"),
        ("shop.test.", "shop-key"),
        ("blog.test", "blog-key"),  # A .domain covers the domain itself...
        ("eu.blog.test", "blog-key"),  # ...and every subdomain.
        ("a.b.blog.test", "blog-key"),
        ("www.blog.test", "www-blog-key"),  # An exact host wins over its domain.
        ("myblog.test", "default"),  # Not a subdomain of blog.test.
        ("other.test", "default"),
        ("127.0.0.1:8000", "default"),
        ("[::1]:8000", "default"),
    ],
)
def test_a_host_picks_its_key(host: str, key: str) -> None:
    assert key_for_host(host, SITES, "default") == key


def test_a_host_whose_key_is_none_is_not_a_site() -> None:
    sites = {".shop.test": "k", "staging.shop.test": None}
    assert key_for_host("staging.shop.test", sites, "d") is None
    assert key_for_host("www.shop.test", sites, "d") == "k"


# Through the middleware, the tag and the backend (locmem).


@pytest.mark.django_db
def test_each_host_gets_its_own_key_in_commands_and_tag(
    client: Client, km_outbox: list[Command], km_settings: Callable[..., None]
) -> None:
    km_settings(SITES=SITES)
    hosts = ("shop.test", "eu.blog.test", "www.blog.test", "elsewhere.test")
    assert [kmk(client.get("/", HTTP_HOST=host).content.decode()) for host in hosts] == [
        "shop-key",
        "blog-key",
        "www-blog-key",
        "test-key",  # API_KEY, the default.
    ]
    for host in hosts:
        client.get("/record/?event=Viewed", HTTP_HOST=host)
    assert [c.api_key for c in km_outbox] == ["shop-key", "blog-key", "www-blog-key", "test-key"]


@pytest.mark.django_db
def test_the_library_script_url_carries_the_hosts_key(
    client: Client, km_settings: Callable[..., None]
) -> None:
    km_settings(SITES=SITES, SCRIPT_URLS=["/km/i.js", "/km/{key}.2.js"])
    html = client.get("/", HTTP_HOST="shop.test").content.decode()
    assert '_kms("/km/"+_kmk+".2.js");' in html
    assert kmk(html) == "shop-key"


@pytest.mark.django_db
def test_an_unmatched_host_without_api_key_is_not_tracked(
    client: Client, km_outbox: list[Command], km_settings: Callable[..., None]
) -> None:
    km_settings(SITES=SITES, API_KEY=None)
    response = client.get("/record/?event=Viewed", HTTP_HOST="elsewhere.test")
    assert "km_ai" not in response.cookies
    assert kmk(client.get("/", HTTP_HOST="elsewhere.test").content.decode()) is None
    assert km_outbox == []
    client.get("/record/?event=Viewed", HTTP_HOST="shop.test")
    assert [(c.name, c.api_key) for c in km_outbox] == [("Viewed", "shop-key")]


@pytest.mark.django_db
def test_sites_as_a_function_of_the_request(
    client: Client, km_outbox: list[Command], km_settings: Callable[..., None]
) -> None:
    km_settings(SITES="tests.hooks.tenant_key")
    client.cookies["tenant"] = "acme"
    assert kmk(client.get("/").content.decode()) == "acme-key"
    client.get("/record/?event=A")
    client.cookies["tenant"] = "nobody"  # The function answers None: not tracked.
    response = client.get("/record/?event=B")
    assert "km_ai" not in response.cookies
    assert [(c.name, c.api_key) for c in km_outbox] == [("A", "acme-key")]


@pytest.mark.django_db
def test_a_broken_sites_function_tracks_nothing_and_logs_once(
    client: Client,
    km_outbox: list[Command],
    km_settings: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    km_settings(SITES="tests.hooks.broken")
    assert client.get("/record/?event=A").status_code == 200
    assert client.get("/record/?event=B").status_code == 200
    assert km_outbox == []
    assert len([r for r in caplog.records if "SITES" in r.getMessage()]) == 1


# Outside a request.


def test_outside_a_request_api_key_names_the_site(
    km_outbox: list[Command], km_settings: Callable[..., None]
) -> None:
    km_settings(SITES=SITES)
    km.record("Renewed", identity="42", api_key="shop-key")
    km.set({"plan": "pro"}, identity="42", api_key="shop-key")
    km.alias("a", "b", api_key="blog-key")
    km.record("Default", identity="42")
    with km.batch(api_key="blog-key"):
        km.record("In Batch", identity="42")
        km.record("Named", identity="42", api_key="shop-key")
    assert [(c.kind, c.name, c.api_key) for c in km_outbox] == [
        ("record", "Renewed", "shop-key"),
        ("set", None, "shop-key"),
        ("alias", "b", "blog-key"),
        ("record", "Default", "test-key"),
        ("record", "In Batch", "blog-key"),
        ("record", "Named", "shop-key"),
    ]


def test_sites_without_api_key_needs_a_key_outside_a_request(
    km_outbox: list[Command], km_settings: Callable[..., None]
) -> None:
    km_settings(SITES=SITES, API_KEY=None)
    with pytest.raises(ValueError, match="api_key"):
        km.record("Renewed", identity="42")
    km.record("Renewed", identity="42", api_key="shop-key")
    assert [c.api_key for c in km_outbox] == ["shop-key"]


# The key on the command, on the wire.


def test_the_key_survives_the_wire_and_old_messages_have_none() -> None:
    keyed = make_record("ann", "Bought", {"plan": "pro"}, 1_700_000_000, api_key="shop-key")
    assert Command.from_wire(json.loads(json.dumps(keyed.to_wire()))) == keyed
    assert Command.from_dict(json.loads(json.dumps(keyed.to_dict()))) == keyed
    old = ["record", "ann", "Bought", {"plan": "pro"}, 1_700_000_000]  # Before keys travelled.
    assert Command.from_wire(old) == keyed._replace(api_key=None)
    assert Command.from_dict({"kind": "set", "person": "ann", "timestamp": 1}).api_key is None
    assert make_set("ann", {"a": 1}, api_key="k").api_key == "k"
    assert make_alias("a", "b", api_key="k").to_wire()[-1] == "k"


def test_one_delivery_sends_each_command_with_its_own_key(
    tracker: StandInTracker, km_settings: Callable[..., None]
) -> None:
    km_settings(BACKEND="sync", TRACKING_URL=tracker.url, API_KEY="worker-key")
    batch = [
        make_record("ann", "Shop Event", api_key="shop-key"),
        make_alias("ann", "ann@shop.test", api_key="shop-key"),
        make_record("bob", "Blog Event", api_key="blog-key"),
        make_record("cy", "Old Event"),  # No key: the delivering process's API_KEY.
    ]
    assert deliver(batch) == []
    assert sorted((h.params["_k"], h.person, h.name) for h in tracker.hits) == [
        ("blog-key", "bob", "Blog Event"),
        ("shop-key", "ann", "Shop Event"),
        ("shop-key", "ann", "ann@shop.test"),
        ("worker-key", "cy", "Old Event"),
    ]


def test_a_command_without_key_where_there_is_no_api_key_is_given_up(
    tracker: StandInTracker, km_settings: Callable[..., None]
) -> None:
    km_settings(BACKEND="sync", TRACKING_URL=tracker.url, SITES=SITES, API_KEY=None)
    failures = deliver([make_record("cy", "Old Event"), make_record("ann", "E", api_key="k")])
    assert [(c.name, e.retriable) for c, e in failures] == [("Old Event", False)]
    assert [h.params["_k"] for h in tracker.hits] == ["k"]


# A real broker and a real worker whose settings name another key.


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_batch_is_delivered_with_the_key_it_was_queued_with(
    tracker: StandInTracker,
    own_broker: RedisServer,
    km_settings: Callable[..., None],
    tmp_path: Path,
) -> None:
    km_settings(BACKEND="celery", API_KEY="web-key", SITES=SITES, SPOOL_DIR=str(tmp_path))
    worker_config = {"BACKEND": "celery", "TRACKING_URL": tracker.url, "API_KEY": "worker-key"}
    tracker.fail(1, 503)  # The first call fails: its retry must keep the key too.
    with km.batch(api_key="shop-key"):
        km.record("Shop Renewal", identity="ann")
        km.record("Blog Renewal", identity="bob", api_key="blog-key")
        km.record("Main Renewal", identity="cy", api_key="web-key")
    publisher.flush()
    with WorkerProcess(own_broker.url, {**worker_config, **FAST}):
        # An old message, queued before keys travelled: the worker's key.
        from django_kissmetrics.tasks import deliver as task

        task.delay([["record", "dan", "Old Renewal", {}, int(time.time())]])
        wait_until(lambda: len({h.name for h in tracker.hits}) == 4, 30, "four events")
    keys = {h.name: h.params["_k"] for h in tracker.hits}
    assert keys == {
        "Shop Renewal": "shop-key",
        "Blog Renewal": "blog-key",
        "Main Renewal": "web-key",
        "Old Renewal": "worker-key",
    }
    assert len(tracker.refused) == 1  # The retried call, delivered after with its key.


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_spooled_batch_is_replayed_with_its_key(
    tracker: StandInTracker, own_broker: RedisServer, tmp_path: Path
) -> None:
    store = spool.Spool(tmp_path, max_bytes=10**9, max_age=3600)
    # Left by a web process whose broker was down: the worker replays it as it starts.
    store.put(
        [
            make_record("ann", "Spooled Shop", api_key="shop-key"),
            make_record("bob", "Spooled Blog", api_key="blog-key"),
        ]
    )
    config = {
        "BACKEND": "celery",
        "TRACKING_URL": tracker.url,
        "API_KEY": "worker-key",
        # The site's settings name both keys: entries of other keys are another site's.
        "SITES": {"shop.test": "shop-key", "blog.test": "blog-key"},
        "SPOOL_DIR": str(tmp_path),
        **FAST,
    }
    with WorkerProcess(own_broker.url, config):
        wait_until(lambda: len(tracker.hits) == 2, 30, "the replay")
    assert sorted((h.name, h.params["_k"]) for h in tracker.hits) == [
        ("Spooled Blog", "blog-key"),
        ("Spooled Shop", "shop-key"),
    ]
    assert store.status().count == 0


# Two hosts on one real server.


def visit(url: str, host: str, path: str) -> tuple[str, dict[str, str]]:
    """GET ``path`` as a new visitor of ``host``; the page and its cookies."""
    request = urllib.request.Request(f"{url}{path}", headers={"Host": host})
    with urllib.request.urlopen(request, timeout=10) as response:
        cookies = {}
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            cookies[name] = rest.split(";", 1)[0]
        return response.read().decode(), cookies


@pytest.fixture
def broker() -> Any:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("server", ["runserver", "gunicorn"])
def test_two_hosts_on_one_server_each_with_its_own_key(
    server: str, tracker: StandInTracker, broker: RedisServer, tmp_path: Path
) -> None:
    config = {
        "BACKEND": "celery",
        "TRACKING_URL": tracker.url,
        "SPOOL_DIR": str(tmp_path),
        "PUBLISH_WINDOW": 0.05,
        "SITES": {"www.shop.test": "shop-key", ".blog.test": "blog-key"},
        **FAST,
    }
    # The worker's own key is neither: the keys come with the commands.
    worker = {**config, "API_KEY": "worker-key"}
    with WorkerProcess(broker.url, worker), SiteProcess(server, config, broker.url) as site:
        seen = {}
        for host in ("www.shop.test", "eu.blog.test"):
            page, cookies = visit(site.url, host, "/")
            seen[host] = kmk(page)
            assert "km_ai" in cookies
            visit(site.url, host, f"/record/?event=Visited+{host}")
        wait_until(lambda: len(tracker.hits) == 2, 30, f"both hosts' events:\n{site.log()}")
    assert seen == {"www.shop.test": "shop-key", "eu.blog.test": "blog-key"}
    assert sorted((h.name, h.params["_k"]) for h in tracker.hits) == [
        ("Visited eu.blog.test", "blog-key"),
        ("Visited www.shop.test", "shop-key"),
    ]


# The commands and checks that know about sites.


def test_ping_names_a_site(tracker: StandInTracker, km_settings: Callable[..., None]) -> None:
    km_settings(BACKEND="sync", TRACKING_URL=tracker.url, SITES=SITES, API_KEY=None)
    call_command("kissmetrics_ping", "--api-key", "shop-key", "--timeout", "5")
    assert [h.params["_k"] for h in tracker.hits] == ["shop-key"]


@pytest.mark.django_db
def test_backfill_names_a_site(
    tracker: StandInTracker, km_settings: Callable[..., None], capsys: Any
) -> None:
    from django.contrib.auth.models import User

    km_settings(BACKEND="sync", TRACKING_URL=tracker.url, SITES=SITES, API_KEY=None)
    User.objects.create_user("ann", password="pw")
    with pytest.raises(Exception, match="--api-key"):
        call_command("kissmetrics_backfill", "signups", "--quiet")
    call_command("kissmetrics_backfill", "signups", "--quiet", "--api-key", "blog-key")
    assert [(h.name, h.params["_k"]) for h in tracker.hits] == [("Signed Up", "blog-key")]


def test_checks_know_about_sites(settings: Any, km_settings: Callable[..., None]) -> None:
    from django_kissmetrics.checks import check_settings

    settings.ALLOWED_HOSTS = [".shop.test"]
    km_settings(API_KEY=None, SITES={"shop.test": "a", "elsewhere.test": "b"})
    ids = {m.id: m.msg for m in check_settings()}
    assert "django_kissmetrics.W002" not in ids  # SITES is a key.
    assert "'elsewhere.test'" in ids["django_kissmetrics.W010"]
    assert "'shop.test'" not in ids["django_kissmetrics.W010"]
    km_settings(SITES="tests.hooks.nowhere", TRACK="tests.nothing.here")
    errors = [m.msg for m in check_settings() if m.id == "django_kissmetrics.E008"]
    assert len(errors) == 2
    assert any("SITES" in e for e in errors)
    assert any("TRACK" in e for e in errors)


def test_sites_setting_is_validated(km_settings: Callable[..., None]) -> None:
    from django_kissmetrics.conf import ConfigurationError, get_settings

    for bad in ({"shop.test/x": "k"}, {"shop.test": ""}, {"shop.test": 5}, ["shop.test"]):
        km_settings(SITES=bad)
        with pytest.raises(ConfigurationError, match="SITES"):
            get_settings()
    km_settings(SITES={"Shop.Test.": "k", "[::1]": "v6"})
    assert get_settings().SITES == {"shop.test": "k", "[::1]": "v6"}
    assert key_for_host("[::1]:8000", get_settings().SITES, None) == "v6"  # type: ignore[arg-type]
    km_settings(SITES={"shop.test:8000": "k"})
    with pytest.raises(ConfigurationError, match=r"shop\.test:8000"):
        get_settings()
