"""Prometheus metrics for one agent, read from its counters at scrape time.

`render` writes the text exposition format itself: `prometheus_client` imports its HTTP
exposition helpers (http.server, urllib.request, email) with it, about 4 MiB of RSS that a
scraped device would keep for one page of text. `build_registry` gives the same metrics as a
per-agent prometheus_client CollectorRegistry (never the global one) for library users; the hot
path pays nothing for either.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from edge_agent.protocol import LATENCY_EDGES_MS
from edge_agent.resources import memory_limit_bytes, rss_bytes

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from edge_agent.config import AgentConfig
    from edge_agent.link import MqttLink
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import ModelRuntime
    from edge_agent.telemetry import Telemetry
    from edge_agent.update.machine import UpdateMachine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ScrapedAgent(Protocol):
    """What a scrape reads from the agent (the `Agent` has all of it)."""

    config: AgentConfig
    telemetry: Telemetry
    machine: UpdateMachine
    outbox: Outbox | None
    link: MqttLink | None

    @property
    def active(self) -> ModelRuntime | None: ...


@dataclass
class Family:
    """One metric: name (a counter's without `_total`), type, help, and labelled values."""

    name: str
    kind: str  # counter, gauge, histogram
    help: str
    labels: list[str] = field(default_factory=list)
    values: list[tuple[list[str], float]] = field(default_factory=list)
    buckets: list[tuple[float, float]] = field(default_factory=list)  # histogram: (upper edge, cumulative)
    sum: float = 0.0


def families(agent: ScrapedAgent) -> list[Family]:
    a = agent
    t = a.telemetry
    t.count_pending()  # single-row requests are counted in batches: the totals include them after this
    out = [
        Family("edgefleet_predictions", "counter", "Rows predicted.", values=[([], t.total_predictions)]),
        Family("edgefleet_requests", "counter", "Predict requests (served or refused).",
               values=[([], t.total_requests)]),
        Family("edgefleet_request_errors", "counter", "Refused or failed requests by kind.", ["kind"],
               [([kind], n) for kind, n in sorted(t.total_errors.items())]),
    ]
    cumulative = 0
    buckets = []
    for edge, n in zip([*LATENCY_EDGES_MS, math.inf], t.total_lat, strict=True):
        cumulative += n
        buckets.append((edge / 1000.0, cumulative))
    out.append(Family("edgefleet_predict_latency_seconds", "histogram", "Validation + inference time per request.",
                      buckets=buckets, sum=t.total_lat_sum / 1000.0))
    rt = a.active
    out.append(Family("edgefleet_model_info", "gauge", "The active model (value 1).", ["device", "model", "version"],
                      [([a.config.device_id, rt.name, rt.version], 1)] if rt is not None else []))
    out.append(Family("edgefleet_update_state", "gauge", "Current update state (value 1).", ["state"],
                      [([a.machine.state.value], 1)]))
    if a.outbox is not None:
        out += [
            Family("edgefleet_outbox_messages", "gauge", "Messages waiting for PUBACK.", values=[([], a.outbox.count())]),
            Family("edgefleet_outbox_bytes", "gauge", "Bytes waiting in the outbox.", values=[([], a.outbox.bytes)]),
            Family("edgefleet_outbox_dropped", "counter", "Messages dropped by the outbox bound.",
                   values=[([], a.outbox.dropped_total)]),
        ]
    out.append(Family("edgefleet_mqtt_connected", "gauge", "1 when connected to the broker.",
                      values=[([], 1 if a.link is not None and a.link.connected else 0)]))
    out.append(Family("edgefleet_agent_resident_memory_bytes", "gauge", "Resident memory of the agent's process.",
                      values=[([], rss_bytes())]))
    limit = memory_limit_bytes()
    if limit is not None:  # only under a cap (systemd's MemoryMax, a container's limit)
        out.append(Family("edgefleet_agent_memory_limit_bytes", "gauge", "Memory cap of the agent's cgroup.",
                          values=[([], limit)]))
    return out


def _number(value: float) -> str:
    """Prometheus' float text, as prometheus_client writes it (1.0, 0.0005, +Inf)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value != value:
        return "NaN"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go (and prometheus_client) switch to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return text


def _labels(names: list[str], values: list[str]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"


def render(agent: ScrapedAgent) -> bytes:
    """The agent's metrics in the Prometheus text format (version 0.0.4)."""
    lines: list[str] = []
    for f in families(agent):
        name = f.name + "_total" if f.kind == "counter" else f.name
        help_text = f.help.replace("\\", r"\\").replace("\n", r"\n")
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {f.kind}"]
        if f.kind == "histogram":
            for edge, count in f.buckets:
                lines.append(f'{f.name}_bucket{{le="{_number(edge)}"}} {_number(count)}')
            lines.append(f"{f.name}_count {_number(f.buckets[-1][1])}")
            lines.append(f"{f.name}_sum {_number(f.sum)}")
        else:
            lines += [f"{name}{_labels(f.labels, values)} {_number(value)}" for values, value in f.values]
    return ("\n".join(lines) + "\n").encode()


def build_registry(agent: ScrapedAgent) -> CollectorRegistry:
    """The same metrics on a per-agent prometheus_client registry (imports prometheus_client)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    class AgentCollector:
        def collect(self) -> Iterator[Any]:
            for f in families(agent):
                if f.kind == "histogram":
                    yield HistogramMetricFamily(
                        f.name, f.help, sum_value=f.sum,
                        buckets=[(str(e) if e != math.inf else "+Inf", c) for e, c in f.buckets])
                    continue
                cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
                family = cls(f.name, f.help, labels=f.labels or None)
                for values, value in f.values:
                    family.add_metric(values, value)
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector())
    return registry
