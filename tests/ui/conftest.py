"""The dashboard in a real browser: Playwright for Python driving Debian's Chromium (never `playwright install`).

Every page the tests open may reach loopback only: any other request is aborted and recorded, and a test fails if
one was attempted. Uncaught page errors and Content-Security-Policy violations fail the test too. Screenshots go to
test-artifacts/ui/.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.support.fake_upstream import FakeUpstream

try:
    from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Route, sync_playwright
except ImportError:  # the [test] extra is not installed
    sync_playwright = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
CHROMIUM = os.environ.get("BATCHYARD_CHROMIUM", "/usr/bin/chromium")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
KEY_A = "sk-ui-alpha"
KEY_B = "sk-ui-beta"

# Records what a page reports: CSP violations (which would mean something tried to run or load against the policy).
WATCH = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI);
});
"""


def _unavailable(what: str) -> None:
    if os.environ.get("BATCHYARD_REQUIRE_SERVICES"):
        pytest.fail(f"{what} is required (BATCHYARD_REQUIRE_SERVICES=1)")
    pytest.skip(f"{what} cannot run here")


# Package scope: Playwright's sync API keeps an event loop on the main thread while it runs; torn down when
# tests/ui ends, it cannot break the asyncio tests that run after it (a session fixture did).
@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    if sync_playwright is None:
        _unavailable("Playwright (pip install -e '.[test]')")
    if shutil.which(CHROMIUM) is None:
        _unavailable(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
    yield b
    b.close()


class Dash:
    """One browser context on one server: open the dashboard, sign in, take screenshots."""

    def __init__(self, context: BrowserContext, server: Server) -> None:
        self.context = context
        self.server = server
        self.page: Page = context.new_page()
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def url(self, path: str = "/") -> str:
        return self.server.root_url + path

    def open(self, path: str = "/", key: str | None = None) -> Page:
        self.page.goto(self.url(path))
        if key is not None:
            self.sign_in(key)
        return self.page

    def sign_in(self, key: str) -> None:
        self.page.fill("#api-key", key)
        self.page.click("#sign-in")

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def violations(self) -> list[str]:
        return list(self.page.evaluate("window.__cspViolations || []"))


@pytest.fixture
def open_dash(browser: Browser) -> Iterator[Callable[..., Dash]]:
    """A factory: `open_dash(server, width=1280)` gives a fresh browser context (its own sessionStorage)."""
    made: list[Dash] = []

    def make(server: Server, width: int = 1280, height: int = 860) -> Dash:
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        context.add_init_script(WATCH)
        dash = Dash(context, server)

        def guard(route: Route) -> None:
            host = urllib.parse.urlsplit(route.request.url).hostname or ""
            if host in LOOPBACK:
                route.continue_()
            else:
                dash.outside.append(route.request.url)
                route.abort()

        context.route("**/*", guard)
        made.append(dash)
        return dash

    yield make
    for dash in made:
        try:
            assert dash.outside == [], f"requests left loopback: {dash.outside}"
            assert dash.errors == [], f"uncaught errors in the page: {dash.errors}"
        finally:
            dash.context.close()


@pytest.fixture
def keyed_server(make_server: Callable[..., Server], upstream: FakeUpstream) -> Server:
    """A server with two API keys (two owners), routing every model to the fake upstream."""
    return make_server(
        "--upstream", upstream.base_url, "--api-key", KEY_A, "--api-key", KEY_B,
        "--lease-seconds", "2", "--shard-lines", "10",
    )  # fmt: skip


def wait_until(page: Page, predicate: str, arg: Any = None, timeout: float = 30.0) -> None:
    page.wait_for_function(predicate, arg=arg, timeout=timeout * 1000)
