"""Setting up the emulated arm64 device fails with a message that says what to do (no binfmt
handler, no space, the mirror unreachable), never skips, never uses a half-built root; the
memory cgroup really caps what runs in it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.arm64_fixtures import (
    BINFMT,
    COMPLETE,
    DeviceRootError,
    MemoryCgroup,
    binfmt_problem,
    build_root,
    check_space,
    host_mirror,
    root_key,
)
from tests.brokers import free_port


def test_missing_disabled_or_chroot_unfit_binfmt_handler_is_named(tmp_path):
    entry = tmp_path / "qemu-aarch64"
    assert "make binfmt" in binfmt_problem(entry)
    entry.write_text("disabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\n")
    assert "update-binfmts --enable qemu-aarch64" in binfmt_problem(entry)
    entry.write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: P\n")
    assert "F (fix binary)" in binfmt_problem(entry)
    entry.write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\n")
    assert binfmt_problem(entry) is None
    assert binfmt_problem(BINFMT) is None, "make setup registers the qemu-aarch64 handler"


def test_no_space_for_the_root_says_how_much(tmp_path):
    with pytest.raises(DeviceRootError, match=r"no space for the arm64 device root: \d+ MiB free at .* MiB needed"):
        check_space(tmp_path, needed=1 << 60)
    check_space(tmp_path, needed=1)


def test_unreachable_mirror_fails_and_a_half_built_root_is_never_used(tmp_path):
    packages = ("python3", "hello")
    target = tmp_path / f"arm64-root-{root_key('bookworm', packages)}"
    (target / "usr" / "bin").mkdir(parents=True)  # an interrupted build: no completion marker
    stale = tmp_path / f".{target.name}.abc123"
    stale.mkdir()
    mirror = f"http://127.0.0.1:{free_port()}/debian"
    with pytest.raises(DeviceRootError, match=r"the Debian mirror is unreachable \(http://127\.0\.0\.1:\d+/debian/"
                                              r"dists/bookworm/Release"):
        build_root(tmp_path, packages, release="bookworm", mirror=mirror)
    assert not (target / COMPLETE).exists()
    (target / COMPLETE).write_text("done\n")
    assert build_root(tmp_path, packages, release="bookworm", mirror=mirror) == target  # cached: no mirror needed


def test_host_mirror_from_deb822_and_one_line_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    assert host_mirror("bookworm", tmp_path) == "http://mirror.example/debian"
    assert host_mirror("bookworm-security", tmp_path) == "http://security.example/debian-security"
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://old.example/debian trixie main\n")
    assert host_mirror("trixie", tmp_path) == "http://old.example/debian"
    with pytest.raises(DeviceRootError, match="no Debian mirror for sid"):
        host_mirror("sid", tmp_path)


def test_memory_cgroup_caps_what_runs_in_it():
    cgroup = MemoryCgroup(64 * 2**20)
    try:
        assert cgroup.limit_bytes() == 64 * 2**20
        small = subprocess.run([sys.executable, "-c", "b = bytearray(16 * 2**20); b[::4096] = b'x' * (len(b) // 4096)"],
                               preexec_fn=cgroup.enter)
        assert small.returncode == 0
        large = subprocess.run([sys.executable, "-c", "b = bytearray(256 * 2**20); b[::4096] = b'x' * (len(b) // 4096)"],
                               preexec_fn=cgroup.enter, capture_output=True)
        assert large.returncode != 0  # killed by the cgroup's OOM killer (or MemoryError)
    finally:
        cgroup.remove()
    assert not cgroup.path.exists()
