"""The documentation's code examples run, and no page holds an example that nothing runs.

Every example lives in ``docs/examples/`` and is included into its page
(``literalinclude``); each file there has a test below (the Install page's blocks are run
by ``tests/test_install.py``, the ping's output by ``tests/test_ping.py``, the stand-in's
by ``tests/test_standin_cli.py``). Outputs shown in the docs are compared with the real
output, ``...`` standing for any text.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import django
import pytest
from django.contrib.auth.models import User
from django.core import checks
from django.core.management import call_command
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.template import engines
from django.test import Client, override_settings
from django.urls import include, path
from django.utils.module_loading import import_string

from django_kissmetrics import conf, km
from django_kissmetrics.commands import Command
from django_kissmetrics.testing import StandInTracker
from tests.models import Order, Subscription

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"

#: Example files, each with the test that runs it (in this module unless named).
RUN_BY = {
    "allauth_base.html": "test_allauth_pages_carry_the_tag",
    "analytics.py": "test_the_shaping_hooks_rename_drop_and_add",
    "auto_events_settings.py": "test_auto_events_record_a_campaign_on_the_server",
    "backfill.sh": "test_the_backfill_lines_run",
    "base.html": "test_allauth_pages_carry_the_tag",
    "client.py": "test_the_client_example_sends_three_calls",
    "consent.py": "test_the_consent_function_gates_the_loader",
    "consent_inert.html": "test_the_consent_function_gates_the_loader",
    "csp_settings.py": "test_the_csp_policy_passes_the_checks",
    "panel_settings.py": "test_the_panel_setting_names_importable_panels",
    "ping_output.txt": "tests/test_ping.py::test_all_up_the_event_reaches_the_tracker",
    "pytest.toml": "test_the_testing_page_runs_as_a_users_suite",
    "python_api.py": "test_the_python_api_examples",
    "quickstart.sh": "tests/test_example_project.py::test_the_quick_start_names_make_targets",
    "shaping_settings.py": "test_the_shaping_hooks_rename_drop_and_add",
    "sites_outside.py": "test_calls_outside_a_request_name_their_site",
    "sites_settings.py": "test_each_host_gets_its_sites_key",
    "standin.txt": "tests/test_standin_cli.py::test_it_prints_each_hit_until_ctrl_c",
    "tag_output.html": "test_the_tag_output_is_what_a_page_holds",
    "test_pricing.py": "test_the_testing_page_runs_as_a_users_suite",
    "track_settings.py": "test_staff_and_the_office_are_not_tracked",
    "triggers.html": "test_the_trigger_tags_write_their_commands",
    "triggers.py": "test_the_trigger_calls_reach_the_next_page",
    "views.py": "test_the_testing_page_runs_as_a_users_suite",
}
#: Pages whose fenced blocks a test applies as written (not includes).
RUN_IN_PLACE = {
    "install.md": "tests/test_install.py",
    "install-tasks.md": "tests/test_install_tasks.py",
}
#: Fenced blocks that are pictures, not code.
DIAGRAMS = {("identities.md", "text")}


def load(name: str) -> ModuleType:
    """Import ``docs/examples/<name>.py`` as ``docs_examples.<name>`` (a dotted path)."""
    module_name = f"docs_examples.{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("docs_examples", ModuleType("docs_examples"))
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def matches(sample: str, real: str) -> bool:
    """``real`` is ``sample``, with ``...`` in the sample standing for any text."""
    pattern = ".*?".join(re.escape(part) for part in sample.strip().split("..."))
    return re.fullmatch(pattern, real.strip(), re.DOTALL) is not None


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block of a Markdown page."""
    found = re.finditer(r"^( *)```([^\n]*)\n(.*?)^\1```$", text, re.MULTILINE | re.DOTALL)
    return [(m.group(2).strip(), m.group(3)) for m in found]


