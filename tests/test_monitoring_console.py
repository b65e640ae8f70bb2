"""The monitoring rows in a real browser against a real fleet with real agents: the Drift page's
multivariate heatmap row and data-quality table, the Performance page's estimated accuracy
without a single label."""

from __future__ import annotations

import pytest

from tests.console_fixtures import DRIFTED, login
from tests.server_fixtures import wait_until

pytest_plugins = ["tests.console_fixtures"]
pytestmark = [pytest.mark.browser, pytest.mark.broker, pytest.mark.slow]


def test_drift_and_performance_pages_show_the_monitoring_rows(console_fleet, browser):
    from playwright.sync_api import expect

    fleet = console_fleet
    wait_until(lambda: fleet.svc.storage.monitoring_rows("demo", "1.0.0"), 60, interval=0.2,
               message="monitoring sums stored")
    session = login(browser, fleet.url, "victor")
    try:
        page = session.goto(f"/console/drift?kind=device&value={DRIFTED}&period=900")
        expect(page.locator("#mv")).to_have_value("demo/1.0.0")
        expect(page.locator("#features-table tbody")).to_contain_text("multivariate (PCA reconstruction error)")
        expect(page.locator("#quality-table tbody tr")).to_have_count(6)
        expect(page.locator("#multivariate-note")).to_contain_text("components of 6 numeric features")
        page.wait_for_function(
            "() => { const c = window.Chart && Chart.getChart('heatmap');"
            " return c && c.options.scales.y.labels.at(-1) === 'multivariate'; }")
        page = session.goto("/console/performance?kind=fleet&period=900")
        expect(page.locator("#estimated-note")).to_contain_text("Estimated from calibrated confidence")
        expect(page.locator("#estimated-note")).to_contain_text("no concept shift")
        page.wait_for_function("() => window.Chart && Chart.getChart('estimated-chart')")
        session.recorder.check()
    finally:
        session.context.close()
