"""MQTT ingest: validate device messages and store them in batches, idempotent by (device, seq).

paho runs `on_message` in its network thread: it only queues. A writer thread decodes a batch
(every ~100 ms or 2,000 messages), stores it in one transaction, and only then acknowledges the
messages (manual PUBACK), so a kill -9 at any point loses nothing the broker accepted: the
persistent session redelivers whatever was not acknowledged, and the (device, seq) key drops
what was stored twice. Telemetry and events come through an MQTT 5 shared subscription, so any
number of ingest processes can split them; retained snapshots (`reported`, `status`) are read by
every process (they are idempotent, and shared subscriptions get no retained messages).
After a batch commits, the seqs it stored (or already had) are acknowledged to their devices on
`ack` (`fleet_server.acks`): only then does a device delete them from its outbox.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.protocol import (
    SERVER_TOPICS,
    DeliveryAck,
    ProtocolError,
    ReportedState,
    Status,
    TelemetryWindow,
    UpdateEvent,
    decode,
    encode,
    parse_topic,
    subscription,
    topic,
)
from fleet_server.acks import AckBuffer
from fleet_server.config import ServerConfig
from fleet_server.mqtt_link import ack_all, make_client, publish_all
from fleet_server.retention import Retention
from fleet_server.storage import IngestBatch, Reject, Storage

log = logging.getLogger(__name__)

SHARED_GROUP = "ingest"
# Telemetry retention per maintenance pass (every stats_interval_s): windows per transaction, and
# transactions per pass.
PURGE_BATCH = 1000
# A window stored this long (fleet clock) after its device sent it was buffered on the device
# (offline, broker or server down) or resent after a lost acknowledgement: a late delivery, not
# ingest lag. The agent's default resend_after_s.
LATE_DELIVERY_S = 120.0
PURGE_BATCHES = 5


class Incoming(NamedTuple):
    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool
    received_at: float


class DeviceDirectory:
    """Which device ids may send, refreshed when the registry's generation changes."""

    def __init__(self, storage: Storage, refresh_s: float = 1.0) -> None:
        self.storage = storage
        self.refresh_s = refresh_s
        self._ids: set[str] = set()
        self._generation = -1
        self._checked = 0.0

    def __contains__(self, device_id: str) -> bool:
        now = time.monotonic()
        # A miss re-reads the generation (one cheap query) so a just-provisioned device is
        # accepted at once; hits re-check only every refresh_s, to notice revocations.
        if device_id not in self._ids or now - self._checked > self.refresh_s:
            self._refresh(now)
        return device_id in self._ids

    def _refresh(self, now: float) -> None:
        generation = self.storage.devices_generation()
        if generation != self._generation:
            self._ids = self.storage.active_device_ids()
            self._generation = generation
        self._checked = now


class ProfileShapes:
    """Expected bin counts per (model, version) from the registry, to reject mismatched windows."""

    def __init__(self, storage: Storage, ttl_s: float = 5.0) -> None:
        self.storage = storage
        self.ttl_s = ttl_s
        self._cache: dict[tuple[str, str], tuple[float, tuple[list[int], int] | None]] = {}

    def get(self, model: str, version: str) -> tuple[list[int], int] | None:
        now = time.monotonic()
        hit = self._cache.get((model, version))
        if hit is not None and (hit[1] is not None or now - hit[0] < self.ttl_s):
            return hit[1]
        row = self.storage.get_model(model, version)
        shape = None
        if row is not None:
            profile = row["manifest"]["profile"]
            shape = (
                [len(f["distribution"]["counts"]) for f in profile["features"]],
                len(profile["prediction"]["counts"]),
            )
        self._cache[(model, version)] = (now, shape)
        return shape


def check_shape(window: TelemetryWindow, shapes: ProfileShapes) -> str | None:
    """A reason to reject a window whose counts do not fit its model's reference bins, else None."""
    if not window.model or not window.model_version or not window.features:
        return None
    shape = shapes.get(window.model, window.model_version)
    if shape is None:
        return None  # model not (yet) registered: sums are kept, drift waits for the profile
    features, prediction = shape
    if [len(f.bins) for f in window.features] != features:
        return f"feature bins {[len(f.bins) for f in window.features]} != profile {features}"
    if window.prediction is not None and len(window.prediction.bins) != prediction:
        return f"prediction bins {len(window.prediction.bins)} != profile {prediction}"
    return None


