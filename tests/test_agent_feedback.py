"""Ground-truth feedback: prediction ids, joins into confusion / error / calibration counts that
match a direct computation (over MQTT), late / unknown / duplicate feedback counted, malformed
feedback refused with 4xx while serving goes on, and the record's memory bound."""

from __future__ import annotations

import json
import re
from bisect import bisect_left

import numpy as np
import pytest
import requests

from edge_agent import Agent, RequestError
from edge_agent.feedback import BYTES_PER_RECORD, PredictionRecord
from edge_agent.protocol import CALIBRATION_EDGES, feedback_error_edges
from edge_agent.runtime import ModelRuntime
from edge_agent.service import AgentService
from model_tools.bundle import read_bundle
from tests.agent_fixtures import (
    bundle_bytes,
    collector_fixture,  # noqa: F401 - fixture
    dataset,
    install_active,
    keypair,
    make_config,
    manifest_of,
    outbox_windows,
    regression_bundle_bytes,
    regression_dataset,
)
from tests.brokers import wait_until


def merged(windows, version: str):
    """Sum every feedback block of `version` over windows (as the server would)."""
    blocks = [b for w in windows for b in ([w.feedback] if w.feedback else []) + list(w.feedback_other)
              if b.version == version]
    assert blocks, f"no feedback block for {version}"

    def add(name):
        vals = [getattr(b, name) for b in blocks if getattr(b, name) is not None]
        return np.sum(vals, axis=0).tolist() if vals else None

    return {name: add(name) for name in ("joined", "unknown_label", "confusion", "abs_error_sum", "sq_error_sum",
                                         "error_bins", "calibration_counts", "calibration_hits",
                                         "calibration_prob_sum")}


def counters(windows) -> dict[str, int]:
    out = {"late": 0, "unknown": 0, "duplicate": 0, "rejected": 0}
    for w in windows:
        for k in out:
            out[k] += getattr(w.feedback, k) if w.feedback else 0
        assert all(getattr(b, k) == 0 for b in w.feedback_other for k in out)  # main block only
    return out


@pytest.mark.broker
def test_confusion_and_calibration_over_mqtt_match_direct_computation(tmp_path, broker, collector):
    config = make_config(tmp_path, broker)
    data = bundle_bytes("lr", "1.0.0")
    install_active(config.path, data)
    service = AgentService(config).start()
    host, port = service.http.address
    url = f"http://{host}:{port}"
    try:
        X, y = dataset()
        rows, truth = X[:300].tolist(), y[:300].tolist()
        ids, preds, probas = [], [], []
        with requests.Session() as s:
            for i in range(0, 300, 10):  # single rows and batches
                for body in ({"row": rows[i]}, {"rows": rows[i + 1 : i + 10]}):
                    r = s.post(f"{url}/v1/predict", json=body)
                    assert r.status_code == 200, r.text
                    answer = r.json()
                    assert len(answer["ids"]) == len(answer["predictions"])
                    ids += answer["ids"]
                    preds += answer["predictions"]
                    probas += answer["probabilities"]
            assert len(set(ids)) == 300 and all(re.fullmatch(r"[a-z2-7]{8}-[0-9a-f]+", i) for i in ids)
            # Ground truth arrives later, in two batches and out of order, with some noise.
            items = [{"id": i, "label": t} for j, (i, t) in enumerate(zip(ids, truth, strict=True)) if j != 5][::-1]
            r = s.post(f"{url}/v1/feedback", json={"feedback": items[:200]})
            assert r.status_code == 200, r.text
            assert r.json() == {"joined": 200, "unknown_label": 0, "late": 0, "unknown": 0, "duplicate": 0}
            noise = [{"id": ids[0], "label": truth[0]},  # answered earlier in this batch
                     {"id": ids[5], "label": "cat"},  # its only answer, and not a class of this model
                     {"id": "not-an-id", "label": 1},
                     {"id": ids[0].split("-")[0] + "-ffffff", "label": 1}]  # never issued
            r = s.post(f"{url}/v1/feedback", json={"feedback": items[200:] + noise})
            assert r.json() == {"joined": 99, "unknown_label": 1, "late": 0, "unknown": 2, "duplicate": 1}

        def windows():
            return list({w.seq: w for w in collector.get("telemetry")}.values())

        wait_until(lambda: sum(w.feedback.joined + w.feedback.unknown_label for w in windows() if w.feedback) == 300,
                   15, message="all feedback reported")
        got = merged(windows(), "1.0.0")
        classes = manifest_of(data).outputs.classes
        k = len(classes)
        want = np.zeros((k, k), dtype=int)
        cal_n, cal_hit, cal_p = [0] * 10, [0] * 10, [0.0] * 10
        for j, (t, p, pr) in enumerate(zip(truth, preds, probas, strict=True)):
            if j == 5:
                continue  # its feedback was an unknown label
            want[classes.index(t)][classes.index(p)] += 1
            b = bisect_left(CALIBRATION_EDGES, max(pr))
            cal_n[b] += 1
            cal_hit[b] += t == p
            cal_p[b] += max(pr)
        assert got["confusion"] == want.tolist()
        assert got["joined"] == 299 and got["unknown_label"] == 1
        assert got["calibration_counts"] == cal_n and got["calibration_hits"] == cal_hit
        np.testing.assert_allclose(got["calibration_prob_sum"], cal_p, rtol=1e-6)
        assert counters(windows()) == {"late": 0, "unknown": 2, "duplicate": 1, "rejected": 0}
        assert got["error_bins"] is None and got["abs_error_sum"] == 0
    finally:
        service.stop()


