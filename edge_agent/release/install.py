#!/usr/bin/env python3
"""Install the edgefleet agent on a device from its fleet server's wheelhouse (or a local copy).

Standalone: a device runs this file with its own python3 before anything of edgefleet exists
there, so it uses the standard library only. It checks the machine, downloads the wheelhouse
for this machine and Python over HTTPS with the CA the agent config pins, checks every file
against SHA256SUMS, and installs `edgefleet[agent]` into a venv with `pip install --no-index`.

    python3 install.py --config /etc/edgefleet/agent.toml          # from the fleet server
    python3 install.py --from /media/usb/wheelhouse/cp311-aarch64   # from a copied wheelhouse
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

# The same facts as edge_agent.release.platforms (a test keeps the two in step).
SUPPORTED_MACHINES = ("aarch64", "x86_64")
UNSUPPORTED_MESSAGE = (
    "edgefleet's agent runs on 64-bit Linux only (aarch64 or x86_64); this machine is {machine}. "
    "onnxruntime, numpy, msgspec and cffi publish no 32-bit ARM (armv7l/armv6l) wheels, and "
    "building them on the device is not supported. On a Raspberry Pi 3, 4, 5 or Zero 2 W install "
    "the 64-bit Raspberry Pi OS (or Debian arm64); a Pi 1, 2 or Zero (W) cannot run the agent."
)
CHECKSUMS = "SHA256SUMS"
DEFAULT_VENV = "/opt/edgefleet/venv"
DEFAULT_CONFIG = "/etc/edgefleet/agent.toml"
WHEELHOUSE_PATH = "/api/v1/wheelhouse"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.whl$")


class InstallError(Exception):
    """Stops the install; the message says what was wrong and what to do."""


def machine_name(machine: str | None = None) -> str:
    """`uname -m` if supported, else InstallError with the plain reason (before any download)."""
    machine = machine or platform.machine()
    machine = "aarch64" if machine == "arm64" else machine
    if machine not in SUPPORTED_MACHINES:
        raise InstallError(UNSUPPORTED_MESSAGE.format(machine=machine))
    return machine


def wheelhouse_name(machine: str, version_info: tuple[int, int] | None = None) -> str:
    major, minor = version_info or sys.version_info[:2]
    return f"cp{major}{minor}-{machine}"


class Source:
    """Where the wheelhouse comes from: the fleet server (HTTP Basic as the device) or a directory."""

    def __init__(self, directory: str | None = None, base_url: str = "", user: str = "", password: str = "",
                 ca_file: str = "") -> None:
        self.directory = directory
        self.base_url = base_url.rstrip("/")
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() if user else ""
        self.context = None
        if self.base_url.startswith("https://"):
            self.context = ssl.create_default_context(cafile=ca_file or None)

    def describe(self) -> str:
        return self.directory or self.base_url

    def fetch(self, name: str, dest: str) -> str:
        """Copy or download `name` to `dest`; returns its sha256."""
        digest = hashlib.sha256()
        if self.directory:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise InstallError(f"{path} is missing: copy the whole wheelhouse directory")
            src = open(path, "rb")  # noqa: SIM115 - closed below
        else:
            src = self._open(name)
        with src, open(dest, "wb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        return digest.hexdigest()

    def _open(self, name: str):
        url = f"{self.base_url}/{urllib.parse.quote(name)}"
        request = urllib.request.Request(url)
        if self.auth:
            request.add_header("Authorization", self.auth)
        try:
            return urllib.request.urlopen(request, timeout=120, context=self.context)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise InstallError(f"{url}: 401, the server refused this device's credentials "
                                   "(mqtt.username / mqtt.password in the agent config)") from exc
            if exc.code == 404:
                raise InstallError(f"{url}: 404, the fleet server has no such wheelhouse file; on the server "
                                   "build one with `edgefleet release build --out <server data_dir>` "
                                   "for this machine and Python") from exc
            raise InstallError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise InstallError(f"{url}: the server's certificate does not verify against the CA "
                                   f"in the agent config ({reason.verify_message})") from exc
            raise InstallError(f"cannot reach {url}: {reason}") from exc


def read_config(path: str) -> dict:
    """Server URL and device credentials from the agent's TOML config."""
    try:
        import tomllib
    except ImportError as exc:  # Python < 3.11
        raise InstallError(f"the agent needs Python 3.11 or newer; this is {platform.python_version()}") from exc
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise InstallError(f"cannot read the agent config {path}: {exc.strerror}; install the agent.toml "
                           "that `edgefleet server add-device` printed there first") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"{path} is not valid TOML: {exc}") from exc
    mqtt, server = data.get("mqtt", {}), data.get("server", {})
    url = server.get("url", "")
    if not url:
        raise InstallError(f"{path} has no [server] url: the installer downloads from the fleet server there")
    ca = mqtt.get("ca_file", "")
    if ca and not os.path.isabs(ca):
        ca = os.path.join(os.path.dirname(os.path.abspath(path)), ca)
    return {"url": url, "user": mqtt.get("username") or data.get("device_id", ""),
            "password": mqtt.get("password", ""), "ca_file": ca}


