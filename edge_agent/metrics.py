"""Prometheus metrics for one agent, read from its counters at scrape time.

A custom collector on a per-agent CollectorRegistry (never the global one): the hot path pays
nothing for metrics, and a simulator can hold a thousand agents in one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edge_agent.protocol import LATENCY_EDGES_MS
from edge_agent.resources import memory_limit_bytes, rss_bytes

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig
    from edge_agent.link import MqttLink
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import ModelRuntime
    from edge_agent.telemetry import Telemetry
    from edge_agent.update.machine import UpdateMachine


class ScrapedAgent(Protocol):
    """What a scrape reads from the agent (the `Agent` has all of it)."""

    config: AgentConfig
    telemetry: Telemetry
    machine: UpdateMachine
    outbox: Outbox | None
    link: MqttLink | None

    @property
    def active(self) -> ModelRuntime | None: ...


class AgentCollector(Collector):
    def __init__(self, agent: ScrapedAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        t = a.telemetry
        device = a.config.device_id
        yield CounterMetricFamily(
            "edgefleet_predictions", "Rows predicted.", value=t.total_predictions
        )
        yield CounterMetricFamily("edgefleet_requests", "Predict requests (served or refused).", value=t.total_requests)
        errors = CounterMetricFamily("edgefleet_request_errors", "Refused or failed requests by kind.", labels=["kind"])
        for kind, n in sorted(t.total_errors.items()):
            errors.add_metric([kind], n)
        yield errors
        buckets = []
        cumulative = 0
        for edge, n in zip(list(LATENCY_EDGES_MS) + [float("inf")], t.total_lat, strict=True):
            cumulative += n
            buckets.append((str(edge / 1000.0) if edge != float("inf") else "+Inf", cumulative))
        yield HistogramMetricFamily(
            "edgefleet_predict_latency_seconds", "Validation + inference time per request.",
            buckets=buckets, sum_value=t.total_lat_sum / 1000.0,
        )
        rt = a.active
        info = GaugeMetricFamily("edgefleet_model_info", "The active model (value 1).", labels=["device", "model", "version"])
        if rt is not None:
            info.add_metric([device, rt.name, rt.version], 1)
        yield info
        state = GaugeMetricFamily("edgefleet_update_state", "Current update state (value 1).", labels=["state"])
        state.add_metric([a.machine.state.value], 1)
        yield state
        if a.outbox is not None:
            yield GaugeMetricFamily("edgefleet_outbox_messages", "Messages waiting for PUBACK.", value=a.outbox.count())
            yield GaugeMetricFamily("edgefleet_outbox_bytes", "Bytes waiting in the outbox.", value=a.outbox.bytes)
            yield CounterMetricFamily("edgefleet_outbox_dropped", "Messages dropped by the outbox bound.", value=a.outbox.dropped_total)
        yield GaugeMetricFamily("edgefleet_mqtt_connected", "1 when connected to the broker.",
                                value=1 if a.link is not None and a.link.connected else 0)
        yield GaugeMetricFamily("edgefleet_agent_resident_memory_bytes",
                                "Resident memory of the agent's process.", value=rss_bytes())
        limit = memory_limit_bytes()
        if limit is not None:  # only under a cap (systemd's MemoryMax, a container's limit)
            yield GaugeMetricFamily("edgefleet_agent_memory_limit_bytes",
                                    "Memory cap of the agent's cgroup.", value=limit)


def build_registry(agent: ScrapedAgent) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry
