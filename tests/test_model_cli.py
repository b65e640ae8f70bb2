"""`edgefleet model ...` through click's CliRunner, on real files."""

from __future__ import annotations

import json
import pickle
import stat

import pytest
import skops.io as sio
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edge_agent.entry import main
from tests.model_fixtures import classification_data


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fitted model saved as .skops and .pkl, a CSV sample with labels, and a key pair."""
    d = tmp_path_factory.mktemp("cli")
    X, y = classification_data(n=500, n_features=4)
    est = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    sio.dump(est, d / "model.skops")
    (d / "model.pkl").write_bytes(pickle.dumps(est))
    lines = ["temp,humidity ratio,pressure,wind,label"]
    lines += [",".join(f"{v:.6f}" for v in row) + f",{t}" for row, t in zip(X, y, strict=True)]
    (d / "sample.csv").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["model", "keygen", "-o", str(d / "keys") + "/"])
    assert result.exit_code == 0, result.output
    return d


def run(*args):
    return CliRunner().invoke(main, ["model", *map(str, args)])


def test_keygen_dir_and_prefix(tmp_path, workdir):
    assert stat.S_IMODE((workdir / "keys" / "edgefleet.key").stat().st_mode) == 0o600
    result = run("keygen", "-o", tmp_path / "release", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["public_key"].endswith("release.pub") and len(doc["key_id"]) == 16
    again = run("keygen", "-o", tmp_path / "release")
    assert again.exit_code != 0 and "refusing to overwrite" in again.output


def convert(workdir, out, *extra):
    return run(
        "convert", workdir / "model.skops", "--sample", workdir / "sample.csv",
        "--name", "room-comfort", "--version", "1.2.0",
        "--sign-key", workdir / "keys" / "edgefleet.key", "-o", out, *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def bundle_path(workdir):
    out = workdir / "m.efb"
    result = convert(workdir, out, "--json")
    assert result.exit_code == 0, result.output
    return out


def test_convert_json(workdir, bundle_path):
    result = convert(workdir, workdir / "again.efb", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["name"] == "room-comfort" and doc["version"] == "1.2.0"
    assert doc["variant"] == "float32" and doc["signed"] is True and len(doc["key_id"]) == 16
    assert doc["parity"]["labels"] is True and doc["parity"]["variants"][0]["passed"]
    assert {v["variant"] for v in doc["quantization"]["variants"]} >= {"float32", "int8-dynamic"}
    assert doc["budget"]["model_bytes"] > 0 and doc["profile_rows"] == 500
    assert any("rows" in w for w in doc["warnings"])  # 500 reference rows is small
    assert "reading data" in result.stderr  # progress goes to stderr


def test_convert_text_shows_parity_table(workdir):
    result = convert(workdir, workdir / "text.efb")
    assert result.exit_code == 0, result.output
    assert (
        "variant" in result.stdout
        and "agreement" in result.stdout
        and "chosen: float32" in result.stdout
    )


def test_convert_failing_gate_exits_nonzero_with_table(workdir):
    result = convert(workdir, workdir / "fail.efb", "--min-agreement", "1.01")
    assert result.exit_code == 1
    assert "parity gate failed" in result.output and "FAIL: agreement" in result.output
    assert not (workdir / "fail.efb").exists()
    as_json = convert(workdir, workdir / "fail.efb", "--min-agreement", "1.01", "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["ok"] is False


def test_convert_pickle_needs_trust_pickle(workdir):
    args = ["convert", workdir / "model.pkl", "--sample", workdir / "sample.csv",
            "--name", "m", "--version", "1", "-o", workdir / "p.efb"]  # fmt: skip
    refused = run(*args)
    assert refused.exit_code == 1
    assert "runs arbitrary code" in refused.output and "--trust-pickle" in refused.output
    accepted = run(*args, "--trust-pickle")
    assert accepted.exit_code == 0, accepted.output
    assert "UNSIGNED" in accepted.output


def test_inspect(bundle_path):
    text = run("inspect", bundle_path)
    assert text.exit_code == 0, text.output
    assert "room-comfort 1.2.0" in text.output and "humidity ratio: numeric" in text.output
    doc = json.loads(run("inspect", bundle_path, "--json").stdout)
    assert doc["signed"] is True and doc["manifest"]["name"] == "room-comfort"
    assert doc["manifest"]["profile"]["rows"] == 500 and len(doc["sha256"]) == 64


def test_verify_good_and_bad_key(workdir, bundle_path, tmp_path):
    good = run("verify", bundle_path, "--public-key", workdir / "keys" / "edgefleet.pub")
    assert good.exit_code == 0 and good.output.startswith("OK: room-comfort 1.2.0")
    run("keygen", "-o", tmp_path / "other")
    bad = run("verify", bundle_path, "--public-key", tmp_path / "other.pub")
    assert bad.exit_code == 1 and "does not verify with any trusted key" in bad.output
    bad_json = run("verify", bundle_path, "--public-key", tmp_path / "other.pub", "--json")
    doc = json.loads(bad_json.stdout)
    assert bad_json.exit_code == 1 and doc == {
        "ok": False, "bundle": str(bundle_path), "error": doc["error"], "kind": "SignatureError",
    }  # fmt: skip
    good_json = json.loads(
        run(
            "verify", bundle_path, "--public-key", workdir / "keys" / "edgefleet.pub", "--json"
        ).stdout
    )
    assert good_json["ok"] is True and set(good_json["files"]) == {"model.onnx", "golden.npz"}


def test_verify_tampered_file(bundle_path, workdir, tmp_path):
    data = bytearray(bundle_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "t.efb").write_bytes(bytes(data))
    result = run("verify", tmp_path / "t.efb", "--public-key", workdir / "keys" / "edgefleet.pub")
    assert result.exit_code == 1 and "Error:" in result.output
