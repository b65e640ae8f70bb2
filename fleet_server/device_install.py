"""How a device installs the agent from this server: where the wheelhouses live (built by
`edgefleet release build`) and the one-line install command printed with each agent config."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from fleet_server.config import ServerConfig

WHEELHOUSE_ROUTE = "/api/v1/wheelhouse"
WHEELHOUSE_NAME = re.compile(r"^cp3\d{1,2}-(aarch64|x86_64)$")
DEVICE_CONFIG_DIR = "/etc/edgefleet"


def wheelhouse_dir(config: ServerConfig) -> Path:
    """DATA_DIR/wheelhouse: `edgefleet release build --out DATA_DIR` writes cp311-aarch64/ etc. there."""
    return config.data_dir / "wheelhouse"


def install_command(config: ServerConfig, device_id: str, password: str, config_dir: str = DEVICE_CONFIG_DIR) -> str:
    """The shell line a device runs (as a user with sudo) once agent.toml (and the CA) are in `config_dir`.

    curl fetches the installer as the device (HTTP Basic) over HTTPS verified by the CA the
    config pins; the installer then downloads the wheelhouse the same way, checks SHA256SUMS and
    runs `pip install --no-index` into /opt/edgefleet/venv.
    """
    url = f"{config.server_url}{WHEELHOUSE_ROUTE}/install.py"
    ca = f"--cacert {shlex.quote(f'{config_dir}/{config.device_ca_file}')} " if url.startswith("https://") else ""
    credentials = shlex.quote(f"{device_id}:{password}")
    return (f"curl -fsS {ca}-u {credentials} {shlex.quote(url)} "
            f"| sudo python3 - --config {shlex.quote(f'{config_dir}/agent.toml')}")