def test_every_example_is_included_and_run() -> None:
    included: set[str] = set()
    for page in sorted(DOCS.glob("*.md")):
        for info, body in fenced_blocks(page.read_text()):
            if info.startswith("{literalinclude}"):
                target = info.split(None, 1)[1]
                assert target.startswith("examples/"), (page.name, target)
                assert (DOCS / target).is_file(), (page.name, target)
                included.add(target.removeprefix("examples/"))
            elif info.startswith("{"):
                assert info.split("}")[0] + "}" in {
                    "{toctree}",
                    "{include}",
                    "{kissmetrics-settings}",
                    "{warning}",
                }, (page.name, info)
            else:
                runs = page.name in RUN_IN_PLACE or (page.name, info) in DIAGRAMS
                assert runs, f"{page.name}: a {info or 'plain'} block nothing runs:\n{body}"
    examples = {p.name for p in EXAMPLES.iterdir() if p.name != "README.md"}
    assert examples == set(RUN_BY), "every example file needs a test in RUN_BY"
    assert included == examples, "every example is included by a page"
    for test in RUN_BY.values():
        module, _, name = test.rpartition("::")
        source = (ROOT / module).read_text() if module else Path(__file__).read_text()
        assert f"def {name or test}(" in source, test


def receipt(request: HttpRequest) -> HttpResponse:
    request.csp_nonce = "r4nd0m"  # type: ignore[attr-defined]  # As django-csp sets it.
    page = engines["django"].from_string("{% load kissmetrics %}{% kissmetrics_js %}")
    return HttpResponse(page.render({}, request))


def python_api_view(request: HttpRequest) -> HttpResponse:
    load("python_api").in_a_view(request)
    return HttpResponse("ok")


def base_page(request: HttpRequest) -> HttpResponse:
    return render(request, "base.html")


def triggers_page(request: HttpRequest) -> HttpResponse:
    page = engines["django"].from_string((EXAMPLES / "triggers.html").read_text())
    return HttpResponse(page.render({"signup_properties": {"source": "footer"}}, request))


urlpatterns = [
    path("pricing/", lambda request: load("views").pricing(request)),
    path("buy/", lambda request: load("views").buy(request)),
    path("receipt/", receipt, name="receipt"),
    path("api/", python_api_view),
    path("page/", base_page),
    path("triggers/", triggers_page),
    path("product/", lambda request: load("triggers").product(request)),
    path("accounts/", include("allauth.urls")),
]


@pytest.mark.django_db
@pytest.mark.urls("tests.test_docs")
def test_the_tag_output_is_what_a_page_holds(client: Client, km_outbox: list[Command]) -> None:
    user = User.objects.create_user("ann")
    client.force_login(user)
    client.get("/buy/", HTTP_HOST="www.shop.test")
    page = client.get("/receipt/", HTTP_HOST="www.shop.test").content.decode()
    sample = (EXAMPLES / "tag_output.html").read_text()
    # The sample's user is the first one of a fresh database.
    assert page.strip() == sample.strip().replace('["identify","1"]', f'["identify","{user.pk}"]')
    assert [(c.kind, c.name) for c in km_outbox][-1] == ("record", "Purchased")


@pytest.mark.django_db
@pytest.mark.urls("tests.test_docs")
def test_the_python_api_examples(client: Client, km_outbox: list[Command]) -> None:
    client.get("/api/")
    kinds = [(c.kind, c.person if c.kind == "alias" else c.name) for c in km_outbox]
    assert ("record", "Purchased") in kinds
    assert ("set", None) in kinds
    assert ("alias", "old@example.com") in kinds
    back_dated = next(c for c in km_outbox if c.name == "Signed Up")
    assert (back_dated.person, back_dated.timestamp) == ("ann@example.com", 1234567890)
    km_outbox.clear()
    users = [User.objects.create_user("u1"), User.objects.create_user("u2")]
    load("python_api").outside_a_request(users)
    assert [(c.person, c.name) for c in km_outbox] == [
        ("42", "Renewed"),
        (str(users[0].pk), "Subscription Renewed"),
        (str(users[1].pk), "Subscription Renewed"),
    ]


