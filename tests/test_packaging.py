"""A device installs `edgefleet[agent]`: that must not pull scikit-learn, skl2onnx or Flask. The
release it installs from: the wheel, the wheelhouse checksums, the installer."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from zipfile import ZipFile

import pytest
import requests
from packaging.requirements import Requirement

from edge_agent.release import install as installer
from edge_agent.release.platforms import (
    SUPPORTED,
    UNSUPPORTED_MESSAGE,
    device_platform,
    wheelhouse_name,
)
from edge_agent.release.wheelhouse import (
    build_wheel,
    read_checksums,
    verify_checksums,
    wheel_requirements,
    write_checksums,
)

pytest_plugins = ["tests.server_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_ON_DEVICE = {"scikit-learn", "skl2onnx", "flask", "onnx", "scipy", "werkzeug"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str]) -> set[str]:
    """Every distribution the requirements pull in, following installed packages' metadata."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for sub in requires:
            parsed = Requirement(sub)
            if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                todo.append(parsed)
    return seen


def test_agent_extra_stays_light():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + project["optional-dependencies"]["agent"]
    pulled = closure(direct)
    assert "onnxruntime" in pulled and "paho-mqtt" in pulled
    assert not pulled & FORBIDDEN_ON_DEVICE, sorted(pulled & FORBIDDEN_ON_DEVICE)


def test_every_extra_is_declared():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"agent", "server", "tools", "sim", "dev"} <= set(extras)


# ---------------------------------------------------------------- release: wheel, wheelhouse, installer


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build_wheel(ROOT, tmp_path_factory.mktemp("dist"))


@pytest.mark.slow
def test_wheel_ships_the_unit_the_installer_and_light_agent_requirements(wheel):
    names = ZipFile(wheel).namelist()
    # docs/device.md copies the unit from the installed package.
    assert "edge_agent/edgefleet-agent.service" in names
    assert "edge_agent/release/install.py" in names
    requirements = {canonical(Requirement(r).name) for r in wheel_requirements(wheel)}
    assert {"onnxruntime", "paho-mqtt", "numpy", "msgspec"} <= requirements
    assert not requirements & FORBIDDEN_ON_DEVICE


def test_installer_states_the_platform_facts_of_edge_agent_release():
    # install.py runs on a device with nothing installed, so it carries its own copy.
    assert tuple(SUPPORTED) == installer.SUPPORTED_MACHINES
    assert installer.UNSUPPORTED_MESSAGE == UNSUPPORTED_MESSAGE
    assert installer.wheelhouse_name("aarch64", (3, 11)) == wheelhouse_name("aarch64", "3.11") == "cp311-aarch64"
    assert installer.CHECKSUMS == "SHA256SUMS"


@pytest.mark.parametrize("machine", ["armv7l", "armv6l", "i686"])
def test_32_bit_machines_are_refused_with_the_reason(machine):
    with pytest.raises(installer.InstallError, match="64-bit Linux only") as info:
        installer.machine_name(machine)
    assert machine in str(info.value) and "64-bit Raspberry Pi OS" in str(info.value)
    with pytest.raises(ValueError, match="no 32-bit ARM"):
        device_platform(machine)
    assert installer.machine_name("arm64") == "aarch64"
    assert device_platform("aarch64").platform_tags()[0] == "manylinux_2_36_aarch64"
    assert "manylinux2014_aarch64" in device_platform("aarch64").platform_tags()


def _fake_wheelhouse(path: Path) -> Path:
    path.mkdir()
    (path / "edgefleet-0.1.0-py3-none-any.whl").write_bytes(b"wheel")
    (path / "numpy-2.4.6-cp311-cp311-manylinux_2_28_aarch64.whl").write_bytes(b"numpy")
    write_checksums(path)
    return path


def test_checksums_catch_changed_missing_and_unlisted_wheels(tmp_path):
    house = _fake_wheelhouse(tmp_path / "house")
    listed = read_checksums(house)
    assert listed["numpy-2.4.6-cp311-cp311-manylinux_2_28_aarch64.whl"] == hashlib.sha256(b"numpy").hexdigest()
    assert verify_checksums(house) == []
    (house / "numpy-2.4.6-cp311-cp311-manylinux_2_28_aarch64.whl").write_bytes(b"numpy, changed")
    (house / "extra-1.0-py3-none-any.whl").write_bytes(b"x")
    (house / "edgefleet-0.1.0-py3-none-any.whl").unlink()
    assert verify_checksums(house) == [
        "edgefleet-0.1.0-py3-none-any.whl: missing",
        "numpy-2.4.6-cp311-cp311-manylinux_2_28_aarch64.whl: sha256 differs",
        "extra-1.0-py3-none-any.whl: not in SHA256SUMS",
    ]


