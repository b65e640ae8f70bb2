"""`edgefleet server add-device` takes the options of POST /api/v1/devices (the agent's HTTP listen
address, telemetry window and data dir), so many agents can be provisioned for one host; both
refuse a bad value naming it, before anything is stored, and print the same config."""

from __future__ import annotations

import time
import tomllib

import pytest
from click.testing import CliRunner

from edge_agent.config import load_config as load_agent_config
from fleet_server.auth import issue_token
from fleet_server.cli import server
from tests.server_fixtures import make_config


def add_device(data_dir, *args: str):
    return CliRunner().invoke(server, ["add-device", "--data-dir", str(data_dir), *args])


def test_cli_options_reach_the_agent_config(tmp_path):
    data_dir = tmp_path / "server"
    configs = []
    for i in range(3):  # three agents on one test rig, each on its own port
        out = tmp_path / f"agent-{i}.toml"
        result = add_device(data_dir, f"rig-{i}", "--agent-listen", f"127.0.0.1:{8471 + i}", "--window-s", "15",
                            "--agent-data-dir", f"/var/lib/edgefleet-{i}", "-o", str(out))
        assert result.exit_code == 0, result.output
        configs.append(load_agent_config(out))
    assert [c.http.listen for c in configs] == ["127.0.0.1:8471", "127.0.0.1:8472", "127.0.0.1:8473"]
    assert {c.telemetry.window_s for c in configs} == {15.0}
    assert [str(c.data_dir) for c in configs] == [f"/var/lib/edgefleet-{i}" for i in range(3)]


@pytest.mark.parametrize(("args", "message"), [
    (["--agent-listen", "8471"], "HOST:PORT"),
    (["--agent-listen", "127.0.0.1:99999"], "HOST:PORT"),
    (["--agent-listen", "127.0.0.1:80\nx"], "HOST:PORT"),
    (["--window-s", "0"], "window-s"),
    (["--window-s", "a minute"], "window-s"),
    (["--agent-data-dir", "/var/lib/a\x00b"], "data_dir"),
])
def test_bad_options_are_refused_before_anything_is_stored(tmp_path, args, message):
    data_dir = tmp_path / "server"
    result = add_device(data_dir, "rig-1", *args)
    assert result.exit_code != 0 and message in result.output, result.output
    listed = CliRunner().invoke(server, ["list-devices", "--data-dir", str(data_dir), "--json"])
    assert "rig-1" not in listed.output


def test_cli_and_api_print_the_same_config(tmp_path):
    import requests

    from fleet_server.service import FleetServer

    fleet = FleetServer(make_config(tmp_path / "server"), mqtt=False, ingest=False, loops=False).start()
    try:
        token = issue_token(fleet.svc.storage, "ops", "operator", time.time())
        r = requests.post(f"{fleet.url}/api/v1/devices", headers={"Authorization": f"Bearer {token}"}, timeout=10,
                          json={"id": "via-api", "listen": "0.0.0.0:9000", "window_s": 30, "data_dir": "/srv/ef"})
        assert r.status_code == 201, r.text
        result = add_device(tmp_path / "server", "via-cli", "--agent-listen", "0.0.0.0:9000", "--window-s", "30",
                            "--agent-data-dir", "/srv/ef")
        assert result.exit_code == 0, result.output
        api_config, cli_config = tomllib.loads(r.json()["agent_config"]), tomllib.loads(result.output)
        for section in ("http", "telemetry"):
            assert api_config[section] == cli_config[section]
        assert api_config["data_dir"] == cli_config["data_dir"] == "/srv/ef"
        assert {k for k in api_config if k not in ("device_id",)} == {k for k in cli_config if k != "device_id"}
    finally:
        fleet.stop()
