"""The agent core: serving, validation, telemetry, outbox, MQTT link and the update machine.

No process concerns here (signals, HTTP server, systemd): a simulator builds many `Agent`s in
one process, with its own clock, hardware profile, executor and an externally driven link.
Periodic work happens in `tick(now)`; the real agent calls it from a small background thread.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from edge_agent.config import AgentConfig
from edge_agent.credentials import CredentialStore, Rotator
from edge_agent.feedback import FeedbackResult, PredictionRecord, format_ids, parse_items
from edge_agent.link import MqttLink
from edge_agent.outbox import Outbox
from edge_agent.protocol import (
    MAX_PAYLOAD_BYTES,
    DesiredState,
    Hardware,
    ProtocolError,
    ReportedState,
    Resources,
    Status,
    UpdateEvent,
    decode,
    encode,
)
from edge_agent.resources import detect_hardware, process_resources
from edge_agent.runtime import ModelRuntime, Output, median
from edge_agent.signatures import TrustedKey, trusted_keys
from edge_agent.store import DataDir, atomic_write_bytes, read_json
from edge_agent.telemetry import Telemetry
from edge_agent.trust import (
    Accepted,
    DesiredTrustError,
    check_fresh,
    parse_document,
    raw_keys,
    verify_desired,
)
from edge_agent.update.events import Outcome
from edge_agent.update.machine import UpdateMachine, parse_faults
from edge_agent.validation import RequestError
from edge_agent.version import __version__
from model_tools.bundle import Bundle, load_extracted
from model_tools.errors import BundleError
from model_tools.manifest import Manifest

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("edge_agent")

LinkMode = Literal["thread", "external", "none"]
REPORTED_REFRESH_S = 600.0  # uptime in `reported` is refreshed this often


@dataclass(slots=True)
class Prediction:
    """The answer to one `Agent.predict` call."""

    model: str
    version: str
    output: Output
    classes: list[Any] | None = None  # of the model that answered (for probabilities' columns)
    id_prefix: str = ""
    first_id: int = -1  # counter of the first row's id; -1: no ids

    @property
    def ids(self) -> list[str]:
        """One id per row, to send ground truth back with `Agent.feedback` (built on demand)."""
        if self.first_id < 0:
            return []
        return format_ids(self.id_prefix, self.first_id, len(self.output.primary))


def trusted_keys_from_config(config: AgentConfig) -> list[TrustedKey]:
    """The bundle-signing keys of [trust], as raw keys checked out of process (no cryptography here)."""
    return trusted_keys(config.trust.public_keys, config.trust.public_keys_pem)


class Agent:
    """One device's agent.

    Build it, call `start()`, serve with `predict(rows)`, call `tick()` every ~0.1-1 s (or
    run `edge_agent.service`), and `close()` at the end.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], float] = time.time,
        hardware: Hardware | None = None,
        resources: Callable[[], Resources] | None = None,
        executor: Executor | None = None,
        link_mode: LinkMode = "thread",
        trusted_keys: Sequence[Any] | None = None,
        faults: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.data = DataDir(config.data_dir)
        self.hardware = hardware or detect_hardware()
        self._resources = resources or process_resources(config.data_dir)
        self._executor = executor
        self._own_executor = executor is None
        self.link_mode: LinkMode = link_mode if config.mqtt.url else "none"
        self._keys = list(trusted_keys) if trusted_keys is not None else trusted_keys_from_config(config)
        self.faults = parse_faults(faults if faults is not None else os.environ.get("EDGEFLEET_FAULT"))
        self.rng = rng or random.Random()
        self.started_at = clock()
        self.telemetry = Telemetry(
            config.device_id,
            clock,
            window_s=config.telemetry.window_s,
            sample_rows=config.telemetry.sample_rows,
            sample_exclude=config.telemetry.sample_exclude,
            rng=self.rng,
        )
        self.prediction_record = PredictionRecord(config.feedback.max_records, config.feedback.horizon_s)
        self.outbox: Outbox | None = None
        self.link: MqttLink | None = None
        self.credentials: CredentialStore | None = None
        self.rotator: Rotator | None = None
        self.machine = UpdateMachine(self, self.faults)
        self._registry: CollectorRegistry | None = None
        self._active: ModelRuntime | None = None
        self._previous: ModelRuntime | None = None
        self._shadow: ModelRuntime | None = None
        self._desired: DesiredState | None = None
        # The server's desired-state keys (raw bytes: verification can run in another process).
        self._desired_keys = raw_keys(config.trust.desired_keys_pem)
        self._accepted: Accepted | None = None  # the last signed desired accepted (replay check)
        # The last payload taken and what it decoded to: the broker hands the same retained
        # message again at every reconnect, and its signature need not be checked again.
        self._taken: tuple[bytes, DesiredState] | None = None
        self._probation = False
        self._prob_predictions = 0
        self._prob_errors = 0
        # Recent per-request latency (ms) of the active model: probation compares the candidate
        # with the model it replaces under the same load, not with a laptop's benchmark.
        self._recent_latency: deque[float] = deque(maxlen=2000)
        self.baseline_latency_ms: float | None = None
        self._error_versions = {self.faults["predict_errors"]} if "predict_errors" in self.faults else set()
        self._reported_dirty = True
        self._last_reported = 0.0
        self._connects_seen = 0  # link.connects at the last drain: a reconnect makes resends due
        self._lock = threading.RLock()
        self.wakeup_event = threading.Event()
        self.closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Agent:
        """Open the data dir and outbox, load the committed model, recover updates, connect."""
        self.data.create()
        self.outbox = Outbox(self.data.outbox_file, self.config.outbox.max_bytes, self.config.outbox.resend_after_s,
                             clock=self.clock)
        self._load_committed()
        self._accepted = Accepted.from_json(read_json(self.data.desired_file))
        self.machine.recover()
        # A rotated password (saved in the data dir) overrides the one in the config file.
        self.credentials = CredentialStore(self.config.data_dir, self.config.mqtt.password)
        self.config.mqtt.password = self.credentials.password
        rotator = self.rotator = Rotator(self.config.device_id, self.config.server.url, self.credentials,
                                         self._switch_password, ca_file=self.config.mqtt.ca_file)
        if self.link_mode != "none":
            self.link = MqttLink(
                self.config,
                on_connected=self._on_connected,
                on_desired=self.on_desired,
                on_credentials=rotator.notice,
                on_refused=lambda reason: rotator.resume(),  # a pending rotation may have switched it
                clock=self.clock,
                will_payload=lambda: self._status_payload("offline"),
                rng=self.rng,
            )
            self.link.wakeup = self.wakeup_event.set
            if self.link_mode == "thread":
                self.link.start()
            rotator.resume()  # a rotation taken but not confirmed before a restart
        self.machine.kick()
        return self

    def _switch_password(self, password: str) -> None:
        """A confirmed rotation: MQTT logins and downloads use the new password from now on."""
        if self.link is not None:
            self.link.set_password(password)
        else:
            self.config.mqtt.password = password

    def _load_committed(self) -> None:
        active, previous = self.data.committed()
        for version in (active, previous):
            if not version:
                continue
            try:
                self._set_active(self.load_runtime(self._load_bundle(version)))
                if version != active:
                    log.error("active version %s is unusable; serving previous %s", active, version)
                    self.data.commit(version, None)
                return
            except (BundleError, ValueError, OSError, RuntimeError) as exc:
                log.error("cannot load installed version %s: %s", version, exc)
                self.emit(kind="refused", version=version, reason=f"installed version unusable: {exc}")

    def _load_bundle(self, version: str) -> Bundle:
        return load_extracted(self.data.version_dir(version), self._keys)

    def close(self) -> None:
        """Flush the current window into the outbox, say offline, stop threads, close files."""
        if self.closed:
            return
        self.closed = True
        if self.outbox is not None and self.telemetry.window_start < self.clock():
            self._flush_window(self.clock())
        if self.link is not None:
            self._drain()
            self.link.stop(self._status_payload("offline"))
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.outbox is not None:
            self.outbox.close()

    # ------------------------------------------------------------------ serving

    def predict(self, rows: Sequence[Any]) -> Prediction:
        """Validate and score rows (lists in schema order or objects keyed by feature name).

        Raises RequestError (with `.kind` and `.status`) for anything refused; every refusal
        and every prediction is counted in the current telemetry window.
        """
        rt = self._active
        if rt is None:
            self.telemetry.record_error("no_model")
            raise RequestError("no_model", "no model is active yet: waiting for the first desired model")
        n = len(rows)
        if n > self.config.http.max_rows:
            self.telemetry.record_error("too_many_rows")
            raise RequestError("too_many_rows", f"{n} rows in one request; at most {self.config.http.max_rows} are accepted")
        t0 = time.perf_counter()
        try:
            if n == 1:
                values = [rt.validator.check(rows[0], 0)]
            else:
                check = rt.validator.check
                values = [check(r, i) for i, r in enumerate(rows)]
                if not values:
                    raise RequestError("bad_request", "no rows to predict")
            feeds = rt.feeds(values)
            if rt.version in self._error_versions:
                raise RequestError("runtime_error", "injected runtime error (EDGEFLEET_FAULT)")
            out = rt.run(feeds)
        except RequestError as exc:
            self.telemetry.record_error(exc.kind, exc.feature, rows)
            if exc.kind == "runtime_error" and self._probation:
                self._prob_errors += 1
            raise
        dt = time.perf_counter() - t0
        if n == 1:
            labels, probas = out.labels, out.probabilities
            self.telemetry.record_row(values[0], labels[0] if labels is not None else out.values[0], dt,
                                      probas[0] if probas is not None else None)
        else:
            self.telemetry.record(values, out.primary, dt, out.probabilities)
        # Per row: probation compares it with the replaced model's and with the self-test's
        # single-row median, so a caller that sends batches is not judged on the batch's size.
        self._recent_latency.append(dt * 1000.0 / n)
        if self._probation:
            self._prob_predictions += n
        shadow = self._shadow
        if shadow is not None:
            self._run_shadow(shadow, rt, values, feeds, out)
        record = self.prediction_record
        first = record.add(rt.manifest, out, self.clock())
        return Prediction(rt.name, rt.version, out, rt.classes, record.prefix, first)

    def feedback(self, items: Iterable[Any]) -> FeedbackResult:
        """Join ground truth with recent predictions: `[{"id": ..., "label": ...}]` (classification)
        or `[{"id": ..., "value": ...}]` (regression); one mapping alone is accepted too.

        Every item lands in one count of the result (joined, unknown_label, late, unknown,
        duplicate) and in the current telemetry window. A malformed item refuses the whole batch
        with RequestError("bad_feedback") (status 422) naming it, and nothing is counted but the
        refusal, so the caller can fix and resend without creating duplicates.
        """
        try:
            parsed = parse_items(items)
        except RequestError:
            self.telemetry.record_feedback_rejected()
            raise
        result = self.prediction_record.join(parsed, self.clock())
        self.telemetry.record_feedback(result)
        return result

    def _run_shadow(self, shadow: ModelRuntime, active: ModelRuntime, values, feeds, out: Output) -> None:
        t0 = time.perf_counter()
        try:
            same_inputs = shadow.manifest.onnx_inputs == active.manifest.onnx_inputs
            cand = shadow.run(feeds if same_inputs else shadow.feeds(values))
        except RequestError:
            self.telemetry.record_shadow(shadow.version, len(values), 0, len(values), 0.0, [])
            return
        dt = time.perf_counter() - t0
        agree = shadow.agrees
        agreed = sum(1 for a, b in zip(cand.primary, out.primary, strict=False) if agree(a, b))
        self.telemetry.record_shadow(shadow.version, len(values), agreed, 0, dt, cand.primary)

    @property
    def active(self) -> ModelRuntime | None:
        return self._active

    @property
    def registry(self) -> CollectorRegistry:
        """This agent's Prometheus registry, built on first use (prometheus_client pulls in
        http.server, urllib and wsgiref: ~2 MiB a device that is never scraped need not hold)."""
        if self._registry is None:
            from edge_agent.metrics import build_registry

            with self._lock:
                if self._registry is None:
                    self._registry = build_registry(self)
        return self._registry

    def health(self) -> dict[str, Any]:
        rt = self._active
        return {
            "status": "ok" if rt is not None else "no_model",
            "message": "serving" if rt is not None else "no model is active yet: waiting for the first desired model",
            "device": self.config.device_id,
            "model": rt.name if rt else None,
            "version": rt.version if rt else None,
            "update_state": self.machine.state.value,
            "mqtt_connected": bool(self.link and self.link.connected),
            "outbox_messages": self.outbox.count() if self.outbox else 0,
        }

    def model_info(self) -> dict[str, Any]:
        snap = self.machine.snapshot  # first, and once: the update fields describe one moment
        rt = self._active
        candidate = snap.candidate
        info: dict[str, Any] = {
            "model": rt.name if rt else None,
            "version": rt.version if rt else None,
            "previous_version": self._previous.version if self._previous else self.data.committed()[1],
            "update_state": snap.state.value,
            "update_outcome": snap.outcome.value if snap.outcome else None,
            "update_retry": snap.retry,
            "candidate_version": candidate.version if candidate else None,
            "shadow_version": self._shadow.version if self._shadow else None,
            "last_error": snap.last_error,
        }
        if rt is not None:
            m = rt.manifest
            info.update(
                task=m.task,
                variant=m.variant,
                classes=m.outputs.classes,
                inputs=[
                    {"name": f.name, "kind": f.kind, "dtype": f.dtype, "allow_nan": f.allow_nan,
                     "categories": f.categories}
                    for f in m.inputs
                ],
            )
        return info

    # ------------------------------------------------------------------ periodic duties

    def tick(self, now: float | None = None) -> None:
        """Flush a due window, drain the outbox, judge probation, refresh `reported`."""
        now = self.clock() if now is None else now
        self.telemetry.count_pending()  # batch-count served rows here, off the request path
        if self.outbox is None:
            return
        if self.telemetry.due(now):
            self._flush_window(now)
        self.machine.check_probation(now)
        self.machine.check_window(now)
        self.machine.check_disk(now)
        if self.link is not None:
            self._drain()
            if self.link.connected and (self._reported_dirty or now - self._last_reported >= REPORTED_REFRESH_S):
                self._publish_reported(now)

    def _flush_window(self, now: float) -> None:
        assert self.outbox is not None
        rt = self._active
        resources = self._resources()
        dropped = self.outbox.dropped_total
        self.outbox.append(
            "telemetry",
            lambda seq: encode(self.telemetry.flush(now, seq, resources, dropped, rt.name if rt else None)),
        )

    def _drain(self) -> None:
        """Settle acknowledgements, then send what is due (new messages, and resends of messages
        the broker took but the server did not acknowledge in time)."""
        link, outbox = self.link, self.outbox
        if link is None or outbox is None:
            return
        now = self.clock()
        if self.config.outbox.server_acks:
            for seq in link.take_acks():  # PUBACK: frees the in-flight slot, the message stays
                outbox.broker_took(seq, now)
            for seq in link.take_delivered():
                outbox.ack(seq)
            if link.connects != self._connects_seen:
                self._connects_seen = link.connects
                outbox.resend_all()  # a restarted broker may have lost what it took before
        else:
            for seq in link.take_acks():
                outbox.ack(seq)
        outbox.commit_acks()
        room = link.room()
        if room <= 0:
            return
        for msg in outbox.due(now, room, link.inflight_seqs):
            if not link.send(msg.seq, msg.kind, msg.payload):
                break
            outbox.sent(msg.seq)

    # ------------------------------------------------------------------ MQTT messages

    def _status_payload(self, state: Literal["online", "offline"]) -> bytes:
        return encode(Status(device=self.config.device_id, state=state, ts=self.clock()))

    def reported(self, now: float | None = None) -> ReportedState:
        now = self.clock() if now is None else now
        # The machine's fields come from one snapshot: read piecemeal while the update worker
        # moves, a report could say Idle / rolled_back and still name the candidate.
        snap = self.machine.snapshot
        rt = self._active
        d, candidate = snap.desired, snap.candidate
        return ReportedState(
            device=self.config.device_id,
            ts=now,
            model=rt.name if rt else (d.model if d else None),
            active_version=rt.version if rt else None,
            previous_version=self._previous.version if self._previous else self.data.committed()[1],
            candidate_version=candidate.version if candidate else None,
            mode=candidate.mode if candidate else None,
            rollout_id=d.rollout_id if d else None,
            update_state=snap.state.value,
            update_outcome=snap.outcome.value if snap.outcome else None,
            update_retry=snap.retry,
            last_error=snap.last_error,
            agent_version=__version__,
            hardware=self.hardware,
            uptime_s=round(now - self.started_at, 3),
        )

    def _publish_reported(self, now: float) -> None:
        if self.link is None:
            return
        self._reported_dirty = False
        self._last_reported = now
        self.link.publish_retained("reported", encode(self.reported(now)))

    def _on_connected(self) -> None:
        assert self.link is not None
        self.link.publish_retained("status", self._status_payload("online"))
        self._publish_reported(self.clock())

    def on_desired(self, payload: bytes) -> None:
        """A retained `desired` arrived: check it, decode, remember, and let the machine reconcile."""
        if not payload:
            return  # cleared by the server: keep serving what we have
        try:
            desired = self._trusted_desired(payload) if self._desired_keys else decode("desired", payload)
        except ProtocolError as exc:
            self.emit(kind="refused", reason=f"malformed desired: {exc}")
            return
        except DesiredTrustError as exc:
            log.warning("refusing desired: %s", exc)
            self.emit(kind="refused", reason=str(exc))
            return
        assert isinstance(desired, DesiredState)
        with self._lock:
            self._desired = desired
        self.machine.on_desired()

    def _trusted_desired(self, payload: bytes) -> DesiredState:
        """The desired state in `payload` if the server signed it and it is not older than the last
        one accepted; raises DesiredTrustError (or ProtocolError for a malformed one) otherwise."""
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ProtocolError("oversized", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
        taken = self._taken
        if taken is not None and taken[0] == payload:
            return taken[1]
        doc = parse_document(payload)
        verify_desired(doc, self._desired_keys)
        accepted = check_fresh(doc, self._accepted)
        try:  # from the verified object itself: no second parser to disagree with the first
            desired = msgspec.convert(doc, DesiredState)
        except msgspec.ValidationError as exc:
            raise ProtocolError("invalid", str(exc)) from exc
        if accepted != self._accepted:
            self._accepted = accepted
            try:
                atomic_write_bytes(self.data.desired_file, json.dumps(accepted.to_json()).encode())
            except OSError as exc:  # a full disk: the check holds in memory until the next restart
                log.warning("cannot save %s: %s", self.data.desired_file, exc)
        self._taken = (bytes(payload), desired)
        return desired

    def emit(self, **fields: Any) -> None:
        """Queue an UpdateEvent on `events` (through the outbox, so it gets a seq)."""
        log.info("update event: %s", {k: v for k, v in fields.items() if v is not None})
        if self.outbox is None:
            return
        ts = self.clock()
        self.outbox.append(
            "events",
            lambda seq: encode(UpdateEvent(device=self.config.device_id, seq=seq, ts=ts, **fields)),
        )
        self.wakeup_event.set()

    # ------------------------------------------------------------------ UpdateHost

    def desired(self) -> DesiredState | None:
        return self._desired

    def download_via(self, url: str) -> str:
        """Where to fetch `url` through instead ("" for directly); a simulator's fault relay
        overrides it. Which origin may get the device's credentials is decided by `url`."""
        return ""

    def active_version(self) -> str | None:
        return self._active.version if self._active else None

    def active_manifest(self) -> Manifest | None:
        return self._active.manifest if self._active else None

    def trusted_keys(self) -> list[Any]:
        """TrustedKey objects from the config, or the keys the caller passed (cryptography's too)."""
        return self._keys

    def load_runtime(self, bundle: Bundle) -> ModelRuntime:
        return ModelRuntime(bundle, intra_op_threads=self.config.runtime.intra_op_threads)

    def _set_active(self, runtime: ModelRuntime | None) -> None:
        # A window describes one model version: close the current one before switching.
        if self.outbox is not None and self.telemetry.window_start < self.clock() and self._active is not None:
            self._flush_window(self.clock())
        self.telemetry.set_model(runtime.manifest if runtime else None)
        if runtime is not None:
            self.prediction_record.register(runtime.manifest)
        self._active = runtime

    def set_shadow(self, runtime: ModelRuntime | None) -> None:
        self._shadow = runtime

    def activate(self, runtime: ModelRuntime) -> None:
        with self._lock:
            recent = list(self._recent_latency)
            self.baseline_latency_ms = median(recent) if len(recent) >= 20 else None
            self._recent_latency.clear()
            self._previous = self._active  # stays loaded for an instant rollback
            self._set_active(runtime)

    def start_probation(self) -> None:
        self._prob_predictions = self._prob_errors = 0
        self._probation = True

    def probation_stats(self) -> tuple[int, int, float | None]:
        lat = list(self._recent_latency)[-max(1, self._prob_predictions):] if self._prob_predictions else []
        return self._prob_predictions, self._prob_errors, median(lat) if lat else None

    def commit(self, version: str, previous: str | None) -> None:
        self._probation = False
        if self.active_version() != version:
            # Re-entered after a restart: the candidate is on disk but not loaded yet.
            self.activate(self.load_runtime(self._load_bundle(version)))
        self.data.commit(version, previous)

    def rollback(self, previous: str | None) -> None:
        self._probation = False
        with self._lock:
            current = self._active.version if self._active else None
            if current == previous:
                return  # after a restart the committed model is already the active one
            if previous is None:
                self._set_active(None)
            elif self._previous is not None and self._previous.version == previous:
                self._set_active(self._previous)
            else:
                self._set_active(self.load_runtime(self._load_bundle(previous)))
            self._previous = None

    def prune_versions(self) -> None:
        active, previous = self.data.committed()
        keep = {v for v in (active, previous) if v}
        ctx = self.machine.ctx
        failed = ctx.desired.version if ctx.desired and ctx.outcome is not Outcome.SUCCESS else None
        extra = [v for v in reversed(self.data.installed()) if v not in keep and v != failed]
        keep.update(extra[: max(0, self.config.update.keep_versions - len(keep))])
        self.data.prune(keep)

    def state_changed(self) -> None:
        self._reported_dirty = True
        self.wakeup_event.set()

    def submit(self, fn: Callable[[], None]) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"update-{self.config.device_id}")
        if not self.closed:
            self._executor.submit(fn)