class TopicParser:
    """(device, kind) of this fleet's device topics; remembers the valid ones (a few per device)."""

    def __init__(self, fleet: str, size: int = 500_000) -> None:
        self.fleet = fleet
        self.size = size
        self._valid: dict[str, tuple[str, str]] = {}

    def __call__(self, name: str) -> tuple[str, str]:
        hit = self._valid.get(name)
        if hit is None:
            msg_fleet, device, kind = parse_topic(name)
            if msg_fleet != self.fleet or kind in SERVER_TOPICS:
                raise ProtocolError("foreign_topic", name[:200])
            if len(self._valid) >= self.size:
                self._valid.clear()
            hit = self._valid[name] = (device, kind)
        return hit


def classify(
    msg: Incoming,
    topics: TopicParser,
    devices: DeviceDirectory,
    shapes: ProfileShapes,
    batch: IngestBatch,
    refused: list[tuple[str, int]] | None = None,
) -> None:
    """Decode one message into the batch, or add the reason it was rejected.

    `refused` collects the (device, seq) of valid messages refused for good (a resend cannot
    change the verdict): they are acknowledged like stored ones, so the device stops resending.
    """
    try:
        device, kind = topics(msg.topic)
    except ProtocolError as exc:
        batch.rejects.append(Reject(exc.reason, "", exc.detail))
        return
    if not msg.payload and kind in ("reported", "status"):
        return  # a cleared retained message, not a report
    try:
        message = decode(kind, msg.payload)
    except ProtocolError as exc:
        batch.rejects.append(Reject(exc.reason, device, exc.detail))
        return
    if message.device != device:
        batch.rejects.append(Reject("device_mismatch", device, f"payload says {message.device[:64]!r}"))
        return
    if device not in devices:
        batch.rejects.append(Reject("unknown_device", device, "not registered or revoked"))
        return
    if isinstance(message, TelemetryWindow):
        reason = check_shape(message, shapes)
        if reason:
            batch.rejects.append(Reject("profile_mismatch", device, reason))
            if refused is not None:
                refused.append((device, message.seq))
        else:
            batch.windows.append((message, msg.received_at, len(msg.payload)))
    elif isinstance(message, UpdateEvent):
        batch.events.append((message, msg.received_at))
    elif isinstance(message, Status):
        batch.statuses.append((message, msg.received_at, msg.retain))
    elif isinstance(message, ReportedState):
        batch.reported.append((message, msg.received_at))


class IngestStats:
    """Counters and recent lags of one ingest process.

    Two different delays, kept apart so that each means what its name says:
    - `lags` (ingest lag): from this process receiving a telemetry message off the broker to its
      batch being committed, on this host's clock (real seconds). How far ingest is behind.
    - `deliveries` (delivery delay): from the window's `sent_at` (the device's clock) to its storage
      (the fleet clock), first deliveries only. It includes time a window waited in the device's
      outbox while offline, clock skew, and under a simulated clock it is in simulated seconds
      (the demo's 30x clock turned 0.5 s of real ingest time into 15 s), so it is not ingest lag.
      Deliveries later than LATE_DELIVERY_S are counted in `late_windows`.
    """

    def __init__(self, lag_samples: int = 20000) -> None:
        self.counters: Counter[str] = Counter()
        self.rejects: Counter[str] = Counter()
        self.lags: deque[float] = deque(maxlen=lag_samples)
        self.deliveries: deque[float] = deque(maxlen=lag_samples)
        self.lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            lags = sorted(self.lags)
            deliveries = sorted(self.deliveries)
            counters = dict(self.counters)
            rejects = dict(self.rejects)
        return {
            **counters,
            "rejected_by_reason": rejects,
            "lag_s": _percentiles(lags),
            "delivery_s": _percentiles(deliveries),
        }


def _percentiles(values: list[float]) -> dict[str, Any]:
    """p50, p99 and max of sorted `values` (None when empty) and how many there are."""

    def pct(q: float) -> float | None:
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {"p50": pct(0.5), "p99": pct(0.99), "max": values[-1] if values else None, "samples": len(values)}


class IngestWorker:
    """One ingest process's MQTT client and writer thread."""

    def __init__(
        self,
        config: ServerConfig,
        storage: Storage,
        *,
        clock: Callable[[], float] = time.time,
        client_id: str | None = None,
        maintains: Callable[[], bool] = lambda: True,
    ) -> None:
        """`maintains` says whether this process runs the maintenance pass now (compaction,
        telemetry purge, retention): singleton work, so a node passes whether it leads and a
        `server ingest` process, which never leads, passes `lambda: False`."""
        self.config = config
        self.maintains = maintains
        self.storage = storage
        self.clock = clock
        self.stats = IngestStats()
        self.devices = DeviceDirectory(storage)
        self.shapes = ProfileShapes(storage)
        self.topics = TopicParser(config.fleet)
        self.acks = AckBuffer(config.ack_interval_s)
        self.retention = Retention(storage, config)
        # SimpleQueue: put() is one C call, so paho's network thread spends little on each message.
        self.queue: queue.SimpleQueue[Incoming | None] = queue.SimpleQueue()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.client, self._connect = make_client(
            config, client_id or f"ef-ingest-{config.worker_id}", persistent=True, manual_ack=True
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # ---- paho callbacks (network thread): translate only
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("ingest MQTT connect refused: %s (check the server account and ACL)", reason_code)
            return
        fleet = self.config.fleet
        opts = SubscribeOptions(qos=1)
        client.subscribe(
            [
                (subscription(fleet, "telemetry", SHARED_GROUP), opts),
                (subscription(fleet, "events", SHARED_GROUP), opts),
                (subscription(fleet, "reported"), opts),
                (subscription(fleet, "status"), opts),
            ]
        )
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self.queue.put(Incoming(msg.topic, msg.payload, msg.mid, msg.qos, bool(msg.retain), time.time()))

    # ---- lifecycle
    def start(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        self.client.connect_async(**self._connect)
        self.client.loop_start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop receiving, store what was received, then disconnect (unacked ones are redelivered)."""
        self._stop.set()
        self.queue.put(None)
        if self._writer is not None:
            self._writer.join(timeout)
        self._send_acks(float("inf"))  # what this process stored: acknowledged before it goes
        self.client.disconnect()
        self.client.loop_stop()
        self._flush_stats()

    # ---- writer thread
    def _collect(self) -> list[Incoming]:
        items: list[Incoming] = []
        try:
            first = self.queue.get(timeout=0.25)
        except queue.Empty:
            return items
        if first is None:
            return items
        items.append(first)
        deadline = time.monotonic() + self.config.ingest_batch_s
        while len(items) < self.config.ingest_batch_max:
            remaining = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                break
            items.append(item)
        return items

    def _write_loop(self) -> None:
        last_stats = 0.0
        while True:
            items = self._collect()
            if items:
                self._process(items)
            self._send_acks(time.monotonic())
            if time.monotonic() - last_stats > self.config.stats_interval_s:
                self._flush_stats()
                self.maintain()
                last_stats = time.monotonic()
            if self._stop.is_set() and self.queue.empty():
                return

    def _process(self, items: list[Incoming]) -> None:
        batch = IngestBatch()
        refused: list[tuple[str, int]] = []
        for msg in items:
            classify(msg, self.topics, self.devices, self.shapes, batch, refused)
        delay = 0.05
        while True:
            try:
                result = self.storage.store_batch(
                    batch, self.config.bucket_s, self.clock(), samples_per_device=self.config.samples_per_device
                )
                break
            except Exception:  # a locked or full database must not kill ingest: retry, keep unacked
                log.exception("storing an ingest batch failed; retrying in %.1fs", delay)
                if self._stop.is_set():
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        committed = time.time()  # this host's clock, like Incoming.received_at (never the fleet clock)
        # Only now, with the batch committed, may the broker forget these messages.
        ack_all(self.client, [msg.mid for msg in items if msg.qos == 1])
        # Stored now or before (duplicates are acknowledged again: the first ack may have been lost).
        acks = self.acks
        acks.add([(w.device, w.seq) for w, _, _ in batch.windows])
        acks.add([(e.device, e.seq) for e, _ in batch.events])
        if refused:
            acks.add(refused)
        with self.stats.lock:
            c = self.stats.counters
            c["received"] += len(items)
            c["stored_windows"] += result.stored_windows
            c["stored_events"] += result.stored_events
            c["duplicates"] += result.duplicates
            c["snapshots"] += result.snapshots
            c["batches"] += 1
            for r in batch.rejects + result.rejects:
                c["rejected"] += 1
                self.stats.rejects[r.reason] += 1
            # Every window went through the pipeline, duplicates too; deliveries are first ones.
            self.stats.lags.extend(committed - received for _, received, _ in batch.windows)
            self.stats.deliveries.extend(result.lags)
            c["late_windows"] += sum(1 for delay in result.lags if delay > LATE_DELIVERY_S)

    def _send_acks(self, now: float) -> None:
        """Publish the delivery acknowledgements that are due, in one write (kept while disconnected).

        QoS 0: an acknowledgement that is lost costs one resend of the messages it named (the
        device resends what is not acknowledged in time, and everything unacknowledged after a
        reconnect), while QoS 1 would double its CPU on this process (a PUBACK back for each).
        """
        due = self.acks.due(now)
        if not due:
            return
        if not self.connected.is_set():
            self.acks.put_back(due)
            return
        fleet = self.config.fleet
        publish_all(self.client, [(topic(fleet, d, "ack"), encode(DeliveryAck(device=d, seqs=s))) for d, s in due])
        with self.stats.lock:
            self.stats.counters["acks_sent"] += len(due)
            self.stats.counters["acked_seqs"] += sum(len(s) for _, s in due)

    def maintain(self) -> bool:
        """One maintenance pass if this process runs them now (the leader's); whether it ran."""
        if not self.maintains():
            return False
        self._compact()
        self._purge()
        self._retention()
        with self.stats.lock:
            self.stats.counters["maintenance_passes"] += 1
        return True

    def _compact(self) -> None:
        """Merge partial bucket rows of closed buckets."""
        try:
            closed = self.clock() - self.config.bucket_s - self.config.bucket_grace_s
            self.storage.compact_buckets(closed, self.clock(), limit=2000)
        except Exception:
            log.exception("compacting drift buckets failed; it is retried")

    def _purge(self) -> None:
        """Telemetry retention: delete windows (and their seqs) stored more than
        `telemetry_retention_days` ago, PURGE_BATCH rows a transaction so that the write lock is
        never held long, at most PURGE_BATCHES of them a pass (a backlog goes over several passes,
        between batches of ingest)."""
        days = self.config.telemetry_retention_days
        if days <= 0:
            return
        try:
            before = self.clock() - days * 86400.0
            for _ in range(PURGE_BATCHES):
                n = self.storage.purge_telemetry(before, limit=PURGE_BATCH)
                with self.stats.lock:
                    self.stats.counters["purged_windows"] += n
                if n < PURGE_BATCH:
                    break
        except Exception:
            log.exception("purging old telemetry failed; it is retried")

    def _retention(self) -> None:
        """Bounded growth of feedback, drift history, audit log and sessions (fleet_server.retention)."""
        try:
            done = self.retention.run(self.clock())
            with self.stats.lock:
                self.stats.counters.update({k: v for k, v in done.items() if v})
        except Exception:
            log.exception("the retention pass failed; it is retried")

    def _flush_stats(self) -> None:
        try:
            snap = self.stats.snapshot()
            snap["connected"] = self.connected.is_set()
            snap["queue_depth"] = self.queue.qsize()
            self.storage.put_worker_stats(self.config.worker_id, os.getpid(), snap, time.time())
        except Exception:
            log.exception("could not record ingest statistics")
