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
from tests.agent_fixtures import (
    Collector,
    bundle_bytes,
    bundle_server_fixture,  # noqa: F401 - fixture
    collector_fixture,  # noqa: F401 - fixture
    install_active,
    make_config,
    publish_desired,
)
from tests.brokers import wait_until

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

    def leave_free(self, n: int) -> None:
        """Take all but about `n` bytes."""
        self.fill()
        os.truncate(self.filler, max(0, self.filler.stat().st_size - n))

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


# ---------------------------------------------------------------- a real agent on the small disk


@pytest.fixture
def disk_agent(small_disk, broker, bundle_server):
    """An in-process agent (AgentService, real MQTT) whose data dir is on the small disk."""
    from edge_agent.agent import Agent
    from edge_agent.config import ServerConfig
    from edge_agent.service import AgentService

    services = []

    def start(**update):
        config = make_config(small_disk.path, broker, server=ServerConfig(url=bundle_server.base),
                             update={"min_free_disk_bytes": 0, **update})
        install_active(config.path, bundle_bytes("lr", "1.0.0"))
        service = AgentService(config, agent_factory=lambda c: Agent(c, faults="")).start()
        services.append(service)
        wait_until(lambda: service.agent.link.connected, 10, message="agent connected")
        return service

    yield start
    for s in services:
        s.stop()


def test_a_bundle_that_does_not_fit_is_disk_full_and_retried_when_space_returns(
        disk_agent, small_disk, broker, collector, bundle_server):
    service = disk_agent(min_free_disk_bytes=1024 * 1024)  # leave 1 MiB: more than the disk has once filled
    small_disk.leave_free(256 * 1024)
    data = bundle_bytes("lr", "2.0.0")
    publish_desired(broker, "dev-1", bundle_server.desired("dev-1", "b.efb", data))
    report = wait_until(lambda: (r := collector.latest("reported")) and r.update_state == "Idle"
                        and r.update_outcome == "disk_full" and r, 30,
                        message=lambda: f"disk_full reported: {collector.latest('reported')}")
    assert report.update_retry is True and report.active_version == "1.0.0"
    assert "bytes free" in report.last_error and f"{len(data) + 1024 * 1024} needed" in report.last_error
    assert collector.outcomes() == ["disk_full"]
    assert service.agent.predict([[0.1] * 6]).version == "1.0.0"  # serving all along

    small_disk.free_up()  # no new desired: the agent notices the space and tries again
    wait_until(lambda: "success" in collector.outcomes(), 60, message="retried once space returned")
    assert service.agent.active_version() == "2.0.0"


def test_a_completely_full_disk_neither_crashes_the_update_nor_hides_lost_windows(
        disk_agent, small_disk, broker, bundle_server):
    """The disk fills up completely: SQLite's COMMIT fails, update.json cannot be saved. The
    update ends as disk_full (seen in `reported`, which needs no disk), windows are lost but
    counted, and when space returns the agent updates by itself and the server's accounting
    (seq gaps against the device's dropped_total) explains every lost message."""
    collector = Collector(broker, ack=True)
    try:
        service = disk_agent()
        wait_until(lambda: collector.get("telemetry"), 10, message="a first window")
        small_disk.fill()
        publish_desired(broker, "dev-1", bundle_server.desired("dev-1", "b.efb", bundle_bytes("lr", "2.0.0")))
        wait_until(lambda: (r := collector.latest("reported")) and r.update_outcome == "disk_full"
                   and r.update_state == "Idle", 30,
                   message=lambda: f"disk_full reported: {collector.latest('reported')}")
        wait_until(lambda: service.agent.outbox.lost_total >= 2, 10, message="windows lost while full")
        assert service.agent.predict([[0.1] * 6]).version == "1.0.0"

        small_disk.free_up()
        wait_until(lambda: service.agent.active_version() == "2.0.0", 60, message="updated once space returned")

        def accounted():
            seqs = {m.seq for kind in ("telemetry", "events") for m in collector.get(kind)}
            windows = sorted(collector.get("telemetry"), key=lambda w: w.seq)
            gaps = max(seqs) - min(seqs) + 1 - len(seqs)
            return gaps > 0 and windows[-1].dropped_total == gaps and (gaps, windows[-1].dropped_total)

        wait_until(accounted, 30, message="every lost message explained by dropped_total")
        assert service.agent.outbox.lost_total >= 2
    finally:
        collector.close()
