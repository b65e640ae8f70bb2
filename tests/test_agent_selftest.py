"""SelfTest's latency budget: the bundle's build-time median x its tolerance, with a floor."""

from __future__ import annotations

import msgspec

from edge_agent.config import UpdateConfig
from edge_agent.runtime import ModelRuntime
from model_tools.bundle import read_bundle
from tests.agent_fixtures import bundle_bytes, keypair


def runtime_with_budget(latency_ms_p50: float) -> ModelRuntime:
    runtime = ModelRuntime(read_bundle(bundle_bytes("lr", "1.0.0"), [keypair()[1]]))
    budget = msgspec.structs.replace(runtime.manifest.budget, latency_ms_p50=latency_ms_p50, latency_tolerance=1.0)
    runtime.manifest = msgspec.structs.replace(runtime.manifest, budget=budget)
    return runtime


def test_golden_set_passes_within_a_generous_budget():
    result = runtime_with_budget(1000.0).self_test()
    assert result.ok, result.reason
    assert 0 < result.latency_ms_p50 < 1000.0


def test_budget_below_the_measured_latency_fails_naming_the_numbers():
    result = runtime_with_budget(1e-9).self_test()
    assert not result.ok
    assert "median single-row latency" in result.reason and "over the budget" in result.reason
    assert "selftest_latency_floor_ms" in result.reason  # says what to change


def test_floor_lifts_a_budget_measured_on_a_faster_machine():
    runtime = runtime_with_budget(1e-9)
    assert runtime.self_test(latency_floor_ms=1000.0).ok
    assert UpdateConfig().selftest_latency_floor_ms > 0  # on by default
