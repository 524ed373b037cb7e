"""The dashboard in a real browser: Debian's chromium (``/usr/bin/chromium``, which ``make test`` installs)
driven headless by Playwright. Log in, read the overview, a device's charts, a rollout halted by its latency
gate, abort it as an admin; a read-only login sees no buttons. Every request the pages make goes to the fleet
(nothing from the internet) and the browser reports no error (a Content-Security-Policy violation is one).

``EDGESHIP_SCREENSHOTS=1`` also writes the halted rollout's page to ``docs/images/dashboard-halted-rollout.png``
and the device page to ``docs/images/dashboard-device.png``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeship.fleet import alerts
from edgeship.fleet.models import Rollout
from tests.fleet.dashboard_fixtures import device_id, seed_devices, seed_halted_rollout
from tests.fleet.fleet_fixtures import ApiServer, FleetUnderTest

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "dashboard-halted-rollout.png"
TELEMETRY = 40

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is missing: 'apt-get install chromium' (make test does)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def halted(fleet: FleetUnderTest) -> Iterator[tuple[ApiServer, int]]:
    """A fleet of 120 devices with telemetry, a rollout halted in wave 1 by its latency gate, its alerts open."""
    ids = seed_devices(fleet.ctx, 120, telemetry_per_device=TELEMETRY, now=fleet.clock.now)
    rollout_id = seed_halted_rollout(fleet.ctx, ids, now=fleet.clock.now)
    alerts.evaluate(fleet.ctx.db.session, fleet.ctx.settings.alerts, fleet.clock.now)
    server = ApiServer(fleet.ctx).start()
    try:
        yield server, rollout_id
    finally:
        server.stop()


class Watched:
    """A page whose requests, console errors and page errors are recorded."""

    def __init__(self, browser: Any, base: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.base = base
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def login(self, token: str) -> None:
        self.page.goto(f"{self.base}/dashboard/")
        assert self.page.url.startswith(f"{self.base}/dashboard/login?next=")
        self.page.fill("#token", token)
        self.page.click("form[action='/dashboard/login'] button")
        self.page.wait_for_url(f"{self.base}/dashboard/")

    def check_clean(self) -> None:
        assert self.requests and all(url.startswith(self.base + "/") for url in self.requests), self.requests
        assert self.errors == []

    def close(self) -> None:
        self.context.close()


def state_of(fleet: FleetUnderTest, rollout_id: int) -> str:
    with fleet.ctx.db.session(readonly=True) as session:
        return session.get(Rollout, rollout_id).state  # type: ignore[union-attr]


def test_an_admin_reads_the_fleet_and_aborts_a_halted_rollout(
    browser: Any, fleet: FleetUnderTest, halted: tuple[ApiServer, int], tmp_path: Path
):
    server, rollout_id = halted
    watched = Watched(browser, server.url)
    page = watched.page
    try:
        watched.login(fleet.admin_token)
        assert page.inner_text("#count-total") == "120"
        assert page.inner_text("#count-offline") == str(len(range(0, 120, 7)))
        assert page.locator("#alerts tbody tr").count() == 1 + len(range(0, 120, 7))
        assert page.locator("#devices tbody tr").count() == 50

        # A device's charts: six SVG charts, the latency one with a point per message for p50 and p99.
        page.click(f"#devices a[href='/dashboard/devices/{device_id(1)}']")
        page.wait_for_selector("svg.edgechart")
        assert page.locator("svg.edgechart").count() == 6
        latency = page.locator("#chart-1 svg.edgechart")
        assert latency.locator("circle.pt").count() == 2 * TELEMETRY
        points = latency.locator("polyline").first.get_attribute("points") or ""
        assert len(points.split()) == TELEMETRY
        assert page.locator("#chart-1 svg.edgechart g.series").evaluate_all("gs => gs.map(g => g.dataset.name)") == [
            "p50",
            "p99",
        ]
        if os.environ.get("EDGESHIP_SCREENSHOTS") == "1":
            page.screenshot(path=str(SCREENSHOT.with_name("dashboard-device.png")), full_page=True)

        # The halted rollout: why it stopped, the gate against its threshold, the waves.
        page.click("nav a[href='/dashboard/rollouts']")
        page.click(f"#rollouts a[href='/dashboard/rollouts/{rollout_id}'] >> nth=0")
        page.wait_for_selector("#halt-reason")
        assert "wave 1: latency_p99_ratio 3.1 breaches 2" in page.inner_text("#halt-reason")
        breached = page.locator("#gates-wave-1 tr.breached")
        assert breached.count() == 1 and re.sub(r"\s+", " ", breached.inner_text()).startswith(
            "latency_p99_ratio 3.1 max 2 breached"
        )
        assert page.locator("#waves tbody tr").count() == 3
        assert page.locator("#waves svg.bar rect.seg").count() >= 3
        shot = page.screenshot(path=str(tmp_path / "halted.png"), full_page=True)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("EDGESHIP_SCREENSHOTS") == "1":
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            SCREENSHOT.write_bytes(shot)

        # Abort asks first: dismissing the question changes nothing.
        here = page.url
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.click("#btn-abort")  # waits for a navigation the click starts; a dismissed question starts none
        page.wait_for_load_state()
        assert page.url == here and page.locator("#done").count() == 0
        assert state_of(fleet, rollout_id) == "rolling_back"
        page.fill("input[name='reason']", "latency regression, investigating")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#btn-abort")
        page.wait_for_selector("#done")
        assert page.inner_text("#done") == "abort: done."
        assert "Aborted: aborted by token:root: latency regression, investigating" in page.inner_text("#halt-reason")
        assert page.locator("#actions").count() == 0  # nothing left to do to an aborted rollout
        assert state_of(fleet, rollout_id) == "aborted"
        watched.check_clean()
    finally:
        watched.close()


def test_a_read_only_login_sees_no_buttons(browser: Any, fleet: FleetUnderTest, halted: tuple[ApiServer, int]):
    server, rollout_id = halted
    watched = Watched(browser, server.url)
    page = watched.page
    try:
        watched.login(fleet.read_token)
        assert "viewer" in page.inner_text("form.who")
        page.goto(f"{server.url}/dashboard/rollouts/{rollout_id}")
        assert "latency_p99_ratio" in page.inner_text("#halt-reason")
        assert page.locator("#actions").count() == 0 and page.locator("button[id^='btn-']").count() == 0
        assert page.locator("form[action^='/dashboard/rollouts/']").count() == 0
        # The cookie is out of reach of the page's scripts.
        assert page.evaluate("document.cookie") == ""
        page.click("form.who button")
        page.wait_for_url(f"{server.url}/dashboard/login")
        page.goto(f"{server.url}/dashboard/rollouts/{rollout_id}")
        assert page.url.startswith(f"{server.url}/dashboard/login?next=")
        assert state_of(fleet, rollout_id) == "rolling_back"
        watched.check_clean()
    finally:
        watched.close()