@pytest.mark.broker
def test_regression_error_sums_over_mqtt_match_direct_computation(tmp_path, broker, collector):
    config = make_config(tmp_path, broker)
    data = regression_bundle_bytes("1.0.0")
    install_active(config.path, data)
    agent = Agent(config).start()  # in-process API, MQTT in its own thread
    try:
        X, y = regression_dataset()
        preds, ids = [], []
        for i in range(0, 200, 4):
            one = agent.predict([X[i].tolist()])
            many = agent.predict(X[i + 1 : i + 4].tolist())
            for p in (one, many):
                preds += p.output.values
                ids += p.ids
        assert len(set(ids)) == 200
        result = agent.feedback([{"id": i, "value": float(t)} for i, t in zip(ids, y[:200], strict=True)])
        assert (result.joined, result.late, result.unknown, result.duplicate) == (200, 0, 0, 0)
        again = agent.feedback({"id": ids[0], "label": "warm"})  # answered already: only the first answer counts
        assert again.duplicate == 1
        wait_until(lambda: (agent.tick() or True) and sum(
            w.feedback.joined for w in collector.get("telemetry") if w.feedback) >= 200, 15,
            message="regression feedback reported")
        windows = list({w.seq: w for w in collector.get("telemetry")}.values())
        got = merged(windows, "1.0.0")
        err = np.abs(y[:200] - np.asarray(preds))
        edges = feedback_error_edges(manifest_of(data).profile.prediction.edges)
        assert got["joined"] == 200
        assert counters(windows)["duplicate"] == 1  # ids[0] was already answered
        assert got["abs_error_sum"] == pytest.approx(err.sum(), rel=1e-9)
        assert got["sq_error_sum"] == pytest.approx((err**2).sum(), rel=1e-9)
        assert got["error_bins"] == np.bincount(np.searchsorted(edges, err, side="left"),
                                                minlength=len(edges) + 1).tolist()
        mae, rmse = got["abs_error_sum"] / got["joined"], (got["sq_error_sum"] / got["joined"]) ** 0.5
        assert 0 < mae <= rmse
        assert got["confusion"] is None and got["calibration_counts"] is None
    finally:
        agent.close()


