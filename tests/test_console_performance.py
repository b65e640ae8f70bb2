"""The performance page in a real browser (Debian's Chromium via Playwright) against a real fleet
server with real agents that get ground truth back: one device's labels no longer match what the
model learned (concept drift) while its inputs stay the same; the page shows a performance alert
for it and reads its buckets as concept drift. The screenshot is docs/img/console-performance.png.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tests.agent_fixtures import dataset
from tests.console_fixtures import login, shoot
from tests.server_fixtures import wait_until

pytest_plugins = ["tests.console_fixtures"]
pytestmark = [pytest.mark.browser, pytest.mark.broker, pytest.mark.slow]

CONCEPT = "press-02"  # its truth is the opposite class: the model is wrong, its inputs are not


@pytest.fixture(scope="module")
def labelled(console_fleet):
    """Every agent gets the truth for its predictions back; CONCEPT's truth is flipped."""
    config = console_fleet.svc.config
    config.perf_min_labels = 40  # one-second buckets: a few dozen labels each
    X, y = dataset()
    X, y = X[800:], y[800:]  # the bundle's validation rows: healthy devices meet its score
    rng = np.random.default_rng(3)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.05):
            for device_id, agent in list(console_fleet.agents.items()):
                pick = rng.integers(0, len(X), 30)
                try:
                    answer = agent.predict(X[pick].tolist())
                except Exception:  # noqa: BLE001 - mid-swap during a rollout: the next call serves
                    continue
                truth = 1 - y[pick] if device_id == CONCEPT else y[pick]
                agent.feedback([{"id": i, "label": int(t)} for i, t in zip(answer.ids, truth, strict=True)])

    thread = threading.Thread(target=loop, name="console-labels", daemon=True)
    thread.start()
    yield console_fleet
    stop.set()
    thread.join(5)


def test_performance_page_tells_concept_drift_apart(labelled, browser):
    from playwright.sync_api import expect

    fleet = labelled
    wait_until(lambda: [a for a in fleet.svc.storage.list_alerts(kind="performance", state="open")
                        if a["scope"] == f"device:{CONCEPT}" and a["severity"] == "alert"], 90, interval=0.2,
               message=f"a performance alert for {CONCEPT}")
    session = login(browser, fleet.url, "alice")
    try:
        page = session.goto(f"/console/performance?kind=device&value={CONCEPT}&period=900")
        expect(page.locator("#mv")).to_have_value("demo/1.0.0")
        expect(page.locator("#diagnosis-table tbody")).to_contain_text("inputs the same, model wrong")
        expect(page.locator("#summary")).to_contain_text("Validation accuracy")
        expect(page.locator("#classes-table tbody tr")).to_have_count(2)
        expect(page.locator("#alerts-table tbody")).to_contain_text(CONCEPT)
        expect(page.locator("#devices-table tbody tr", has_text="press-00")).to_be_visible()
        page.wait_for_function("() => window.Chart && Chart.getChart('concept-chart') && Chart.getChart('calibration-chart')")
        shoot(page, "performance")
        # The whole fleet: the healthy devices hold their accuracy.
        page.locator("select[name=kind]").select_option("fleet")
        expect(page.locator("#devices-table tbody tr")).to_have_count(len(fleet.agents))
        healthy = {a["scope"] for a in fleet.svc.storage.list_alerts(kind="performance")} & {
            f"device:press-0{i}" for i in (0, 1, 3)}
        assert not healthy, healthy
        session.recorder.check()
    finally:
        session.context.close()
