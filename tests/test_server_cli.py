"""`edgefleet server` commands through click's CliRunner on a real data dir."""

from __future__ import annotations

import tomllib

from click.testing import CliRunner

from fleet_server.cli import server
from model_tools.signing import generate_keypair, save_public_key
from tests.server_fixtures import make_bundle


def run(*args: str) -> str:
    result = CliRunner().invoke(server, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_provisions_devices_tokens_models_and_broker_material(tmp_path):
    d = str(tmp_path / "data")
    config = tomllib.loads(run("add-device", "--data-dir", d, "pump-1", "--tag", "site=berlin"))
    assert config["device_id"] == "pump-1" and config["mqtt"]["username"] == "pump-1"
    assert config["server"]["url"] == "http://127.0.0.1:8080"
    bad = CliRunner().invoke(server, ["add-device", "--data-dir", d, "pump-1"])
    assert bad.exit_code != 0 and "already exists" in bad.output
    bad = CliRunner().invoke(server, ["add-device", "--data-dir", d, "p2", "--tag", "oops"])
    assert bad.exit_code != 0 and "key=value" in bad.output
    assert "pump-1" in run("list-devices", "--data-dir", d, "--tag", "site=berlin")
    assert run("list-devices", "--data-dir", d, "--tag", "site=paris").strip() == ""
    assert run("create-token", "--data-dir", d, "--role", "operator").startswith("eft_")

    private, public = generate_keypair()
    pub = save_public_key(public, tmp_path / "k.pub")
    assert "trusted key" in run("trust-key", "--data-dir", d, str(pub))
    bundle = tmp_path / "pump.efb"
    bundle.write_bytes(make_bundle(private))
    assert "registered pump 1.0.0" in run("add-model", "--data-dir", d, str(bundle))
    assert "pump" in run("list-models", "--data-dir", d)
    material = run("broker-config", "--data-dir", d, "--mode", "password_file")
    assert "pump-1:$7$101$" in material and "pattern write ef/default/d/%u/telemetry" in material
    assert "allow_anonymous" not in material  # that goes in the operator's mosquitto.conf
    dynsec = run("broker-config", "--data-dir", d)  # the default: the dynamic-security plugin's file
    assert '"username": "pump-1"' in dynsec and '"clientid": "pump-1"' in dynsec and "plugin_opt_config_file" in dynsec
    assert "revoked" in run("revoke-device", "--data-dir", d, "pump-1")
    assert "pump-1:" not in run("broker-config", "--data-dir", d, "--mode", "password_file")
    assert '"pump-1"' not in run("broker-config", "--data-dir", d)
