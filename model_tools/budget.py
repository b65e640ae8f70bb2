"""Runtime budget: model size, single-row latency and session memory on this machine."""

from __future__ import annotations

import time

import numpy as np

from model_tools.manifest import RuntimeBudget
from model_tools.session import make_session


def _rss_bytes() -> int | None:
    """Resident set size from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def measure_budget(
    model_bytes: bytes,
    feeds: dict[str, np.ndarray],
    *,
    max_runs: int = 200,
    max_seconds: float = 0.25,
) -> RuntimeBudget:
    """Time single-row runs (one thread) for at most `max_runs` or `max_seconds`.

    Memory is the growth of the process's resident set while the session loads and runs:
    an estimate, floored at the model size.
    """
    before = _rss_bytes()
    session = make_session(model_bytes)
    one = {k: v[:1] for k, v in feeds.items()}
    for _ in range(5):  # warm-up: first runs allocate
        session.run(None, one)
    times = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < max_runs and (len(times) < 20 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        session.run(None, one)
        times.append(time.perf_counter() - t0)
    after = _rss_bytes()
    grown = (after - before) if before is not None and after is not None else 0
    ms = np.asarray(times) * 1000.0
    return RuntimeBudget(
        model_bytes=len(model_bytes),
        latency_ms_p50=float(np.percentile(ms, 50)),
        latency_ms_p99=float(np.percentile(ms, 99)),
        peak_memory_bytes=int(max(grown, len(model_bytes))),
    )