def test_the_client_example_sends_three_calls(tracker: StandInTracker) -> None:
    load("client").send(tracker.url)
    assert [(h.path, h.person, h.name) for h in tracker.hits] == [
        ("/e", "bob@example.com", "Signed Up"),
        ("/s", "bob@example.com", None),
        ("/a", "anonymous-id", "bob@example.com"),
    ]


@pytest.mark.urls("tests.test_docs")
def test_the_consent_function_gates_the_loader(
    client: Client, km_settings: Callable[..., None], site_templates: list[dict[str, Any]]
) -> None:
    load("consent")
    km_settings(CONSENT="docs_examples.consent.analytics_agreed")
    with override_settings(TEMPLATES=site_templates):
        not_yet = client.get("/page/").content.decode()
        tag = re.search(r"<script type=\"text/plain\".*</script>", not_yet, re.DOTALL)
        assert tag is not None
        assert matches((EXAMPLES / "consent_inert.html").read_text(), tag.group(0))
        assert "km_ai" not in client.cookies
        client.cookies["analytics_consent"] = "yes"
        agreed = client.get("/page/").content.decode()
    assert "text/plain" not in agreed
    assert "var _kmq" in agreed
    assert "km_ai" in client.cookies


def test_the_panel_setting_names_importable_panels() -> None:
    namespace: dict[str, Any] = {}
    exec((EXAMPLES / "panel_settings.py").read_text(), namespace)
    from debug_toolbar.settings import PANELS_DEFAULTS

    *toolbar, ours = namespace["DEBUG_TOOLBAR_PANELS"]
    assert toolbar == PANELS_DEFAULTS
    assert "debug_toolbar.panels.sql.SQLPanel" in toolbar
    assert import_string(ours).title == "Kissmetrics"


@pytest.fixture
def site_templates(tmp_path: Path) -> list[dict[str, Any]]:
    """A site's templates folder: its base.html and allauth's layout override."""
    layout = tmp_path / "allauth" / "layouts"
    layout.mkdir(parents=True)
    (tmp_path / "base.html").write_text((EXAMPLES / "base.html").read_text())
    (layout / "base.html").write_text((EXAMPLES / "allauth_base.html").read_text())
    from django.conf import settings

    return [{**settings.TEMPLATES[0], "DIRS": [str(tmp_path)]}]


@pytest.mark.django_db
@pytest.mark.urls("tests.test_docs")
def test_allauth_pages_carry_the_tag(client: Client, site_templates: list[dict[str, Any]]) -> None:
    with override_settings(TEMPLATES=site_templates):
        page = client.get("/accounts/login/").content.decode()
        plain = client.get("/accounts/login/", HTTP_DNT="1").content.decode()
    assert "var _kmq = _kmq || [];" in page
    assert re.search(r"<title>\s*Sign In\s*</title>", page)
    assert 'name="password"' in page  # allauth's own form, in the site's layout.
    assert "var _kmq" not in plain


@pytest.mark.django_db
def test_the_backfill_lines_run() -> None:
    user = User.objects.create_user("ann", email="ann@example.com")
    Order.objects.create(user=user, placed_at=user.date_joined, total=49, plan="pro")
    Subscription.objects.create(email="ann@example.com", plan="pro", started=user.date_joined)
    script = (EXAMPLES / "backfill.sh").read_text().replace("\\\n", " ")
    for line in script.splitlines():
        python, manage, command, *args = shlex.split(line)
        assert (python, manage, command) == ("python", "manage.py", "kissmetrics_backfill")
        # The test suite's models have the shape of the example's shop app.
        args = [a.replace("shop.", "tests.") for a in args]
        out = io.StringIO()
        call_command(command, *args, "--dry-run", stdout=out, stderr=io.StringIO())
        assert '"person": ' in out.getvalue(), (line, out.getvalue())


