"""`edgefleet sim`: listing scenarios, a short run with an embedded server, a run attached to a
running server provisioning through REST."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from edge_agent.entry import main

pytest_plugins = ["tests.server_fixtures"]


def test_scenarios_lists_every_shipped_scenario():
    result = CliRunner().invoke(main, ["sim", "scenarios"])
    assert result.exit_code == 0, result.output
    for name in ("demo", "no-drift", "sudden-shift", "broken-sensor", "flaky-fleet"):
        assert name in result.output


def test_run_refuses_unknown_scenarios_and_missing_server_options(tmp_path):
    r = CliRunner().invoke(main, ["sim", "run", "--scenario", "nope", "--data-dir", str(tmp_path)])
    assert r.exit_code != 0 and "shipped scenarios" in r.output
    r = CliRunner().invoke(main, ["sim", "run", "--server", "http://127.0.0.1:9"])
    assert r.exit_code != 0 and "--data-dir" in r.output and "--token" in r.output


@pytest.mark.broker
@pytest.mark.slow
def test_run_with_an_embedded_server(tmp_path):
    r = CliRunner().invoke(main, [
        "sim", "run", "--devices", "3", "--scenario", "no-drift", "--data-dir", str(tmp_path / "srv"),
        "--workdir", str(tmp_path / "sim"), "--speed", "120", "--duration", "3", "--progress-every", "0.5",
    ])
    assert r.exit_code == 0, r.output
    assert "online 3/3" in r.output and "done:" in r.output
    assert (tmp_path / "sim" / "devices" / "sim-0003" / "agent.toml").exists()


@pytest.mark.broker
@pytest.mark.slow
def test_run_attached_to_a_server_provisions_through_rest(fleet, tmp_path):
    from fleet_server.registry import trust_key, upload_bundle
    from tests.sim_fixtures import _signer, trained

    trust_key(fleet.svc, _signer()[1].public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    upload_bundle(fleet.svc, trained().bundle_bytes)
    r = CliRunner().invoke(main, [
        "sim", "run", "--devices", "2", "--server", fleet.url, "--token", fleet.token("operator"),
        "--workdir", str(tmp_path / "sim"), "--speed", "60", "--duration", "2", "--progress-every", "0.5",
    ])
    assert r.exit_code == 0, r.output
    devices = fleet.api("get", "/api/v1/devices", "viewer").json()["devices"]
    assert {d["id"] for d in devices} == {"sim-0001", "sim-0002"}
    assert all(d["active_version"] == "1.0.0" for d in devices)
