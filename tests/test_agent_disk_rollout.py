"""A rollout meets a device whose disk is full (a real 2 MiB tmpfs under its data dir): the
rollout shows `disk_full` with the bytes free and needed for that device, keeps counting it as
updating, and completes once space returns and the device retries by itself; the windows lost
while the disk was completely full show in the server's delivery accounting as dropped by the
device, not as lost in transit."""

from __future__ import annotations

import pytest

from fleet_server import rollouts
from fleet_server.devices import get_device
from fleet_server.registry import trust_key, upload_bundle
from fleet_server.service import FleetServer
from tests.agent_fixtures import bundle_bytes, public_pem
from tests.server_fixtures import connected, make_config, wait_until
from tests.test_agent_disk import pytestmark as disk_marks
from tests.test_agent_disk import small_disk  # noqa: F401 - fixture
from tests.test_rollout_agents import AgentFleet, plan, stage, wait_state

pytestmark = [disk_marks, pytest.mark.broker, pytest.mark.slow]


def test_rollout_shows_disk_full_and_completes_when_space_returns(tmp_path, small_disk):  # noqa: F811
    server = connected(FleetServer(make_config(tmp_path / "server", rollout_interval_s=0.1)).start())
    fleet = AgentFleet(server, small_disk.path)
    try:
        trust_key(fleet.svc, public_pem("trusted"))
        upload_bundle(fleet.svc, bundle_bytes("lr", "1.0.0"))
        upload_bundle(fleet.svc, bundle_bytes("lr", "2.0.0"))
        agent = fleet.add("dev-00")  # provisioned by the server: it verifies the signed desired
        agent.config.update.min_free_disk_bytes = 1024 * 1024
        fleet.run()
        small_disk.leave_free(256 * 1024)  # less than the 1 MiB that must stay free

        rid = rollouts.create_rollout(fleet.svc, plan("2.0.0", [stage(100, soak=0.3)]))["id"]

        def disk_full_shown():
            devices = rollouts.rollout_status(fleet.svc, rid)["devices"]  # empty until assigned
            return devices and (devices[0]["reason"] or "").startswith("disk_full") and devices[0]

        device = wait_until(disk_full_shown, 60, message=lambda: rollouts.rollout_status(fleet.svc, rid)["devices"])
        assert device["status"] == "pending"  # still updating: it retries by itself
        assert "bytes free" in device["reason"] and "needed" in device["reason"], device["reason"]
        assert agent.active_version() == "1.0.0"
        small_disk.fill()  # now completely: windows cannot be stored for a while
        wait_until(lambda: agent.outbox.lost_total >= 2, 30, message="windows lost while the disk is full")

        small_disk.free_up()
        final = wait_state(fleet, rid, {"completed", "paused", "aborted"}, 90)
        assert final["state"] == "completed"
        assert agent.active_version() == "2.0.0"

        def accounted():  # the server's delivery accounting explains every lost window
            delivery = get_device(fleet.svc, "dev-00")["delivery"]
            return delivery and delivery["missing"] >= 2 and delivery["lost"] == 0 and delivery

        delivery = wait_until(accounted, 30, message=lambda: get_device(fleet.svc, "dev-00")["delivery"])
        assert delivery["dropped_by_device"] == delivery["missing"]
    finally:
        fleet.close()