def test_installer_refuses_a_wheel_that_does_not_match_its_checksum(tmp_path):
    house = _fake_wheelhouse(tmp_path / "house")
    dest = tmp_path / "dest"
    dest.mkdir()
    sums, version = installer.fetch_wheelhouse(installer.Source(directory=str(house)), str(dest))
    assert version == "0.1.0" and len(sums) == 2
    (house / "numpy-2.4.6-cp311-cp311-manylinux_2_28_aarch64.whl").write_bytes(b"tampered")
    with pytest.raises(installer.InstallError, match="does not match SHA256SUMS.*nothing was installed"):
        installer.fetch_wheelhouse(installer.Source(directory=str(house)), str(dest))
    (house / "SHA256SUMS").write_text("not-a-digest  ../../etc/passwd\n")
    with pytest.raises(installer.InstallError, match="malformed line"):
        installer.fetch_wheelhouse(installer.Source(directory=str(house)), str(dest))


def test_installer_reads_server_and_credentials_from_the_agent_config(tmp_path):
    (tmp_path / "agent.toml").write_text(
        'device_id = "pi-1"\ndata_dir = "/var/lib/edgefleet"\n[mqtt]\nurl = "mqtts://h:8883"\nusername = "pi-1"\n'
        'password = "pw"\nca_file = "edgefleet-ca.pem"\n[server]\nurl = "https://h:8443"\n')
    cfg = installer.read_config(str(tmp_path / "agent.toml"))
    assert cfg == {"url": "https://h:8443", "user": "pi-1", "password": "pw",
                   "ca_file": str(tmp_path / "edgefleet-ca.pem")}
    (tmp_path / "bare.toml").write_text('device_id = "pi-1"\n')
    with pytest.raises(installer.InstallError, match=r"has no \[server\] url"):
        installer.read_config(str(tmp_path / "bare.toml"))
    with pytest.raises(installer.InstallError, match="cannot read the agent config"):
        installer.read_config(str(tmp_path / "missing.toml"))


# ---------------------------------------------------------------- the fleet server serves the wheelhouse


def _serve_wheelhouse(fleet, house: Path) -> Path:
    from fleet_server.device_install import wheelhouse_dir

    target = wheelhouse_dir(fleet.config) / house.name
    shutil.copytree(house, target)
    return target


@pytest.mark.broker
def test_server_serves_wheelhouse_to_devices_only(fleet, tmp_path):
    house = _serve_wheelhouse(fleet, _fake_wheelhouse(tmp_path / "cp311-aarch64"))
    password = fleet.provision("pi-7")
    base = f"{fleet.url}/api/v1/wheelhouse"
    device = ("pi-7", password)
    assert requests.get(f"{base}/cp311-aarch64/SHA256SUMS", timeout=10).status_code == 401
    assert requests.get(f"{base}/cp311-aarch64/SHA256SUMS", auth=("pi-7", "wrong"), timeout=10).status_code == 401
    sums = requests.get(f"{base}/cp311-aarch64/SHA256SUMS", auth=device, timeout=10)
    assert sums.status_code == 200 and sums.text == (house / "SHA256SUMS").read_text()
    name = "numpy-2.4.6-cp311-cp311-manylinux_2_28_aarch64.whl"
    whole = requests.get(f"{base}/cp311-aarch64/{name}", auth=device, timeout=10)
    assert whole.content == b"numpy" and whole.headers["ETag"].strip('"') == hashlib.sha256(b"numpy").hexdigest()
    part = requests.get(f"{base}/cp311-aarch64/{name}", auth=device, headers={"Range": "bytes=2-"}, timeout=10)
    assert part.status_code == 206 and part.content == b"mpy"
    same = requests.get(f"{base}/cp311-aarch64/{name}", auth=device, timeout=10,
                        headers={"If-None-Match": whole.headers["ETag"]})
    assert same.status_code == 304
    # Only what SHA256SUMS lists is served; unknown wheelhouses say how to build one.
    (house / "stray.whl").write_bytes(b"x")
    assert requests.get(f"{base}/cp311-aarch64/stray.whl", auth=device, timeout=10).status_code == 404
    assert requests.get(f"{base}/cp311-aarch64/..%2Ffleet.db", auth=device, timeout=10).status_code == 404
    missing = requests.get(f"{base}/cp311-armv7l/SHA256SUMS", auth=device, timeout=10)
    assert missing.status_code == 404 and "edgefleet release build" in missing.json()["error"]
    listing = requests.get(base, headers={"Authorization": f"Bearer {fleet.token('viewer')}"}, timeout=10).json()
    assert listing["wheelhouses"][0]["name"] == "cp311-aarch64" and name in listing["wheelhouses"][0]["files"]
    script = requests.get(f"{base}/install.py", auth=device, timeout=10)
    assert script.status_code == 200 and script.text == (ROOT / "edge_agent" / "release" / "install.py").read_text()
    # A revoked device is refused.
    fleet.api("post", "/api/v1/devices/pi-7/revoke")
    assert requests.get(f"{base}/install.py", auth=device, timeout=10).status_code == 401