def test_late_unknown_duplicate_counted_and_memory_bound(tmp_path):
    now = [1_000_000.0]
    config = make_config(tmp_path, telemetry={"window_s": 60}, feedback={"max_records": 50, "horizon_s": 100})
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    agent = Agent(config, clock=lambda: now[0], link_mode="none").start()
    try:
        X, y = dataset()
        record = agent.prediction_record
        assert record.nbytes == 50 * BYTES_PER_RECORD
        ids = []
        for i in range(0, 120, 3):
            ids += agent.predict(X[i : i + 3].tolist()).ids if i % 2 else agent.predict([X[i].tolist()]).ids
            assert len(record) <= 50
        n = len(ids)
        assert len(record) == 50 and record.issued == n and len(set(ids)) == n
        truth = dict(zip(ids, [int(t) for t in y[: n]], strict=False))
        evicted = [{"id": i, "label": truth[i]} for i in ids[: n - 50]]
        r = agent.feedback(evicted)
        assert (r.late, r.joined) == (n - 50, 0)
        r = agent.feedback([{"id": ids[-1], "label": truth[ids[-1]]}] * 3)  # one answer, two repeats
        assert (r.joined, r.duplicate) == (1, 2)
        prefix = ids[0].split("-")[0]
        r = agent.feedback([{"id": f"{prefix}-{n:x}", "label": 0}, {"id": "x", "label": 0},
                            {"id": "q" * 1000, "label": 0}, {"id": f"{prefix}-{'f' * 15}", "label": 0}])
        assert (r.unknown, r.joined, r.late) == (4, 0, 0)
        now[0] += 101  # past the horizon: everything still in the record has expired
        r = agent.feedback([{"id": i, "label": truth[i]} for i in ids[-10:-1]])
        assert (r.late, r.joined) == (9, 0)
        now[0] += 60
        agent.tick(now[0])
        w = outbox_windows(agent)[-1]
        assert (w.feedback.late, w.feedback.unknown, w.feedback.duplicate) == (n - 50 + 9, 4, 2)
        assert w.feedback.joined == 1 and sum(map(sum, w.feedback.confusion)) == 1
    finally:
        agent.close()
    # After a restart the record is empty: the earlier run's ids are late, not unknown.
    again = Agent(config, clock=lambda: now[0], link_mode="none").start()
    try:
        assert again.prediction_record.prefix != prefix
        r = again.feedback([{"id": ids[-1], "label": 0}])
        assert (r.late, r.unknown) == (1, 0)
    finally:
        again.close()


def test_feedback_for_a_previous_version_is_attributed_to_it(tmp_path):
    now = [1_000_000.0]
    config = make_config(tmp_path, telemetry={"window_s": 60})
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    agent = Agent(config, clock=lambda: now[0], link_mode="none").start()
    try:
        X, y = dataset()
        old = agent.predict(X[:20].tolist())
        agent.activate(ModelRuntime(read_bundle(bundle_bytes("stump", "1.1.0"), [keypair()[1]])))
        new = agent.predict(X[20:30].tolist())
        assert new.version == "1.1.0"
        agent.feedback([{"id": i, "label": int(t)} for i, t in zip(old.ids + new.ids, y[:30], strict=True)])
        now[0] += 60
        agent.tick(now[0])
        w = outbox_windows(agent)[-1]
        assert w.model_version == "1.1.0"
        assert (w.feedback.version, w.feedback.joined) == ("1.1.0", 10)
        assert [(b.version, b.joined) for b in w.feedback_other] == [("1.0.0", 20)]
        hits = sum(int(a == b) for a, b in zip(old.output.labels, y[:20], strict=True))
        block = w.feedback_other[0]
        assert np.trace(block.confusion) == hits == sum(block.calibration_hits)
    finally:
        agent.close()


@pytest.fixture
def served(tmp_path):
    config = make_config(tmp_path, telemetry={"window_s": 3600}, http={"max_body_bytes": 20_000})
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    service = AgentService(config).start()
    host, port = service.http.address
    with requests.Session() as s:
        yield service, f"http://{host}:{port}", s
    service.stop()


