"""Files readable by other local users: the server's data dir is 0700 and every file in it 0600,
whatever the umask of the shell that started it; a data dir left group- or world-readable is
made private at start with a warning naming what was fixed; backup and restore keep it so.

When the tests run as root they also try what the attack did: read the database as `nobody`."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from model_tools.signing import generate_keypair, save_public_key
from tests.brokers import free_port, wait_until
from tests.server_fixtures import make_bundle

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from edge_agent.entry import main; main()", "server"]


def edgefleet(*args: str, umask: int = 0o022, check: bool = True) -> subprocess.CompletedProcess:
    """An `edgefleet server ...` process started from a shell with a permissive umask."""
    result = subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: os.umask(umask))
    if check:
        assert result.returncode == 0, result.stderr
    return result


def loose(data_dir: Path) -> list[str]:
    """Every path in the data dir that anyone but its owner can read, write or enter."""
    found = []
    for path in [data_dir, *data_dir.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        expected = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if mode & 0o077 or (mode | expected) != expected:
            found.append(f"{path.relative_to(data_dir.parent)} {mode:04o}")
    return found


def readable_by_nobody(path: Path) -> bool:
    """Whether the unprivileged `nobody` user can read `path` (only possible to try as root)."""
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    probe = subprocess.run(["cat", str(path)], preexec_fn=drop, capture_output=True, timeout=60)
    return probe.returncode == 0


@pytest.fixture
def shared_parent():
    """A dir other local users may traverse (like /var/lib), so only the data dir's own modes
    keep them out."""
    parent = Path(tempfile.mkdtemp(prefix="edgefleet-perms-"))
    parent.chmod(0o711)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


def test_cli_commands_create_a_private_data_dir(tmp_path):
    data_dir = tmp_path / "server"
    edgefleet("add-device", "--data-dir", str(data_dir), "pump-1", "-o", str(tmp_path / "agent.toml"))
    edgefleet("create-token", "--data-dir", str(data_dir), "--role", "viewer")
    assert (data_dir / "fleet.db").exists()
    assert loose(data_dir) == []
    assert stat.S_IMODE((tmp_path / "agent.toml").stat().st_mode) == 0o600


def test_a_readable_data_dir_is_made_private_at_start_with_a_message(tmp_path):
    data_dir = tmp_path / "server"
    edgefleet("add-device", "--data-dir", str(data_dir), "pump-1")
    # As an older version (or a careless `cp -r`) left it: world-readable database and secrets.
    for path in [data_dir, *data_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    result = edgefleet("list-devices", "--data-dir", str(data_dir))
    assert "readable by other local users" in result.stderr and "fleet.db (0644 -> 0600)" in result.stderr
    assert "pump-1" in result.stdout
    assert loose(data_dir) == []
    again = edgefleet("list-devices", "--data-dir", str(data_dir))
    assert "readable by other local users" not in again.stderr  # nothing left to fix, nothing said


def test_backup_and_restore_keep_the_data_dir_private(tmp_path):
    data_dir = tmp_path / "server"
    edgefleet("add-device", "--data-dir", str(data_dir), "pump-1")
    edgefleet("create-token", "--data-dir", str(data_dir))
    private, public = generate_keypair()
    public_path = save_public_key(public, tmp_path / "signer.pub")
    bundle = tmp_path / "pump-1.0.0.efb"
    bundle.write_bytes(make_bundle(private))
    edgefleet("trust-key", "--data-dir", str(data_dir), str(public_path))
    edgefleet("add-model", "--data-dir", str(data_dir), str(bundle))
    assert any((data_dir / "bundles").rglob("*.efb")) and loose(data_dir) == []
    archive = tmp_path / "fleet-backup.tar.gz"
    edgefleet("backup", "--data-dir", str(data_dir), "-o", str(archive))
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    restored = tmp_path / "restored"
    edgefleet("restore", "--data-dir", str(restored), str(archive))
    assert loose(restored) == []


@pytest.mark.broker
def test_a_running_server_keeps_every_file_private(tmp_path, shared_parent):
    """`server run` with its managed Mosquitto: database, WAL, broker config, password file,
    persistence and secrets are all private while it runs and after it stops."""
    data_dir = shared_parent / "server"
    port = free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*CLI, "run", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}", "--broker-port",
         str(free_port())], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=lambda: os.umask(0o022))
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                return requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_until(up, 30, message="server up")
        edgefleet("add-device", "--data-dir", str(data_dir), "pump-1")  # a write while it runs
        wait_until(lambda: (data_dir / "broker").is_dir() and any((data_dir / "broker").iterdir()), 10,
                   message="broker files")
        assert loose(data_dir) == []
        if os.geteuid() == 0:
            control = shared_parent / "public.txt"
            control.write_text("anyone may read this")
            control.chmod(0o644)
            assert readable_by_nobody(control)  # the probe works: only the modes below stop it
            assert not readable_by_nobody(data_dir / "fleet.db")
            assert not readable_by_nobody(data_dir / "secrets" / "mqtt-server-password")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert loose(data_dir) == []
