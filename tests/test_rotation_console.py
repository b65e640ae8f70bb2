"""The console's "Rotate password" button, in a real browser against the real server and real
agents: an operator rotates a device's password and watches it confirmed; a viewer has no button."""

from __future__ import annotations

import pytest

from tests.console_fixtures import login
from tests.test_rotation import broker_login

pytest_plugins = ["tests.console_fixtures"]
pytestmark = [pytest.mark.browser, pytest.mark.broker, pytest.mark.slow]


def test_an_operator_rotates_a_password_from_the_device_page(console_fleet, browser):
    from playwright.sync_api import expect

    device = "press-01"
    agent = console_fleet.agents[device]
    old = agent.config.mqtt.password
    alice = login(browser, console_fleet.url, "alice")
    try:
        page = alice.goto(f"/console/devices/{device}")
        expect(page.locator("#credentials")).to_contain_text("never rotated")
        page.locator("#rotate-password").click()
        expect(page.locator("#confirm-title")).to_contain_text("Rotate the device's password")
        page.locator("#confirm-ok").click()
        expect(page.locator("#credentials")).to_contain_text("confirmed", timeout=30_000)
        expect(page.locator("#credentials")).to_contain_text("by alice")
        alice.recorder.check()
    finally:
        alice.context.close()
    assert agent.config.mqtt.password != old
    assert broker_login(console_fleet.server.config, device, old) == "Not authorized"
    audit = console_fleet.svc.storage.list_audit(limit=50)
    assert any(a["actor"] == "alice" and a["outcome"] == "ok" and "rotate" in a["action"] for a in audit), audit


def test_a_viewer_has_no_rotate_button(console_fleet, browser):
    from playwright.sync_api import expect

    victor = login(browser, console_fleet.url, "victor")
    try:
        page = victor.goto("/console/devices/press-02")
        expect(page.locator("#credentials")).to_contain_text("Password rotation")
        expect(page.locator("#rotate-password")).to_have_count(0)
    finally:
        victor.context.close()
