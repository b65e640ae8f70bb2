"""A full disk, on a real small file system (a 2 MiB tmpfs mounted for the test).

SQLite's COMMIT on a full disk fails with "database or disk is full" and rolls the transaction
back itself; the outbox must neither crash on it nor hide the loss. Every other write (state
files, the download) is tested the same way, and the agent must recover by itself once space
returns.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from edge_agent.outbox import Outbox
from edge_agent.store import DataDir, atomic_write_bytes, is_disk_full

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


class SmallDisk:
    """A tmpfs of `size` mounted at `path`; `fill()` takes every free byte, `free_up()` returns them."""

    def __init__(self, path: Path, size: str = "2m") -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
        self.filler = path / f"filler-{uuid.uuid4().hex[:8]}"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 16, 4096, 512, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert is_disk_full(exc), exc
        finally:
            os.close(fd)

    def free_up(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    try:
        disk = SmallDisk(tmp_path / "small")
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    yield disk
    disk.unmount()


def test_outbox_survives_a_full_disk_and_counts_what_it_lost(small_disk):
    outbox = Outbox(small_disk.path / "outbox.sqlite3")
    first = outbox.append("telemetry", lambda seq: b"a" * 1000)
    small_disk.fill()
    lost = [outbox.append("telemetry", lambda seq: b"b" * 5000) for _ in range(4)]
    assert lost == [None] * 4  # no "cannot rollback - no transaction is active"
    assert outbox.dropped_total == 4 and outbox.lost_total == 4 and outbox.write_error
    assert outbox.next_seq == first + 5  # the lost messages used their seqs: the server sees a gap

    small_disk.free_up()  # space returns: the next message is stored, with the loss counted
    after = outbox.append("telemetry", lambda seq: b"c" * 100)
    assert after == first + 5 and outbox.write_error is None
    outbox.close()

    reopened = Outbox(small_disk.path / "outbox.sqlite3")
    assert reopened.dropped_total == 4  # persisted with the first message written afterwards
    assert [m.seq for m in reopened.pending()] == [first, after]
    assert reopened.next_seq == after + 1
    reopened.close()


def test_acks_on_a_full_disk_are_kept_for_later(small_disk):
    outbox = Outbox(small_disk.path / "outbox.sqlite3")
    seqs = [outbox.append("events", lambda seq: b"e" * 2000) for _ in range(3)]
    small_disk.fill()
    for seq in seqs:
        outbox.ack(seq)
    outbox.commit_acks()  # may or may not fit; never raises
    small_disk.free_up()
    outbox.commit_acks()
    assert outbox.count() == 0 and outbox.bytes == 0
    outbox.close()


def test_state_files_are_never_torn_and_leave_no_temp_file(small_disk):
    data = DataDir(small_disk.path / "agent").create()
    data.commit("1.0.0", None)
    small_disk.fill()
    with pytest.raises(OSError) as info:
        atomic_write_bytes(data.state_file, b"x" * 100_000)
    assert is_disk_full(info.value)
    assert data.committed() == ("1.0.0", None)
    assert [p.name for p in data.root.iterdir() if p.name.endswith(".tmp")] == []
