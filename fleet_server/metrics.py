"""Prometheus metrics, read from storage at scrape time so they cover every ingest process."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fleet_server.config import ServerConfig
from fleet_server.rollout_model import RolloutState
from fleet_server.storage import Storage

# Known label values are exported at 0 too, so a share or an alert has a series before the first
# device goes offline or the first alert opens.
DEVICE_STATUSES = ("unknown", "online", "offline")
ALERT_SEVERITIES = ("warn", "alert")


def tls_certificates(config: ServerConfig) -> dict[str, Path]:
    """The certificates this server serves and hands to devices, when it uses TLS."""
    if not (config.tls or config.serves_https):
        return {}
    cert, _key, ca = config.tls_files
    return {"server": cert, "ca": ca}


def _not_after(path: Path) -> float | None:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return None


class FleetCollector:
    """Device states, ingest counters and lag per worker, rejects by reason, open alerts,
    rollouts by state, TLS certificate expiry."""

    def __init__(self, storage: Storage, certificates: Mapping[str, Path] | None = None) -> None:
        self.storage = storage
        self.certificates = dict(certificates or {})

    def collect(self) -> Iterator[Metric]:
        devices = GaugeMetricFamily("edgefleet_devices", "Registered devices by status", labels=["status"])
        counts: dict[str, int] = dict.fromkeys(DEVICE_STATUSES, 0)
        for d in self.storage.list_devices(limit=10_000_000):
            counts[d["status"]] = counts.get(d["status"], 0) + 1
        for status, n in sorted(counts.items()):
            devices.add_metric([status], n)
        yield devices

        received = CounterMetricFamily("edgefleet_ingest_messages", "Messages handled", labels=["worker", "outcome"])
        lag = GaugeMetricFamily("edgefleet_ingest_lag_seconds", "Received-from-broker to stored (ingest's own delay)",
                                labels=["worker", "quantile"])
        delivery = GaugeMetricFamily("edgefleet_delivery_delay_seconds",
                                     "Window sent_at (device clock) to stored, first deliveries; includes offline "
                                     "buffering", labels=["worker", "quantile"])
        queue = GaugeMetricFamily("edgefleet_ingest_queue_depth", "Messages waiting to be stored", labels=["worker"])
        for w in self.storage.worker_stats():
            s = w["stats"]
            for outcome in ("received", "stored_windows", "stored_events", "duplicates", "rejected", "snapshots",
                            "late_windows"):
                received.add_metric([w["worker_id"], outcome], s.get(outcome, 0))
            for q in ("p50", "p99", "max"):
                if s.get("lag_s", {}).get(q) is not None:
                    lag.add_metric([w["worker_id"], q], s["lag_s"][q])
                if s.get("delivery_s", {}).get(q) is not None:
                    delivery.add_metric([w["worker_id"], q], s["delivery_s"][q])
            queue.add_metric([w["worker_id"]], s.get("queue_depth", 0))
        yield received
        yield lag
        yield delivery
        yield queue

        rejects = CounterMetricFamily("edgefleet_ingest_rejects", "Rejected messages by reason", labels=["reason"])
        by_reason: dict[str, int] = {}
        for r in self.storage.reject_counts():
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + r["count"]
        for reason, n in sorted(by_reason.items()):
            rejects.add_metric([reason], n)
        yield rejects

        alerts = GaugeMetricFamily("edgefleet_open_alerts", "Open drift alerts", labels=["severity"])
        sev: dict[str, int] = dict.fromkeys(ALERT_SEVERITIES, 0)
        for a in self.storage.list_alerts(state="open", limit=100_000):
            sev[a["severity"]] = sev.get(a["severity"], 0) + 1
        for s, n in sorted(sev.items()):
            alerts.add_metric([s], n)
        yield alerts

        rollouts = GaugeMetricFamily("edgefleet_rollouts", "Rollouts by state", labels=["state"])
        states: dict[str, int] = {state.value: 0 for state in RolloutState}
        for r in self.storage.list_rollouts(limit=10_000_000):
            states[r["state"]] = states.get(r["state"], 0) + 1
        for state, n in sorted(states.items()):
            rollouts.add_metric([state], n)
        yield rollouts

        if self.certificates:
            expiry = GaugeMetricFamily(
                "edgefleet_tls_certificate_expiry_timestamp_seconds",
                "When a TLS certificate the server uses stops being valid (Unix time)",
                labels=["certificate"],
            )
            for name, path in sorted(self.certificates.items()):
                not_after = _not_after(path)
                if not_after is not None:
                    expiry.add_metric([name], not_after)
            yield expiry


def make_registry(storage: Storage, certificates: Mapping[str, Path] | None = None) -> CollectorRegistry:
    """A registry per app, so several apps in one process (tests) never share metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(storage, certificates))
    return registry
