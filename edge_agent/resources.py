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
