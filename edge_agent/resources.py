"""What the agent reports about its device: hardware profile and resource use (stdlib only).

Linux figures come from /proc and sysconf, the same sources psutil reads there (RSS is
/proc/self/statm's resident pages, RAM is the kernel's total RAM), without importing psutil.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.protocol import Hardware, Resources

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            value = value.strip()
            # x86 also has "model: 17" (a number) before "model name": skip bare numbers.
            if key.strip().lower() in ("model name", "model", "hardware") and value and not value.isdigit():
                return value[:100]
    except OSError:
        pass
    return platform.processor()[:100]


def total_ram_bytes() -> int:
    """Physical RAM in bytes (0 if the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * _PAGE_SIZE
    except (AttributeError, OSError, ValueError):
        pass
    try:  # sysconf names vary by platform; Linux always has /proc/meminfo
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_bytes() -> int:
    """This process's resident set size in bytes.

    Linux: resident pages from /proc/self/statm. Elsewhere: the peak RSS from getrusage (no
    stdlib call gives the current figure there; the agent is deployed on Linux).
    """
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        import resource  # Unix only, and only needed off Linux

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


# cgroup v1 reports "no limit" as a page-rounded 2^63 - 1; anything this large is no cap.
_NO_LIMIT = 2**60


def _cgroup_mounts() -> dict[str, tuple[Path, str]]:
    """{"v2" | "v1": (mount point, the cgroup path mounted there)} for the memory controller."""
    mounts: dict[str, tuple[Path, str]] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        if rest[0] == "cgroup2":
            mounts.setdefault("v2", (Path(fields[4]), fields[3]))
        elif rest[0] == "cgroup" and "memory" in rest[2].split(","):
            mounts.setdefault("v1", (Path(fields[4]), fields[3]))
    return mounts


def memory_limit_bytes() -> int | None:
    """The memory cap of this process's cgroup and its ancestors (systemd's MemoryMax), or None.

    cgroup v2's memory.max, or v1's memory.limit_in_bytes; the lowest along the path is the one
    the kernel enforces.
    """
    try:
        own = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    except OSError:
        return None
    mounts = _cgroup_mounts()
    candidates = []
    for hierarchy, controllers, path in (entry for entry in own if len(entry) == 3):
        if hierarchy == "0" and controllers == "" and "v2" in mounts:
            candidates.append((mounts["v2"], path, "memory.max"))
        elif "memory" in controllers.split(",") and "v1" in mounts:
            candidates.append((mounts["v1"], path, "memory.limit_in_bytes"))
    limits = []
    for (mount, root), path, name in candidates:
        # Inside a cgroup namespace the mount's root is a prefix of the path: strip it.
        rel = path[len(root):] if root != "/" and path.startswith(root) else path
        directory = mount / rel.lstrip("/")
        while True:
            try:
                text = (directory / name).read_text().strip()
                if text != "max" and 0 < int(text) < _NO_LIMIT:
                    limits.append(int(text))
            except (OSError, ValueError):
                pass
            if directory == mount or mount not in directory.parents:
                break
            directory = directory.parent
    return min(limits) if limits else None


def detect_hardware() -> Hardware:
    return Hardware(
        arch=platform.machine(),
        ram_mb=int(total_ram_bytes() // (1024 * 1024)),
        cpu_count=os.cpu_count() or 1,
        cpu_model=_cpu_model(),
    )


def process_resources(data_dir: str | os.PathLike[str]) -> Callable[[], Resources]:
    """A sampler of this process's CPU time and RSS and the data dir's free disk."""

    def sample() -> Resources:
        try:
            free = shutil.disk_usage(data_dir).free  # os.statvfs: f_bavail * f_frsize
        except OSError:
            free = 0
        return Resources(cpu_s=round(time.process_time(), 3), rss_bytes=rss_bytes(), disk_free_bytes=free)

    return sample