def parse_checksums(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        name = name.strip()
        if not (re.fullmatch(r"[0-9a-f]{64}", digest) and SAFE_NAME.match(name)):
            raise InstallError(f"{CHECKSUMS} has a malformed line: {line[:120]!r}")
        out[name] = digest
    if not out:
        raise InstallError(f"{CHECKSUMS} lists no wheels")
    return out


def fetch_wheelhouse(source: Source, dest: str) -> tuple[dict[str, str], str]:
    """Every wheel of SHA256SUMS into `dest`, each checked; returns (checksums, edgefleet version)."""
    sums_path = os.path.join(dest, CHECKSUMS)
    source.fetch(CHECKSUMS, sums_path)
    with open(sums_path) as fh:
        sums = parse_checksums(fh.read())
    for name, expected in sorted(sums.items()):
        got = source.fetch(name, os.path.join(dest, name))
        if got != expected:
            raise InstallError(f"{name}: sha256 {got} does not match {CHECKSUMS} ({expected}); nothing was "
                               "installed. Download again; if it persists, rebuild the wheelhouse on the server")
    versions = [m.group(1) for n in sums if (m := re.match(r"edgefleet-([^-]+)-py3-none-any\.whl$", n))]
    if len(versions) != 1:
        raise InstallError(f"the wheelhouse must hold exactly one edgefleet wheel, it has {len(versions)}")
    return sums, versions[0]


def install(wheel_dir: str, version: str, venv: str) -> str:
    """`pip install --no-index` of edgefleet[agent]==version into `venv` (created when missing)."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        proc = subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True, text=True)
        if proc.returncode != 0:
            raise InstallError(f"cannot create the venv {venv}: {proc.stderr.strip()[-400:]} "
                               "(on Debian and Raspberry Pi OS: apt install python3-venv)")
    proc = subprocess.run(
        [python, "-m", "pip", "install", "--no-index", "--find-links", wheel_dir, "--disable-pip-version-check",
         "--no-cache-dir", "--quiet", f"edgefleet[agent]=={version}"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise InstallError(f"pip install failed:\n{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return os.path.join(venv, "bin", "edgefleet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install the edgefleet agent from a wheelhouse.")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"agent config with [server] url and the device's credentials (default {DEFAULT_CONFIG})")
    parser.add_argument("--from", dest="directory", help="a local wheelhouse directory instead of the server")
    parser.add_argument("--venv", default=DEFAULT_VENV, help=f"where to install (default {DEFAULT_VENV})")
    args = parser.parse_args(argv)
    try:
        machine = machine_name()
        if sys.version_info < (3, 11):  # noqa: UP036 - the device may run an older python3
            raise InstallError(f"the agent needs Python 3.11 or newer; this is {platform.python_version()}")
        name = wheelhouse_name(machine)
        if args.directory:
            source = Source(directory=args.directory)
        else:
            cfg = read_config(args.config)
            source = Source(base_url=f"{cfg['url'].rstrip('/')}{WHEELHOUSE_PATH}/{name}", user=cfg["user"],
                            password=cfg["password"], ca_file=cfg["ca_file"])
        tmp = tempfile.mkdtemp(prefix="edgefleet-install-")
        try:
            sums, version = fetch_wheelhouse(source, tmp)
            print(f"edgefleet {version}: {len(sums)} wheels for {name} from {source.describe()}, sha256 checked")
            command = install(tmp, version, args.venv)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except InstallError as exc:
        print(f"edgefleet install: {exc}", file=sys.stderr)
        return 1
    print(f"installed: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
