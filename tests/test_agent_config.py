"""Configuration: TOML parsing, unknown keys named, every key documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import ConfigError, all_keys, load_config
from tests.agent_fixtures import config_toml, make_config

ROOT = Path(__file__).resolve().parent.parent


def test_round_trip_and_defaults(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi-1"\ndata_dir = "data"\n[mqtt]\nurl = "mqtts://broker:8883"\n')
    config = load_config(path)
    assert config.fleet == "default" and config.data_dir == str(tmp_path / "data")
    assert config.mqtt.tls and config.mqtt.host_port() == ("broker", 8883)
    assert config.http.listen == "127.0.0.1:8470" and config.update.keep_versions == 2
    full = make_config(tmp_path)
    path.write_text(config_toml(full))
    assert load_config(path) == full


@pytest.mark.parametrize("text,needle", [
    ('device_id = "a"\ndata_dir = "d"\ncolour = 1\n', "'colour'"),
    ('device_id = "a"\ndata_dir = "d"\n[http]\nlisten_on = "x"\n', "'listen_on' in [http]"),
    ('device_id = "a"\ndata_dir = "d"\n[telemetry]\nwindow_s = "soon"\n', "[telemetry] window_s"),
    ('data_dir = "d"\n', "'device_id'"),
    ('device_id = "a/b"\ndata_dir = "d"\n', "device_id"),
    ('device_id = "a"\ndata_dir = "d"\n[mqtt]\nurl = "http://x"\n', "mqtt://"),
    ('device_id = "a"\ndata_dir = "d"\n[feedback]\nmax_record = 10\n', "'max_record' in [feedback]"),
    ('device_id = "a"\ndata_dir = "d"\n[feedback]\nmax_records = 0\n', "[feedback] max_records"),
    ('device_id = "a"\ndata_dir = "d"\n[feedback]\nhorizon_s = -1\n', "[feedback] horizon_s"),
    ("device_id = ", "not valid TOML"),
])
def test_bad_config_names_the_problem(tmp_path, text, needle):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert needle in str(exc.value)


def test_every_config_key_is_documented():
    doc = (ROOT / "docs" / "device.md").read_text()
    missing = [key for key in all_keys() if f"`{key}`" not in doc]
    assert not missing, f"undocumented config keys: {missing}"


def test_every_agent_command_is_documented():
    from edge_agent.cli import agent

    doc = (ROOT / "docs" / "cli.md").read_text()
    for name, command in agent.commands.items():
        assert command.help, name
        assert f"### edgefleet agent {name}" in doc, name
