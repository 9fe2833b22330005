"""The demo site, used the way a developer trying the package would use it.

The example project runs in its own process (``migrate``, then ``runserver``) with its
default settings: Celery in eager mode, delivering over HTTP to the stand-in tracker inside
the demo. A real Chromium browses it as a visitor: home, pricing, sign-up, a purchase,
log out, log in. The stand-in tracker must then hold one person with every one of those
events, the anonymous ids joined to the named customer, and the very id the browser's
``km_ai`` cookie holds.

Set ``DEMO_SCREENSHOTS=docs`` to also write the screenshots of the README.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, wait_for_library

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "example_project"
# The real Kissmetrics library's hosts: unreachable offline, so refused at once rather
# than left to a DNS timeout.
KISSMETRICS_HOSTS = re.compile(r"^https?://[^/]*kissmetrics\.io/")
USERNAME = "alice"
PASSWORD = "kanban-ships-fridays-42"

Person = dict[str, Any]


def require_chromium() -> None:
    """Skip without Chromium or Playwright, except under CI, where that is a failure."""
    reason = ""
    if not Path(CHROMIUM).exists():
        reason = f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed (pip install playwright)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def free_port(preferred: int = 0) -> int:
    """A TCP port nothing listens on right now: ``preferred`` if it is free."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Demo:
    """The example project running in a subprocess, on its own port and database."""

    def __init__(self, workdir: Path) -> None:
        # Screenshots show the tracking URL: the one `make demo` shows, when possible.
        self.port = free_port(8000 if os.environ.get("DEMO_SCREENSHOTS") else 0)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "runserver.log"
        # The demo's own defaults, not whatever this shell or the test settings carry.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KISSMETRICS_", "CELERY_", "DJANGO_", "DEMO_"))
        }
        env.update(
            DJANGO_SETTINGS_MODULE="demo.settings",
            DEMO_PORT=str(self.port),
            DEMO_DB=str(workdir / "demo.sqlite3"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
        )
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def manage(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``python manage.py *args`` against the demo's database."""
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=EXAMPLE,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start(self) -> None:
        """Migrate, start ``runserver`` and wait until it answers."""
        migrated = self.manage("migrate", "--noinput", "-v", "0")
        assert migrated.returncode == 0, migrated.stderr
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "runserver", f"127.0.0.1:{self.port}", "--noreload"],
                cwd=EXAMPLE,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urlopen(f"{self.url}/tracker/people.json", timeout=2):
                    return
            except (URLError, ConnectionError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"the demo did not start:\n{self.log.read_text()}")
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop ``runserver``."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def people(self) -> list[Person]:
        """What the stand-in tracker's page shows, as JSON."""
        with urlopen(f"{self.url}/tracker/people.json", timeout=5) as response:
            people: list[Person] = json.load(response)["people"]
        return people

    def wait_for(self, condition: Callable[[list[Person]], bool], timeout: float = 15) -> Any:
        """Poll the tracker until ``condition(people)`` holds; return the people."""
        deadline = time.monotonic() + timeout
        while True:
            people = self.people()
            if condition(people):
                return people
            if time.monotonic() > deadline:
                pytest.fail(
                    "the stand-in tracker never got there; it holds:\n"
                    + json.dumps(people, indent=1)
                    + f"\nrunserver log:\n{self.log.read_text()[-4000:]}"
                )
            time.sleep(0.2)


def person_named(people: list[Person], name: str) -> Person | None:
    """The person with the named identity ``name``."""
    return next((p for p in people if name in p["named"]), None)


def has_event(people: list[Person], event: str) -> bool:
    """Whether the customer has ``event`` yet."""
    person = person_named(people, USERNAME)
    return person is not None and any(e["name"] == event for e in person["events"])


def recorded(person: Person) -> set[tuple[str, str, str]]:
    """``(event, identity, source)`` of each of ``person``'s events."""
    return {(e["name"], e["identity"], e["source"]) for e in person["events"]}


@dataclass
class Journey:
    """What the browsers saw: each ``km_ai`` as the JavaScript library would read it."""

    first_visit_id: str
    after_logout_id: str
    final_id: str
    cookies_named_km_ai: int
    shown_identity: str
    other_visitor_id: str
    chosen_after_signup: list[str]
    library_requests: list[str]


def km_ai(page: Any) -> str:
    """``km_ai`` read the way the Kissmetrics library reads it: cookie text, decoded."""
    value: str = page.evaluate(
        """() => {
            const pair = document.cookie.split("; ").find((c) => c.startsWith("km_ai="));
            return pair ? decodeURIComponent(pair.slice(6)) : "";
        }"""
    )
    assert value, "the demo set no km_ai cookie"
    return value


def accept_analytics(page: Any) -> None:
    """Accept the banner's "analytics" group; django-cookie-consent sends the page back."""
    with page.expect_navigation():
        page.get_by_role("button", name="Accept analytics").click()


def contrast(foreground: str, background: str) -> float:
    """The WCAG contrast ratio of two computed CSS colours (``rgb(r, g, b)``)."""

    def luminance(colour: str) -> float:
        channels = [int(c) / 255 for c in re.findall(r"\d+", colour)[:3]]
        linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    light, dark = sorted([luminance(foreground), luminance(background)], reverse=True)
    return (light + 0.05) / (dark + 0.05)


def km_cookie_names(context: Any) -> list[str]:
    return sorted(c["name"] for c in context.cookies() if c["name"].startswith("km_"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The example project, migrated and serving."""
    require_chromium()
    server = Demo(tmp_path_factory.mktemp("demo"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def journey(demo: Demo) -> Journey:
    """A visitor browses, signs up, buys, logs out and in; another only looks at pricing.

    With ``DEMO_SCREENSHOTS`` set, also takes the README's screenshots on the way.
    """
    from playwright.sync_api import sync_playwright

    shots = os.environ.get("DEMO_SCREENSHOTS")
    library_requests: list[str] = []

    def refuse(route: Any) -> None:
        library_requests.append(route.request.url)
        route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.route(KISSMETRICS_HOSTS, refuse)
            page = context.new_page()

            page.goto(f"{demo.url}/")
            if shots:  # With the consent banner, as a first visit sees it.
                Path(shots).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(shots) / "demo-home.png"), full_page=True)
            accept_analytics(page)
            first_visit_id = km_ai(page)

            # Meanwhile, someone else only looks at the prices.
            other = browser.new_context()
            other.route(KISSMETRICS_HOSTS, refuse)
            other_page = other.new_page()
            other_page.goto(f"{demo.url}/pricing/")
            accept_analytics(other_page)
            other_visitor_id = km_ai(other_page)
            other.close()

            page.get_by_role("link", name="See pricing").click()
            page.wait_for_url("**/pricing/")
            page.locator("[data-plan=pro]").get_by_role("link", name="Start with Pro").click()
            page.wait_for_url("**/signup/**")
            page.fill("#id_username", USERNAME)
            page.fill("#id_password1", PASSWORD)
            page.fill("#id_password2", PASSWORD)
            page.get_by_role("button", name="Sign up").click()
            page.wait_for_url("**/pricing/?plan=pro")
            chosen_after_signup = page.locator("[data-chosen]").evaluate_all(
                "(plans) => plans.map((p) => p.dataset.plan)"
            )
            page.locator("[data-plan=pro]").get_by_role("button", name="Buy Pro").click()
            page.wait_for_url("**/account/")
            # The receipt page sends the browser-side event: let it arrive before leaving.
            demo.wait_for(lambda people: has_event(people, "Viewed Receipt"))
            page.get_by_role("button", name="Log out").click()
            page.wait_for_url(f"{demo.url}/")
            after_logout_id = km_ai(page)
            page.get_by_role("link", name="Log in").click()
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url("**/pricing/")
            final_id = km_ai(page)
            shown_identity = page.locator("[data-km-identity]").inner_text()
            cookies = [c for c in context.cookies() if c["name"] == "km_ai"]

            if shots:
                screenshot_tracker(demo, page, Path(shots) / "demo-tracker.png")
        finally:
            browser.close()
    return Journey(
        first_visit_id=first_visit_id,
        after_logout_id=after_logout_id,
        final_id=final_id,
        cookies_named_km_ai=len(cookies),
        shown_identity=shown_identity,
        other_visitor_id=other_visitor_id,
        chosen_after_signup=chosen_after_signup,
        library_requests=library_requests,
    )


def screenshot_tracker(demo: Demo, page: Any, path: Path) -> None:
    """The README's picture of the tracker page, once every hit of the journey is in."""
    demo.wait_for(everything_arrived)
    page.goto(f"{demo.url}/tracker/")
    page.screenshot(path=str(path), full_page=True)


def everything_arrived(people: list[Person]) -> bool:
    """The customer's last event of the journey and the other visitor's are in."""
    alice = person_named(people, USERNAME)
    if alice is None or len(people) < 2:
        return False
    names = [e["name"] for e in alice["events"]]
    return (
        # The login after the log-out; the one that completed the signup records nothing.
        "Logged In" in names and "Viewed Receipt" in names and len(alice["aliases"]) >= 2
    )


def test_the_visitor_and_the_customer_are_one_person(demo: Demo, journey: Journey) -> None:
    people = demo.wait_for(everything_arrived)
    alice = person_named(people, USERNAME)
    assert alice is not None
    assert alice["label"] == USERNAME
    assert alice["named"] == [USERNAME]
    # The first visit's id, and the fresh one the log-out issued, both joined to alice.
    assert set(alice["anonymous"]) == {journey.first_visit_id, journey.after_logout_id}
    assert journey.first_visit_id != journey.after_logout_id
    assert [journey.first_visit_id, USERNAME] in alice["aliases"]
    assert [journey.after_logout_id, USERNAME] in alice["aliases"]

    events = recorded(alice)
    assert ("Viewed Pricing", journey.first_visit_id, "server") in events
    assert ("Signed Up", USERNAME, "server") in events
    assert ("Purchased", USERNAME, "server") in events
    assert ("Logged In", USERNAME, "server") in events
    assert ("Viewed Receipt", USERNAME, "browser") in events
    purchased = next(e for e in alice["events"] if e["name"] == "Purchased")
    assert purchased["properties"] == {"plan": "pro", "amount": "49"}
    assert alice["properties"]["plan"] == "pro"
    assert [e["name"] for e in alice["events"]].count("Signed Up") == 1
    assert [e["name"] for e in alice["events"]].count("Logged In") == 1


def test_the_browser_cookie_holds_the_id_the_server_recorded(demo: Demo, journey: Journey) -> None:
    people = demo.wait_for(everything_arrived)
    alice = person_named(people, USERNAME)
    assert alice is not None
    assert journey.cookies_named_km_ai == 1
    assert journey.final_id == journey.after_logout_id  # Logging in keeps the cookie.
    viewed = next(e for e in alice["events"] if e["name"] == "Viewed Pricing")
    assert viewed["identity"] == journey.first_visit_id
    assert journey.shown_identity == USERNAME


def test_a_plan_chosen_before_signup_survives_it(journey: Journey) -> None:
    assert journey.chosen_after_signup == ["pro"]


def test_the_pages_never_load_the_real_library(demo: Demo, journey: Journey) -> None:
    # The stand-in library ran (browser-side events arrived) from the demo's own URLs.
    assert has_event(demo.wait_for(everything_arrived), "Viewed Receipt")
    assert journey.library_requests == []


def test_a_visitor_who_never_signs_up_stays_a_person_of_their_own(
    demo: Demo, journey: Journey
) -> None:
    people = demo.wait_for(everything_arrived)
    others = [p for p in people if journey.other_visitor_id in p["identities"]]
    assert len(others) == 1
    assert others[0]["identities"] == [journey.other_visitor_id]
    assert others[0]["named"] == []
    assert recorded(others[0]) == {
        ("Visited Site", journey.other_visitor_id, "server"),  # AUTO_EVENTS.
        ("Viewed Pricing", journey.other_visitor_id, "server"),
    }


def test_renew_subscriptions_records_server_side(demo: Demo, journey: Journey) -> None:
    demo.wait_for(everything_arrived)
    result = demo.manage("renew_subscriptions")
    assert result.returncode == 0, result.stderr
    assert f"Renewed pro for {USERNAME}" in result.stdout

    def renewed(people: list[Person]) -> bool:
        alice = person_named(people, USERNAME)
        return alice is not None and any(
            e["name"] == "Subscription Renewed" for e in alice["events"]
        )

    alice = person_named(demo.wait_for(renewed), USERNAME)
    assert alice is not None
    renewal = next(e for e in alice["events"] if e["name"] == "Subscription Renewed")
    assert (renewal["identity"], renewal["source"]) == (USERNAME, "server")
    assert renewal["properties"] == {"plan": "pro", "amount": "49"}
    assert "renewed on" in alice["properties"]


def test_make_renew_sends_to_the_port_the_demo_runs_on() -> None:
    # The demo's venv wherever it is (`make demo DEMO_VENV=...`); none is made by -n.
    dry_run = subprocess.run(
        ["make", "-n", "renew", "PORT=8013", "DEMO_VENV=.venv-demo-elsewhere"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [c for c in dry_run.stdout.splitlines() if "renew_subscriptions" in c]
    assert "DEMO_PORT=8013 " in line
    assert "../.venv-demo-elsewhere/bin/python manage.py renew_subscriptions" in line


def test_renew_subscriptions_refuses_an_unknown_user(demo: Demo) -> None:
    result = demo.manage("renew_subscriptions", "--user", "nobody")
    assert result.returncode != 0
    assert "'nobody' has no subscription to renew" in result.stderr


def test_nothing_is_tracked_before_the_banner_is_accepted(demo: Demo) -> None:
    """The consent gate: no cookie and no event before accepting; withdrawing deletes km_ai."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.route(KISSMETRICS_HOSTS, lambda route: route.abort())
            page = context.new_page()
            page.goto(f"{demo.url}/pricing/")
            assert page.get_by_role("button", name="Accept analytics").is_visible()
            assert page.locator("footer").inner_text().startswith("This page is not tracked.")
            assert km_cookie_names(context) == []
            before = len(demo.people())

            accept_analytics(page)
            anonymous = km_ai(page)
            people = demo.wait_for(
                lambda people: (
                    sum(len(p["events"]) for p in people if anonymous in p["identities"]) >= 2
                )
            )
            (person,) = [p for p in people if anonymous in p["identities"]]
            assert recorded(person) == {
                ("Visited Site", anonymous, "server"),
                ("Viewed Pricing", anonymous, "server"),
            }

            withdraw = page.get_by_role("button", name="Withdraw consent")
            colours = withdraw.evaluate(
                "(b) => [getComputedStyle(b).color,"
                " getComputedStyle(b.closest('footer')).backgroundColor]"
            )
            assert contrast(*colours) >= 4.5, colours  # WCAG AA for text.
            with page.expect_navigation():
                withdraw.click()
            page.goto(f"{demo.url}/pricing/")
            assert km_cookie_names(context) == []
            assert page.get_by_role("button", name="Accept analytics").count() == 0  # Declined.
            assert len(demo.people()) == before + 1
        finally:
            browser.close()


@contextlib.contextmanager
def fresh_page() -> Iterator[Any]:
    """A Chromium page in a context of its own, never reaching Kissmetrics."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.route(KISSMETRICS_HOSTS, lambda route: route.abort())
            yield context.new_page()
        finally:
            browser.close()


def test_a_campaign_visit_and_the_tracked_button_and_form(demo: Demo) -> None:
    """/?utm_source=demo: an Ad Campaign Hit on the tracker; the triggers send from the browser."""
    with fresh_page() as page:
        page.goto(f"{demo.url}/?utm_source=demo&utm_campaign=launch")
        accept_analytics(page)  # Back to the same URL, now tracked.
        assert page.url == f"{demo.url}/?utm_source=demo&utm_campaign=launch"
        visitor = km_ai(page)
        wait_for_library(page)  # The triggers are bound.
        with page.expect_navigation():
            page.get_by_role("link", name="See pricing").click()
        page.goto(f"{demo.url}/")
        wait_for_library(page)
        page.fill("input[name=team]", "Rocket")
        with page.expect_navigation():
            page.get_by_role("button", name="Send me updates").click()

        def arrived(people: list[Person]) -> bool:
            person = next((p for p in people if visitor in p["identities"]), None)
            names = [e["name"] for e in person["events"]] if person else []
            wanted = {"Ad Campaign Hit", "Clicked See Pricing", "Asked For Updates"}
            return wanted <= set(names)

        (person,) = [p for p in demo.wait_for(arrived) if visitor in p["identities"]]
        events = {e["name"]: e for e in person["events"]}
        campaign = events["Ad Campaign Hit"]
        assert campaign["source"] == "server"
        assert campaign["properties"] == {
            "Campaign Source": "demo",
            "Campaign Name": "launch",
            "URL": f"{demo.url}/?utm_source=demo&utm_campaign=launch",
        }
        assert [e["name"] for e in person["events"]].count("Visited Site") == 1
        clicked = events["Clicked See Pricing"]
        assert (clicked["source"], clicked["properties"]) == ("browser", {"place": "hero"})
        submitted = events["Asked For Updates"]
        # The form's fields stay on the page (KM_SKIP_FORM_FIELDS).
        assert (submitted["source"], submitted["properties"]) == ("browser", {})

        page.goto(f"{demo.url}/tracker/")
        assert page.get_by_text("Ad Campaign Hit").count() >= 1


def test_the_second_host_is_a_site_of_its_own(demo: Demo) -> None:
    """``localhost`` has its own key (``SITES``): its visitors show under it on /tracker/."""
    second = demo.url.replace("127.0.0.1", "localhost")
    assert second != demo.url
    with fresh_page() as page:
        page.goto(f"{second}/pricing/")
        accept_analytics(page)
        assert page.evaluate("() => window._kmk") == "demo-second-key"
        anonymous = km_ai(page)
        people = demo.wait_for(lambda people: any(anonymous in p["identities"] for p in people))
    (person,) = [p for p in people if anonymous in p["identities"]]
    assert person["site"] == "demo-second-key"
    assert recorded(person) >= {("Viewed Pricing", anonymous, "server")}
    # The first site's people keep the first key.
    assert {p["site"] for p in people if anonymous not in p["identities"]} <= {"demo-key"}


def test_the_quick_start_names_make_targets() -> None:
    """The README's two commands (docs/examples/quickstart.sh) name real Makefile targets."""
    lines = (ROOT / "docs" / "examples" / "quickstart.sh").read_text().splitlines()
    commands = [line.split("#", 1)[0].split() for line in lines if line.strip()]
    assert [c[:2] for c in commands] == [["make", "demo"], ["make", "test"]]
    for command in commands:
        done = subprocess.run([*command, "-n"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
