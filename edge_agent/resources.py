"""What the agent reports about its device: hardware profile and resource use (psutil)."""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from edge_agent.protocol import Hardware, Resources


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("model name", "model", "hardware") and value.strip():
                return value.strip()[:100]
    except OSError:
        pass
    return platform.processor()[:100]


def detect_hardware() -> Hardware:
    return Hardware(
        arch=platform.machine(),
        ram_mb=int(psutil.virtual_memory().total // (1024 * 1024)),
        cpu_count=os.cpu_count() or 1,
        cpu_model=_cpu_model(),
    )


def process_resources(data_dir: str | os.PathLike[str]) -> Callable[[], Resources]:
    """A sampler of this process's CPU time and RSS and the data dir's free disk."""
    proc = psutil.Process()

    def sample() -> Resources:
        try:
            free = shutil.disk_usage(data_dir).free
        except OSError:
            free = 0
        return Resources(cpu_s=round(time.process_time(), 3), rss_bytes=proc.memory_info().rss, disk_free_bytes=free)

    return sample
