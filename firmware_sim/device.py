"""One simulated device: a real `edge_agent.Agent` plus what surrounds it (data, hardware,
network, faults, restarts).

`SimAgent` is the agent itself with three seams a simulator needs and nothing else changed:
loaded sessions come from a shared `RuntimeCache` (slowed down on a slow CPU), a faulty network
may rewrite where a download comes from, and telemetry windows are counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.protocol import Hardware, Resources
from edge_agent.runtime import ModelRuntime
from edge_agent.validation import RequestError
from firmware_sim.datagen import DeviceStream
from firmware_sim.faults import FaultPlan
from firmware_sim.network import FaultyDownloads, cut_connection
from firmware_sim.runtimes import RuntimeCache, slowed
from model_tools.bundle import Bundle

log = logging.getLogger("firmware_sim.device")

MiB = 1024 * 1024
RESTART_AFTER_S = 30.0  # simulated seconds a crashed device stays down before it boots again
MAX_ROWS_PER_STEP = 1000  # the agent's default http.max_rows


@dataclass(frozen=True)
class HardwareProfile:
    """A kind of device the fleet is made of (reported to the server in `reported.hardware`)."""

    name: str
    arch: str
    ram_mb: int
    cpu_count: int
    cpu_model: str
    disk_mb: int

    def hardware(self) -> Hardware:
        return Hardware(arch=self.arch, ram_mb=self.ram_mb, cpu_count=self.cpu_count,
                        cpu_model=self.cpu_model, profile=self.name)


PROFILES = (
    HardwareProfile("pi4-4g", "aarch64", 4096, 4, "Raspberry Pi 4 Model B Rev 1.4", 32_000),
    HardwareProfile("pi5-8g", "aarch64", 8192, 4, "Raspberry Pi 5 Model B Rev 1.0", 64_000),
    HardwareProfile("pi3b", "armv7l", 1024, 4, "Raspberry Pi 3 Model B Rev 1.2", 16_000),
    HardwareProfile("pizero2w", "aarch64", 512, 4, "Raspberry Pi Zero 2 W Rev 1.0", 8_000),
    HardwareProfile("n100-gw", "x86_64", 8192, 4, "Intel(R) N100", 128_000),
)


def profile_for(device_id: str, seed: int = 0) -> HardwareProfile:
    """A device's hardware, fixed by its id (a fleet is a mix, the same mix every run)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:hw:{device_id}".encode()).digest()[:4], "big")
    return PROFILES[h % len(PROFILES)]


class SimulatedCrash(BaseException):  # noqa: N818 - not an error: the simulated power cut
    """Raised in the update worker when a device is killed in a state; BaseException so that no
    `except Exception` in the agent can swallow it."""


class SimAgent(Agent):
    """The real agent with a shared session cache, a CPU speed factor and a faulty download path."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        runtimes: RuntimeCache,
        cpu_factor: float = 1.0,
        download_url: Callable[[str], str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, **kwargs)
        self.runtimes = runtimes
        self.cpu_factor = cpu_factor
        self.download_url = download_url
        self.windows_flushed = 0
        # Sees every telemetry window as queued (device id, seq, payload): the chaos suite
        # recomputes the server's sums from what the devices actually sent.
        self.window_tap: Callable[[str, int, bytes], None] | None = None

    def load_runtime(self, bundle: Bundle) -> ModelRuntime:
        return slowed(self.runtimes.get(bundle), self.cpu_factor)

    def download_via(self, url: str) -> str:
        # Through the fault relay: the signed desired stays as the server sent it, and the
        # device's credentials still go only to the server's origin it names.
        return self.download_url(url) if self.download_url is not None else ""

    def _flush_window(self, now: float) -> None:
        seq = self.outbox.next_seq if self.outbox is not None else -1
        super()._flush_window(now)
        self.windows_flushed += 1
        if self.window_tap is not None and self.outbox is not None:
            # An event queued by the update worker may have taken `seq` first: pass on the
            # telemetry among the newest messages (the tap keeps each seq once).
            for msg in self.outbox.pending(after=seq - 1, limit=8):
                if msg.kind == "telemetry":
                    self.window_tap(self.config.device_id, msg.seq, msg.payload)


@dataclass
class DeviceCounters:
    """What the simulator itself counted for one device (kept across simulated restarts)."""

    requests: int = 0
    predictions: int = 0
    refused: int = 0
    correct: int = 0  # predictions equal to the true label (classification)
    labelled: int = 0
    windows: int = 0
    crashes: int = 0
    labels_sent: int = 0  # ground truth given back to the agent (Agent.feedback)


class SimDevice:
    """A device's life: boot, serve its data stream, tick, lose its network, crash and reboot."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], float],
        started_at: float,
        stream: DeviceStream,
        plan: FaultPlan,
        profile: HardwareProfile,
        runtimes: RuntimeCache,
        executor: Executor,
        rate_per_s: float,
        batch: int = 1,
        downloads: FaultyDownloads | None = None,
        seed: int = 0,
        label_share: float = 0.0,
        label_delay_s: float = 0.0,
        window_tap: Callable[[str, int, bytes], None] | None = None,
    ) -> None:
        self.config = config
        self.window_tap = window_tap
        self.device_id = config.device_id
        self.clock = clock
        self.started_at = started_at
        self.stream = stream
        self.plan = plan
        self.profile = profile
        self.runtimes = runtimes
        self.executor = executor
        self.rate_per_s = rate_per_s
        self.batch = max(1, batch)
        self.downloads = downloads
        self.rng = random.Random(f"{seed}:{self.device_id}")
        self.agent: SimAgent | None = None
        self.counters = DeviceCounters()
        self.crashed_at: float | None = None
        self.crash_pending = False
        self.network_down = False
        self._due_rows = 0.0
        self._last_step: float | None = None
        self._cpu_s = 0.0
        self._min_free_disk = config.update.min_free_disk_bytes
        # Ground truth: a share of the predictions get their true label back after a delay, as
        # an app that learns the outcome later would send it (POST /v1/feedback).
        self.label_share = label_share
        self.label_delay_s = label_delay_s
        self._label_rng = random.Random(f"{seed}:labels:{self.device_id}")
        self._labels_due: deque[tuple[float, str, Any]] = deque()

    # ------------------------------------------------------------------ lifecycle

    def boot(self) -> SimAgent:
        """Start (or restart) the agent on the device's data dir, as after power-on."""
        first_boot = self.counters.crashes == 0
        agent = SimAgent(
            self.config,
            runtimes=self.runtimes,
            cpu_factor=self.plan.cpu_factor,
            download_url=self._download_url if self.downloads is not None else None,
            clock=self.clock,
            hardware=self.profile.hardware(),
            resources=self._resources,
            executor=self.executor,
            link_mode="external",
            # A crash fault fires once: after the reboot the device must recover, not crash again.
            faults=f"crash_in={self.plan.crash_in}" if self.plan.crash_in and first_boot else "",
            rng=self.rng,
        )
        agent.machine.crash = self._on_crash  # type: ignore[method-assign]
        agent.window_tap = self.window_tap
        self._apply_disk(self.elapsed(self.clock()))
        self.agent = agent
        self.crashed_at = None
        self.crash_pending = False
        agent.start()
        return agent

    def _on_crash(self) -> None:
        # Runs on the update worker right after the state was saved: stop that thread here; the
        # driver thread pulls the plug on the rest at its next step (`kill`).
        self.crash_pending = True
        raise SimulatedCrash(self.device_id)

    def kill(self, now: float) -> None:
        """Power cut: no window flush, no `offline` message (the broker's last will says it)."""
        agent = self.agent
        if agent is None:
            return
        agent.closed = True  # the update worker schedules nothing more
        if agent.link is not None:
            sock = agent.link.client.socket()
            cut_connection(agent.link)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        if agent.outbox is not None:
            agent.outbox.close()
        self.counters.windows += agent.windows_flushed
        self.counters.crashes += 1
        self.agent = None
        self.crashed_at = now
        self.crash_pending = False

    def stop(self) -> None:
        """A clean shutdown: flush the window, say offline, close files."""
        if self.agent is not None:
            self.agent.close()
            self.counters.windows += self.agent.windows_flushed
            self.agent = None

    # ------------------------------------------------------------------ simulation step

    def elapsed(self, now: float) -> float:
        return now - self.started_at

    def step(self, now: float) -> None:
        """Serve the traffic due since the last step, then let the agent do its periodic work."""
        if self.agent is None:
            if self.crashed_at is not None and now - self.crashed_at >= RESTART_AFTER_S:
                self.boot()
            self._last_step = now
            return
        t = self.elapsed(now)
        self._apply_disk(t)
        last = self._last_step if self._last_step is not None else now
        self._last_step = now
        self._due_rows += max(0.0, now - last) * self.rate_per_s
        n = min(int(self._due_rows), MAX_ROWS_PER_STEP)
        if n:
            self._due_rows -= n
            self._serve(n, t / 60.0)
        if self._labels_due:
            self._deliver_labels(now)
        self.agent.tick(now)

    def _apply_disk(self, t: float) -> None:
        # A full disk is the agent's own free-space check failing: no file system is filled.
        self.config.update.min_free_disk_bytes = 1 << 62 if self.plan.disk_full_at(t) else self._min_free_disk

    def _serve(self, n: int, t_min: float) -> None:
        """The rows due since the last step, in requests of `batch` rows as a local app sends
        them (request size is what the agent's latency telemetry and probation judge)."""
        assert self.agent is not None
        X, y = self.stream.rows(n, t_min)  # drawn at once: one vectorised call per step
        rows, truth = X.tolist(), y.tolist()
        predict, batch, c = self.agent.predict, self.batch, self.counters
        for i in range(0, n, batch):
            chunk = rows[i : i + batch]
            c.requests += 1
            try:
                answer = predict(chunk)
            except RequestError:
                c.refused += len(chunk)
                continue
            labels = answer.output.labels
            c.predictions += len(chunk)
            if self.label_share > 0:
                self._queue_labels(answer.ids, truth[i : i + batch])
            if labels is not None:
                c.labelled += len(chunk)
                c.correct += sum(1 for a, b in zip(labels, truth[i : i + batch], strict=False) if str(a) == str(b))
        self._cpu_s += 0.00005 * n * self.plan.cpu_factor

    def _queue_labels(self, ids: list[str], truth: list[Any]) -> None:
        due = self.clock() + self.label_delay_s
        draw = self._label_rng.random
        for pid, value in zip(ids, truth, strict=False):
            if draw() < self.label_share:
                self._labels_due.append((due, pid, value))

    def _deliver_labels(self, now: float) -> None:
        """Send the labels that are due (in one feedback call, as an app batching them would)."""
        assert self.agent is not None
        key = "value" if self.stream.dataset.task == "regression" else "label"
        items = []
        while self._labels_due and self._labels_due[0][0] <= now:
            _, pid, value = self._labels_due.popleft()
            items.append({"id": pid, key: value})
        if items:
            self.agent.feedback(items)
            self.counters.labels_sent += len(items)

    def _resources(self) -> Resources:
        disk_free = 0 if self.plan.disk_full_at(self.elapsed(self.clock())) else self.profile.disk_mb * MiB // 2
        return Resources(cpu_s=round(self._cpu_s, 3), rss_bytes=40 * MiB, disk_free_bytes=disk_free)

    def _download_url(self, url: str) -> str:
        assert self.downloads is not None
        mode = self.plan.download_fault_at(self.elapsed(self.clock()))
        return self.downloads.url(url, mode) if mode else url

    # ------------------------------------------------------------------ what the fleet shows

    @property
    def running(self) -> bool:
        return self.agent is not None

    @property
    def online(self) -> bool:
        a = self.agent
        return bool(a is not None and a.link is not None and a.link.connected)

    @property
    def windows(self) -> int:
        return self.counters.windows + (self.agent.windows_flushed if self.agent else 0)

    @property
    def accuracy(self) -> float | None:
        c = self.counters
        return c.correct / c.labelled if c.labelled else None

    def state(self) -> DeviceState:
        a = self.agent
        ctx = a.machine.ctx if a is not None else None
        return DeviceState(
            device_id=self.device_id,
            running=a is not None,
            online=self.online,
            network_down=self.network_down,
            active_version=a.active_version() if a is not None else None,
            update_state=ctx.state.value if ctx is not None else "down",
            update_outcome=ctx.outcome.value if ctx is not None and ctx.outcome else None,
            last_error=ctx.last_error if ctx is not None else None,
            outbox=a.outbox.count() if a is not None and a.outbox is not None else 0,
            predictions=self.counters.predictions,
            refused=self.counters.refused,
            windows=self.windows,
            crashes=self.counters.crashes,
            accuracy=self.accuracy,
            drifted=self.stream.drifted,
            faults=self.plan.kinds,
            profile=self.profile.name,
        )


@dataclass(frozen=True)
class DeviceState:
    """A snapshot of one simulated device, as the simulator sees it (not as the server does)."""

    device_id: str
    running: bool
    online: bool
    network_down: bool
    active_version: str | None
    update_state: str
    update_outcome: str | None
    last_error: str | None
    outbox: int
    predictions: int
    refused: int
    windows: int
    crashes: int
    accuracy: float | None
    drifted: bool
    faults: list[str]
    profile: str