def test_the_testing_page_runs_as_a_users_suite(tmp_path: Path) -> None:
    """The Testing page's pyproject.toml lines and test, in a project of their own."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "__init__.py").write_text("")
    (proj / "settings.py").write_text(
        "from tests.settings import *  # noqa\nROOT_URLCONF = 'proj.urls'\n"
    )
    (proj / "views.py").write_text((EXAMPLES / "views.py").read_text())
    (proj / "urls.py").write_text(
        "from django.urls import path\n\nfrom .views import buy, pricing\n\n"
        "urlpatterns = [path('pricing/', pricing), path('buy/', buy)]\n"
    )
    (tmp_path / "pyproject.toml").write_text((EXAMPLES / "pytest.toml").read_text())
    (tmp_path / "test_pricing.py").write_text((EXAMPLES / "test_pricing.py").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env={**_env(), "PYTHONPATH": f"{tmp_path}:{ROOT}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTEST_"))}


def test_the_readme_works_on_the_registry_page() -> None:
    """Absolute links only (the registry shows the README alone), and no example of its own:
    each line of its code is a line of a page or an example that a test runs."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)]+)\)", readme)
    assert targets
    assert all(t.startswith("https://") for t in targets), targets
    known = "\n".join(p.read_text() for p in [*DOCS.glob("*.md"), *EXAMPLES.iterdir()])
    known_lines = {line.strip().removeprefix("$ ") for line in known.splitlines()}
    for _, body in fenced_blocks(readme):
        for line in body.splitlines():
            assert line.strip() in known_lines | {"", "..."}, line


def settings_of(name: str) -> dict[str, Any]:
    """The ``KISSMETRICS`` of a settings example, checked as Django would load it."""
    example: dict[str, Any] = load(name).KISSMETRICS
    conf.load(example)
    return example


@pytest.mark.django_db
def test_the_shaping_hooks_rename_drop_and_add(
    monkeypatch: pytest.MonkeyPatch, km_settings: Callable[..., None], km_outbox: list[Command]
) -> None:
    # The page's module is myproject/analytics.py, as the settings name it.
    monkeypatch.setitem(sys.modules, "myproject", ModuleType("myproject"))
    monkeypatch.setitem(sys.modules, "myproject.analytics", load("analytics"))
    km_settings(**settings_of("shaping_settings"), BACKEND="locmem")
    km.record("Viewed Healthcheck", identity="42")
    km.record("Bought", {"plan": "pro"}, identity="42")
    km.record("Renewed", {"region": "us"}, identity="42")
    assert [(c.name, dict(c.properties)) for c in km_outbox] == [
        ("Purchased", {"plan": "pro", "region": "eu", "release": "2026.12"}),
        ("Renewed", {"region": "us", "release": "2026.12"}),
    ]


def kmk(html: str) -> str | None:
    """The key the tag gave the library (``_kmk``), or ``None`` without a tag."""
    found = re.search(r'var _kmk = _kmk \|\| "([^"]*)";', html)
    return found.group(1) if found else None


@pytest.mark.django_db
@pytest.mark.urls("tests.test_docs")
def test_each_host_gets_its_sites_key(
    client: Client, km_settings: Callable[..., None], km_outbox: list[Command]
) -> None:
    km_settings(**settings_of("sites_settings"), BACKEND="locmem")
    hosts = ["shop.example.com", "example.de", "www.example.de", "staging.example.com"]
    hosts += ["www.example.com"]
    with override_settings(ALLOWED_HOSTS=[".example.com", ".example.de"]):
        keys = [kmk(client.get("/receipt/", HTTP_HOST=host).content.decode()) for host in hosts]
        client.get("/api/", HTTP_HOST="www.example.de")
    assert keys == [
        "KEY-OF-THE-SHOP",
        "KEY-OF-GERMANY",
        "KEY-OF-GERMANY",
        None,
        "KEY-OF-THE-MAIN-SITE",
    ]
    assert {(c.name, c.api_key) for c in km_outbox if c.name == "Purchased"} == {
        ("Purchased", "KEY-OF-GERMANY")
    }


def test_calls_outside_a_request_name_their_site(
    km_settings: Callable[..., None], km_outbox: list[Command]
) -> None:
    km_settings(**settings_of("sites_settings"), BACKEND="locmem")
    load("sites_outside").outside_a_request()
    assert [(c.kind, c.person, c.api_key) for c in km_outbox] == [
        ("record", "42", "KEY-OF-THE-SHOP"),
        ("set", "42", "KEY-OF-THE-SHOP"),
        ("alias", "old@example.com", "KEY-OF-THE-SHOP"),
        ("record", "7", "KEY-OF-GERMANY"),
    ]


