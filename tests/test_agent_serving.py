"""Serving: golden-set parity over HTTP and in-process, every bad-input class, no-model 503."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import requests

from edge_agent import Agent, RequestError
from edge_agent.service import AgentService
from model_tools.bundle import read_bundle
from tests.agent_fixtures import ROOT, bundle_bytes, install_active, keypair, make_config


@pytest.fixture
def served(tmp_path):
    """An agent with the LR bundle active, HTTP on a free port, no MQTT."""
    config = make_config(tmp_path, http={"token": "s3cret", "max_rows": 50, "max_body_bytes": 20_000})
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    service = AgentService(config).start()
    host, port = service.http.address
    session = requests.Session()
    session.headers["Authorization"] = "Bearer s3cret"
    yield service, f"http://{host}:{port}", session
    session.close()
    service.stop()


def golden():
    bundle = read_bundle(bundle_bytes("lr", "1.0.0"), [keypair()[1]])
    x = bundle.golden_inputs[bundle.manifest.onnx_inputs[0].name]
    out = bundle.golden_outputs
    return bundle.manifest, x, out


def test_golden_parity_in_process_and_http(served):
    service, url, s = served
    manifest, x, out = golden()
    labels = out[manifest.outputs.label].tolist()
    probas = out[manifest.outputs.probabilities]
    rows = x.astype(np.float64).tolist()
    one_by_one = [service.agent.predict([r]).output.labels[0] for r in rows]
    assert one_by_one == labels
    batch = service.agent.predict(rows).output
    assert batch.labels == labels
    np.testing.assert_allclose(batch.probabilities, probas, atol=1e-5)
    r = s.post(f"{url}/v1/predict", json={"rows": rows})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predictions"] == labels and body["version"] == "1.0.0"
    np.testing.assert_allclose(body["probabilities"], probas, atol=1e-5)
    # objects keyed by feature name, one row at a time, keep-alive
    for row, label in zip(rows[:5], labels[:5], strict=True):
        obj = dict(zip(manifest.feature_names, row, strict=True))
        r = s.post(f"{url}/v1/predict", json={"row": obj})
        assert r.status_code == 200 and r.json()["predictions"] == [label]


BAD = [
    # (description, raw body or JSON, status, error kind, feature named in the message)
    ("malformed json", b"{not json", 400, "malformed_json", None),
    ("no rows key", {"data": []}, 400, "bad_request", None),
    ("wrong feature count", {"rows": [[1.0, 2.0]]}, 422, "wrong_feature_count", None),
    ("unknown feature", {"row": {"x0": 1, "x1": 1, "x2": 1, "x3": 1, "x4": 1, "x5": 1, "bogus": 2}}, 422, "unknown_feature", "bogus"),
    ("missing feature", {"row": {"x0": 1}}, 422, "missing_feature", "x1"),
    ("non-numeric", {"rows": [[1, 2, "three", 4, 5, 6]]}, 422, "not_numeric", "x2"),
    ("boolean is not a number", {"rows": [[1, 2, 3, True, 5, 6]]}, 422, "not_numeric", "x3"),
    ("NaN not allowed", {"rows": [[1, 2, 3, 4, None, 6]]}, 422, "nan_not_allowed", "x4"),
    ("too many rows", {"rows": [[0.0] * 6] * 51}, 413, "too_many_rows", None),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_4xx_and_agent_keeps_serving(served, case):
    service, url, s = served
    _, body, status, kind, feature = case
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = s.post(f"{url}/v1/predict", data=data, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error"] == kind
    if feature:
        assert err["feature"] == feature and feature in err["message"]
    assert service.agent.telemetry.total_errors.get(kind) == 1
    ok = s.post(f"{url}/v1/predict", json={"rows": [[0.1] * 6]})  # same connection still works
    assert ok.status_code == 200


def test_oversized_body_and_tokens(served):
    service, url, s = served
    r = s.post(f"{url}/v1/predict", data=b"[" + b"1," * 20_000 + b"1]")
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    r = requests.post(f"{url}/v1/predict", json={"rows": [[0.1] * 6]})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = requests.post(f"{url}/v1/predict", json={"rows": [[0.1] * 6]}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = requests.get(f"{url}/v1/health")
    assert r.status_code == 401
    assert s.post(f"{url}/v1/predict", json={"rows": [[0.1] * 6]}).status_code == 200
    assert service.agent.telemetry.total_errors == {"body_too_large": 1, "unauthorized": 3}


def test_health_model_metrics(served):
    service, url, s = served
    s.post(f"{url}/v1/predict", json={"rows": [[0.1] * 6, [0.2] * 6]})
    health = s.get(f"{url}/v1/health").json()
    assert health["status"] == "ok" and health["version"] == "1.0.0"
    model = s.get(f"{url}/v1/model").json()
    assert model["version"] == "1.0.0" and [f["name"] for f in model["inputs"]] == [f"x{i}" for i in range(6)]
    assert model["update_state"] == "Idle"
    metrics = s.get(f"{url}/metrics")
    assert metrics.status_code == 200
    assert "edgefleet_predictions_total 2.0" in metrics.text
    assert 'edgefleet_model_info{device="dev-1",model="demo",version="1.0.0"} 1.0' in metrics.text
    assert s.get(f"{url}/nope").status_code == 404


def test_no_model_answers_503(tmp_path):
    service = AgentService(make_config(tmp_path)).start()
    try:
        host, port = service.http.address
        r = requests.post(f"http://{host}:{port}/v1/predict", json={"rows": [[0.1] * 6]})
        assert r.status_code == 503 and "no model is active" in r.json()["message"]
        h = requests.get(f"http://{host}:{port}/v1/health")
        assert h.status_code == 503 and h.json()["status"] == "no_model"
        with pytest.raises(RequestError) as exc:
            service.agent.predict([[0.1] * 6])
        assert exc.value.kind == "no_model"
    finally:
        service.stop()


def test_unix_socket(tmp_path):
    sock_path = str(tmp_path / "agent.sock")
    config = make_config(tmp_path, listen="", http={"unix_socket": sock_path})
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    service = AgentService(config).start()
    try:
        body = json.dumps({"rows": [[0.1] * 6]}).encode()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock_path)
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200") and b'"version":"1.0.0"' in reply
    finally:
        service.stop()


def test_batch_csv_scoring_cli(tmp_path):
    config = make_config(tmp_path)
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    from tests.agent_fixtures import config_toml

    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_toml(config))
    manifest, x, out = golden()
    lines = ["id," + ",".join(manifest.feature_names)]
    lines += [f"r{i}," + ",".join(repr(float(v)) for v in row) for i, row in enumerate(x[:10])]
    lines.append("bad,1,2,oops,4,5,6")
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    from click.testing import CliRunner

    from edge_agent.cli import agent

    result = CliRunner().invoke(agent, ["predict", "--config", str(cfg), "--input", str(tmp_path / "rows.csv"),
                                        "--output", str(tmp_path / "out.csv")])
    assert result.exit_code == 0, result.output
    assert "10 of 11 rows scored" in result.output
    import csv

    with open(tmp_path / "out.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["prediction"]) for r in rows[:10]] == out[manifest.outputs.label][:10].tolist()
    assert rows[10]["id"] == "bad" and rows[10]["error"].startswith("not_numeric") and "x2" in rows[10]["error"]


def test_agent_imports_no_sklearn_flask_skl2onnx():
    code = (
        "import sys, edge_agent, edge_agent.agent, edge_agent.http, edge_agent.service, edge_agent.cli, "
        "edge_agent.batch, edge_agent.update.machine\n"
        "bad = [m for m in ('sklearn', 'flask', 'skl2onnx', 'onnx', 'fleet_server') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_in_process_agent_without_link(tmp_path):
    config = make_config(tmp_path)
    install_active(config.path, bundle_bytes("rf", "1.0.0"))
    agent = Agent(config, link_mode="none").start()
    try:
        result = agent.predict([[0.0] * 6, {"x0": 1, "x1": 2, "x2": 3, "x3": 4, "x4": 5, "x5": 6}])
        assert result.version == "1.0.0" and len(result.output.labels) == 2
    finally:
        agent.close()
