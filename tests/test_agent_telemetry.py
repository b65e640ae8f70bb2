"""Telemetry windows over MQTT: counts match the requests sent; outages lose and duplicate nothing;
the outbox stays within its bound and reports what it dropped."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent import Agent, RequestError
from edge_agent.outbox import Outbox, first_seq
from edge_agent.protocol import SEQ_INSTALL_SHIFT, SEQ_NEW_INSTALL_JUMP
from edge_agent.service import AgentService
from model_tools.binning import count_categorical, count_numeric
from tests.agent_fixtures import (
    bundle_bytes,
    collector_fixture,  # noqa: F401 - fixture
    dataset,
    install_active,
    make_config,
    manifest_of,
    onnx_predict,
)
from tests.brokers import wait_until


def EPOCH() -> float:  # an outbox created at time 0 starts at seq 0
    return 0.0


def test_a_new_outbox_starts_above_every_seq_of_an_earlier_install(tmp_path):
    first = Outbox(tmp_path / "a.sqlite3", clock=lambda: 1_700_000_000.0)
    seqs = [first.append("telemetry", lambda s: b"{}") for _ in range(3)]
    assert seqs[0] == first.first_seq == 1_700_000_000 << SEQ_INSTALL_SHIFT
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    first.close()
    # Reopened later: the same install, the counter goes on (it never restarts from the clock).
    again = Outbox(tmp_path / "a.sqlite3", clock=lambda: 1_800_000_000.0)
    assert again.append("events", lambda s: b"{}") == seqs[-1] + 1 and again.first_seq == seqs[0]
    again.close()
    # The data dir wiped and the agent reinstalled a second later under the same device id.
    fresh = Outbox(tmp_path / "b.sqlite3", clock=lambda: 1_700_000_001.0)
    assert fresh.append("telemetry", lambda s: b"{}") - seqs[-1] > SEQ_NEW_INSTALL_JUMP
    fresh.close()


def test_outbox_seq_bound_and_restart(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=1000, clock=EPOCH)
    seqs = [box.append("telemetry", lambda s: b"x" * 300) for _ in range(5)]
    assert seqs == [0, 1, 2, 3, 4]
    assert box.bytes <= 1000 and box.dropped_total == 2
    assert [m.seq for m in box.pending()] == [2, 3, 4]
    box.ack(2)
    box.commit_acks()
    assert [m.seq for m in box.pending()] == [3, 4]
    box.close()
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=1000, clock=EPOCH)
    assert box.dropped_total == 2 and [m.seq for m in box.pending()] == [3, 4]
    assert box.append("events", lambda s: b"{}") == 5  # seq never goes back
    box.ack(3)
    box.ack(4)
    box.ack(5)
    box.close()
    box = Outbox(tmp_path / "o.sqlite3", clock=EPOCH)
    assert box.pending() == [] and box.append("events", lambda s: b"{}") == 6


def test_outbox_keeps_a_message_the_broker_took_until_the_server_acks_it(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=1000, resend_after_s=60, clock=EPOCH)
    for _ in range(3):
        box.append("telemetry", lambda s: b"x" * 100)
    assert [m.seq for m in box.due(0.0, limit=2)] == [0, 1]  # at most the link's room
    box.sent(0)
    box.sent(1)
    assert [m.seq for m in box.due(0.0, limit=10, inflight={0, 1})] == [2]
    box.sent(2)
    for seq in (0, 1, 2):
        box.broker_took(seq, now=100.0)  # PUBACK: frees the slot, the message stays
    assert box.count() == 3 and box.awaiting == 3
    assert box.due(150.0, limit=10) == []  # the server has resend_after_s to acknowledge
    box.ack(1)
    box.commit_acks()
    assert box.count() == 2 and box.awaiting == 2
    assert [m.seq for m in box.due(160.0, limit=10)] == [0, 2]  # not acknowledged in time: again
    box.sent(0)
    box.broker_took(0, now=161.0)
    assert [m.seq for m in box.due(170.0, limit=10)] == [2]
    box.resend_all()  # a reconnect: the restarted broker may have lost them
    assert [m.seq for m in box.due(170.0, limit=10)] == [0, 2]
    # The byte bound still applies to what waits for the server: oldest dropped and counted.
    for _ in range(9):
        box.append("telemetry", lambda s: b"x" * 100)
    assert box.bytes <= 1000 and box.dropped_total == 1 and 0 not in {m.seq for m in box.pending()}
    box.close()
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=1000, clock=EPOCH)
    assert [m.seq for m in box.due(0.0, limit=3)] == [2, 3, 4]  # after a restart: all of it again


@pytest.mark.broker
def test_window_counts_match_requests(tmp_path, broker, collector):
    config = make_config(tmp_path, broker, telemetry={"sample_rows": 16, "sample_exclude": ["x1"]})
    data = bundle_bytes("lr", "1.0.0")
    install_active(config.path, data)
    service = AgentService(config).start()
    try:
        agent = service.agent
        X, _ = dataset()
        rng = np.random.default_rng(1)
        rows = X[:400] * rng.choice([1.0, 3.0], size=(400, 1))  # some beyond the training range
        for i in range(0, 400, 4):
            agent.predict([rows[i].tolist()])
            agent.predict(rows[i + 1 : i + 4].tolist())
        bad = 0
        for row in ([1, 2, "x", 4, 5, 6], [1, 2, 3, 4, None, 6], [1.0]):
            with pytest.raises(RequestError):
                agent.predict([row])
            bad += 1

        def totals():
            ws = {w.seq: w for w in collector.get("telemetry")}
            return sum(w.predictions for w in ws.values()), list(ws.values())

        wait_until(lambda: totals()[0] == 400 and sum(sum(w.errors.values()) for w in totals()[1]) == bad, 15,
                   message="all predictions and errors reported")
        windows = [w for w in totals()[1] if w.requests]
        manifest = manifest_of(data)
        assert sum(w.requests for w in windows) == 200 + bad
        errors: dict[str, int] = {}
        for w in windows:
            for k, n in w.errors.items():
                errors[k] = errors.get(k, 0) + n
        assert errors == {"not_numeric": 1, "nan_not_allowed": 1, "wrong_feature_count": 1}
        assert sum(sum(w.latency.counts) for w in windows) == 200
        for j, prof in enumerate(manifest.profile.features):
            spec = manifest.inputs[j]
            want = count_numeric(rows[:, j], prof.distribution.edges, spec.min, spec.max)
            got = np.sum([w.features[j].bins for w in windows], axis=0).tolist()
            assert got == want.counts, prof.name
            assert sum(w.features[j].below_min for w in windows) == want.below_min
            assert sum(w.features[j].above_max for w in windows) == want.above_max
            assert sum(w.features[j].nan for w in windows) == 0
        labels = onnx_predict(data, rows)
        want = count_categorical([str(v) for v in labels], manifest.profile.prediction.categories)
        assert np.sum([w.prediction.bins for w in windows], axis=0).tolist() == want.counts
        for w in windows:
            assert len(w.sample) <= 16 and all(s.x[1] is None and s.x[0] is not None for s in w.sample)
            assert w.model_version == "1.0.0" and w.resources.rss_bytes > 0 and w.dropped_total == 0
        assert len({w.seq for w in collector.get("telemetry")}) == len(collector.get("telemetry"))
    finally:
        service.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_broker_outage_loses_and_duplicates_no_window(tmp_path, broker, collector):
    config = make_config(tmp_path, broker, telemetry={"window_s": 0.3})
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    service = AgentService(config).start()
    try:
        agent = service.agent
        wait_until(lambda: len(collector.get("telemetry")) >= 2, 10, message="windows before the outage")
        first = min(w.seq for w in collector.get("telemetry"))  # this install's first seq
        broker.stop()
        wait_until(lambda: not agent.link.connected, 10, message="agent notices the outage")
        wait_until(lambda: agent.outbox.count() >= 6, 15, message="windows queued while offline")
        service.stop()  # flushes the last window into the outbox; what is unsent waits on disk
        queued = agent.outbox.next_seq
        subscribed = collector.subscribed
        broker.start()
        wait_until(lambda: collector.subscribed > subscribed, 10, message="collector back")
        again = AgentService(config).start()  # the same device after a restart
        try:
            wait_until(lambda: {w.seq for w in collector.get("telemetry")} >= set(range(first, queued + 3)), 30,
                       message="every queued window delivered, then new ones")
        finally:
            again.stop()
        windows = {}
        for w in collector.get("telemetry"):
            windows.setdefault(w.seq, w)  # the server dedupes by (device, seq)
        seqs = sorted(windows)
        assert seqs == list(range(first, first + len(seqs)))  # no gap
        starts = [windows[s].window_start for s in seqs]
        assert len(set(starts)) == len(starts)  # no window sent twice under two seqs
        assert all(a.window_end <= b.window_start + 1e-6 for a, b in zip(
            [windows[s] for s in seqs], [windows[s] for s in seqs[1:]], strict=False))
    finally:
        service.stop()


@pytest.mark.broker
def test_outbox_bound_drops_oldest_and_reports(tmp_path, broker, collector):
    now = [1_000_000.0]
    config = make_config(tmp_path, broker, telemetry={"window_s": 60}, outbox={"max_bytes": 6000})
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    broker.stop()
    agent = Agent(config, clock=lambda: now[0], link_mode="thread").start()
    try:
        for _ in range(30):  # half an hour offline
            agent.predict([[0.1] * 6])
            now[0] += 60
            agent.tick(now[0])
            assert agent.outbox.bytes <= 6000
        dropped = agent.outbox.dropped_total
        assert dropped > 0
        kept = agent.outbox.count()
        subscribed = collector.subscribed
        broker.start()
        # The agent only publishes from tick(): hold it until the test's own subscriber is back,
        # so that what is measured is the agent's delivery, not the collector's reconnect race.
        wait_until(lambda: collector.subscribed > subscribed, 15, message="collector resubscribed")

        def delivered():
            now[0] += 0.5
            agent.tick(now[0])
            return len({w.seq for w in collector.get("telemetry")}) >= kept

        wait_until(delivered, 30, message="kept windows delivered")
        seqs = sorted({w.seq for w in collector.get("telemetry")})
        assert seqs[0] == first_seq(1_000_000.0) + dropped  # the oldest were dropped
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # the newest, in order
        assert max(w.dropped_total for w in collector.get("telemetry")) > 0
    finally:
        agent.close()


def test_single_rows_counted_in_batches_make_the_window_of_one_at_a_time(tmp_path):
    """Single-row requests are held and counted with the next batch (or the tick); the window, the
    totals and the prediction record are what counting each request as it comes would give."""
    import random

    import msgspec

    from edge_agent.feedback import PENDING_RECORDS
    from edge_agent.telemetry import PENDING_ROWS

    X, y = dataset()
    now = [1_700_000_000.0]
    agents = []
    for name in ("batched", "immediate"):
        config = make_config(tmp_path / name, telemetry={"window_s": 60, "sample_rows": 8})
        install_active(config.path, bundle_bytes("lr", "1.0.0"))
        agents.append(Agent(config, link_mode="none", clock=lambda: now[0], rng=random.Random(7)).start())
    batched, immediate = agents
    try:
        n = PENDING_ROWS + PENDING_RECORDS // 2 + 3  # one full batch and a partial one
        ids = []
        for i in range(n):
            row = [float(v) for v in X[i]]
            ids.append(batched.predict([row]).ids[0])
            immediate.predict([row])
            immediate.telemetry.count_pending()
            immediate.prediction_record.join([], now[0])  # writes its pending record slots
            now[0] += 0.01
        # The record joins ids whose slots are still pending.
        result = batched.feedback([{"id": pid, "label": int(y[i])} for i, pid in enumerate(ids[-3:], n - 3)])
        assert result.joined == 3
        windows = []
        for agent in agents:
            agent.telemetry.count_pending()
            assert agent.telemetry.total_predictions == agent.telemetry.total_requests == n
            w = agent.telemetry.flush(now[0], 1, agent._resources(), 0, "m")
            windows.append(msgspec.to_builtins(w))
        a, b = windows
        a.pop("feedback")  # only the batched agent got feedback
        b.pop("feedback")
        for w in (a, b):  # measured times and process figures: their own in each agent
            assert sum(w.pop("latency")["counts"]) == n
            w.pop("resources")
        assert a["predictions"] == b["predictions"] == n
        assert _same(a, b)
    finally:
        for agent in agents:
            agent.close()


def _same(a, b) -> bool:
    """Equal structures; floats equal to 1e-9 (numpy sums a batch in another order than one row at a time)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b)
        return all(_same(x, z) for x, z in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12, nan_ok=True)
        return True
    assert a == b
    return True