@pytest.mark.skipif(django.VERSION < (6, 0), reason="Django's own CSP came with 6.0")
def test_the_csp_policy_passes_the_checks() -> None:
    from django.conf import settings

    namespace: dict[str, Any] = {"MIDDLEWARE": list(settings.MIDDLEWARE)}
    exec((EXAMPLES / "csp_settings.py").read_text(), namespace)
    assert namespace["MIDDLEWARE"][-1] == "django.middleware.csp.ContentSecurityPolicyMiddleware"
    with override_settings(MIDDLEWARE=namespace["MIDDLEWARE"], SECURE_CSP=namespace["SECURE_CSP"]):
        ids = [m.id for m in checks.run_checks() if (m.id or "").startswith("django_kissmetrics")]
    assert ids == []


def pushed(html: str) -> list[Any]:
    """Every command a page gives the library (``_kmq.push([...])``), decoded."""
    return [json.loads(c) for c in re.findall(r"_kmq\.push\((\[.*?\])\);", html)]


@pytest.mark.urls("tests.test_docs")
def test_the_trigger_tags_write_their_commands(client: Client) -> None:
    page = client.get("/triggers/").content.decode()
    assert pushed(page) == [
        ["trackClick", "#buy", "Clicked Buy", {"plan": "pro"}],
        ["trackSubmit", "#signup", "Submitted Signup", {"source": "footer"}],
        ["trackClickOnOutboundLink", ".partner", "Left For Partner", {}],
    ]
    assert '<button id="buy">Buy</button>' in page


@pytest.mark.django_db
@pytest.mark.urls("tests.test_docs")
def test_the_trigger_calls_reach_the_next_page(client: Client) -> None:
    page = client.get("/product/", follow=True).content.decode()
    assert pushed(page)[-3:] == [
        ["trackClick", "#buy", "Clicked Buy", {"plan": "pro"}],
        ["trackSubmit", "#signup", "Submitted Signup", {}],
        ["trackClickOnOutboundLink", ".partner", "Left For Partner", {}],
    ]


@pytest.mark.urls("tests.test_docs")
def test_auto_events_record_a_campaign_on_the_server(
    client: Client, km_settings: Callable[..., None], km_outbox: list[Command]
) -> None:
    km_settings(**settings_of("auto_events_settings"), BACKEND="locmem")
    client.get("/receipt/?utm_source=newsletter&utm_campaign=spring")
    campaign = next(c for c in km_outbox if c.name == "Ad Campaign Hit")
    assert campaign.properties["Campaign Source"] == "newsletter"
    assert campaign.properties["Campaign Name"] == "spring"
    assert "Visited Site" in [c.name for c in km_outbox]
    # The server owns those events: the page tells the library to skip its own.
    assert "var KM_SKIP_UTM = 1;" in client.get("/receipt/").content.decode()


@pytest.mark.django_db
@pytest.mark.urls("tests.test_docs")
def test_staff_and_the_office_are_not_tracked(
    client: Client, km_settings: Callable[..., None]
) -> None:
    km_settings(**settings_of("track_settings"))
    assert kmk(client.get("/receipt/").content.decode()) == "YOUR-KEY"
    assert kmk(client.get("/receipt/", REMOTE_ADDR="192.0.2.7").content.decode()) is None
    assert kmk(client.get("/receipt/", REMOTE_ADDR="2001:db8::1").content.decode()) is None
    client.cookies.clear()
    client.force_login(User.objects.create_user("ann"))
    assert kmk(client.get("/receipt/").content.decode()) == "YOUR-KEY"
    client.force_login(User.objects.create_user("bob", is_staff=True))
    page = client.get("/receipt/")
    assert kmk(page.content.decode()) is None
    assert "km_ai" not in page.cookies