MALFORMED = [
    # (description, body, status, error kind)
    ("not json", b"{feedback", 400, "malformed_json"),
    ("no items", {"labels": [1]}, 400, "bad_request"),
    ("feedback not a list", {"feedback": {"id": "a", "label": 1}}, 400, "bad_request"),
    ("item not an object", {"feedback": [["a", 1]]}, 422, "bad_feedback"),
    ("no id", {"feedback": [{"label": 1}]}, 422, "bad_feedback"),
    ("id not a string", [{"id": 7, "label": 1}], 422, "bad_feedback"),
    ("neither label nor value", [{"id": "a"}], 422, "bad_feedback"),
    ("both label and value", [{"id": "a", "label": 1, "value": 1.0}], 422, "bad_feedback"),
    ("value not a number", [{"id": "a", "value": "high"}], 422, "bad_feedback"),
    ("boolean label", [{"id": "a", "label": True}], 422, "bad_feedback"),
    ("label not a scalar", [{"id": "a", "label": [1]}], 422, "bad_feedback"),
    ("unknown key", [{"id": "a", "label": 1, "weight": 2}], 422, "bad_feedback"),
    ("body too large", {"feedback": [{"id": "a", "label": 1}] * 2000}, 413, "body_too_large"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_feedback_gets_4xx_and_agent_keeps_serving(served, case):
    service, url, s = served
    _, body, status, kind = case
    pred = s.post(f"{url}/v1/predict", json={"row": [0.1] * 6}).json()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    # the good item first: a refused request must count nothing, not even its valid items
    if isinstance(body, list):
        raw = json.dumps([{"id": pred["ids"][0], "label": pred["predictions"][0]}, *body]).encode()
    r = requests.post(f"{url}/v1/feedback", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"] == kind and r.json()["message"]
    ok = s.post(f"{url}/v1/predict", json={"row": [0.2] * 6})
    assert ok.status_code == 200
    r = s.post(f"{url}/v1/feedback", json={"id": pred["ids"][0], "label": pred["predictions"][0]})
    assert r.status_code == 200 and r.json()["joined"] == 1  # not joined by the refused request
    agent = service.agent
    agent.tick(agent.clock() + 3600)
    w = outbox_windows(agent)[-1]
    assert w.feedback.rejected == 1 and w.feedback.joined == 1
    assert w.errors == {}  # feedback refusals are not serving errors


def test_in_process_feedback_refuses_malformed_batches_whole(tmp_path):
    config = make_config(tmp_path, telemetry={"window_s": 3600})
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    agent = Agent(config, link_mode="none").start()
    try:
        p = agent.predict([[0.1] * 6])
        with pytest.raises(RequestError) as exc:
            agent.feedback([{"id": p.ids[0], "label": 1}, {"id": p.ids[0], "value": float("nan")}])
        assert exc.value.kind == "bad_feedback" and exc.value.status == 422 and exc.value.row == 1
        assert "item 1" in str(exc.value)
        r = agent.feedback({"id": p.ids[0], "label": p.output.labels[0]})
        assert r.to_dict() == {"joined": 1, "unknown_label": 0, "late": 0, "unknown": 0, "duplicate": 0}
    finally:
        agent.close()


def test_record_is_a_fixed_ring(tmp_path):
    manifest = manifest_of(bundle_bytes("lr", "1.0.0"))
    from edge_agent.runtime import Output

    record = PredictionRecord(max_records=7, horizon_s=10)
    before = record.nbytes
    firsts = [record.add(manifest, Output([1, 0, 1], [[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]], None), 0.0)
              for _ in range(10)]
    assert firsts == list(range(0, 30, 3)) and len(record) == 7 and record.nbytes == before
    items = [(i, 1) for i in record.ids(0, 30)]
    r = record.join(items, 5.0)
    assert (r.late, r.joined) == (23, 7)