def test_install_command_names_the_server_ca_and_device(tmp_path):
    from fleet_server.config import ServerConfig
    from fleet_server.device_install import install_command

    tls = install_command(ServerConfig(data_dir=tmp_path, listen="10.0.0.5:8443", tls=True), "pi-1", "p4ss-w_rd")
    assert tls == ("curl -fsS --cacert /etc/edgefleet/edgefleet-ca.pem -u pi-1:p4ss-w_rd "
                   "https://10.0.0.5:8443/api/v1/wheelhouse/install.py "
                   "| sudo python3 - --config /etc/edgefleet/agent.toml")
    plain = install_command(ServerConfig(data_dir=tmp_path, listen="10.0.0.5:8080"), "pi-1", "p4ss-w_rd")
    assert "--cacert" not in plain and "http://10.0.0.5:8080/api/v1/wheelhouse/install.py" in plain


@pytest.mark.slow
@pytest.mark.broker
def test_install_from_the_server_over_https_on_x86_64(tmp_path):
    """The device's path natively: provisioned agent.toml and CA, the installer fetched from and
    downloading from a TLS fleet server, offline pip into a venv, a working `edgefleet agent`."""
    from fleet_server.device_install import install_command
    from fleet_server.service import FleetServer
    from fleet_server.tls import init_tls
    from tests.arm64_fixtures import agent_wheelhouse
    from tests.brokers import free_port, wait_until
    from tests.server_fixtures import ServerHandle
    from tests.server_fixtures import make_config as server_config

    server_dir = tmp_path / "server"
    init_tls(server_dir)
    house = agent_wheelhouse(tmp_path / "dist", machine="x86_64")
    server = FleetServer(server_config(server_dir, tls=True, broker_tls_listen=f"127.0.0.1:{free_port()}")).start()
    try:
        fleet = ServerHandle(server)
        wait_until(lambda: server.ingest.connected.is_set(), 10, message="ingest connected")
        _serve_wheelhouse(fleet, house)
        password = fleet.provision("pi-x86")
        etc = tmp_path / "etc"
        etc.mkdir()
        from fleet_server.devices import agent_config_toml

        (etc / "agent.toml").write_text(agent_config_toml(server.config, "pi-x86", password, []))
        shutil.copyfile(server.config.tls_files[2], etc / "edgefleet-ca.pem")
        command = install_command(server.config, "pi-x86", password, config_dir=str(etc))
        venv = tmp_path / "venv"
        # As printed, except sudo (the test runs as the user it is) and the venv's place.
        command = command.replace("| sudo python3 -", f"| {sys.executable} -") + f" --venv {venv}"
        proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=600,
                              env={"PATH": "/usr/bin:/bin", "PIP_NO_INDEX": "1"})
        assert proc.returncode == 0, proc.stderr
        assert f"wheels for cp311-x86_64 from {server.url}" in proc.stdout and "sha256 checked" in proc.stdout
    finally:
        server.stop()
    keys = subprocess.run([str(venv / "bin" / "edgefleet"), "agent", "config-keys"], capture_output=True, text=True)
    assert keys.returncode == 0 and "mqtt.url" in keys.stdout, keys.stderr
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True).stdout.lower()
    assert "onnxruntime==" in listed and "scikit-learn" not in listed and "flask" not in listed


def test_add_device_prints_the_install_command_beside_the_config(tmp_path):
    from click.testing import CliRunner

    from fleet_server.cli import server

    result = CliRunner().invoke(server, ["add-device", "--data-dir", str(tmp_path / "data"), "pi-9"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = tomllib.loads(result.stdout)  # stdout stays the config alone
    assert config["device_id"] == "pi-9"
    password = config["mqtt"]["password"]
    assert (f"# curl -fsS -u pi-9:{password} {config['server']['url']}/api/v1/wheelhouse/install.py "
            "| sudo python3 - --config /etc/edgefleet/agent.toml") in result.stderr
    assert tomllib.loads(result.output)["device_id"] == "pi-9"  # the notes are TOML comments
