"""Prometheus metrics, read from storage at scrape time so they cover every ingest process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fleet_server.storage import Storage


class FleetCollector:
    """Device states, ingest counters and lag per worker, rejects by reason, open alerts."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def collect(self) -> Iterator[Metric]:
        devices = GaugeMetricFamily("edgefleet_devices", "Registered devices by status", labels=["status"])
        counts: dict[str, int] = {}
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
        sev: dict[str, int] = {}
        for a in self.storage.list_alerts(state="open", limit=100_000):
            sev[a["severity"]] = sev.get(a["severity"], 0) + 1
        for s, n in sorted(sev.items()):
            alerts.add_metric([s], n)
        yield alerts


def make_registry(storage: Storage) -> CollectorRegistry:
    """A registry per app, so several apps in one process (tests) never share metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(storage))
    return registry
