"""Loaded models shared between simulated devices, and a slowed-down view for slow CPUs.

An onnxruntime session is immutable once built and safe to run from several threads, so a
thousand simulated devices running one model version share one session instead of loading it a
thousand times (measured in bench/results/sim.md). Each device still verifies, unpacks and
self-tests its own copy of the bundle: only the loaded session is shared.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from typing import Any

from edge_agent.runtime import ModelRuntime
from model_tools.bundle import Bundle


class RuntimeCache:
    """One `ModelRuntime` per distinct (name, version, model bytes), built on first use."""

    def __init__(self, intra_op_threads: int = 1) -> None:
        self.intra_op_threads = intra_op_threads
        self._lock = threading.Lock()
        self._runtimes: dict[tuple[str, str, str], ModelRuntime] = {}
        self.loads = 0  # sessions actually built
        self.hits = 0

    def get(self, bundle: Bundle) -> ModelRuntime:
        m = bundle.manifest
        key = (m.name, m.version, hashlib.sha256(bundle.model_bytes).hexdigest())
        with self._lock:
            runtime = self._runtimes.get(key)
            if runtime is not None:
                self.hits += 1
                return runtime
        runtime = ModelRuntime(bundle, intra_op_threads=self.intra_op_threads)
        with self._lock:
            self.loads += 1
            return self._runtimes.setdefault(key, runtime)


def slowed(runtime: ModelRuntime, factor: float) -> ModelRuntime:
    """The same model on a CPU `factor` times slower than the one its budget was measured on.

    The agent measures latency with a real timer (telemetry, self-test budget, probation), so
    the slowness has to be real time: each run waits `(factor - 1)` times the bundle's measured
    single-row latency. The nominal latency is used rather than this machine's, which a busy
    simulator would inflate; and the wait sleeps, so other devices keep running meanwhile.
    """
    if factor <= 1.0:
        return runtime
    slow = copy.copy(runtime)  # shares the session; only `_run` differs
    fast_run = runtime._run
    extra_s = (factor - 1.0) * runtime.manifest.budget.latency_ms_p50 / 1000.0

    def run(names: Any, feeds: Any, options: Any) -> Any:
        out = fast_run(names, feeds, options)
        time.sleep(extra_s)
        return out

    slow._run = run
    return slow
