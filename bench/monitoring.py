"""What label-free performance estimation and multivariate drift cost a device.

Per prediction: `Telemetry.record` with the bundle's calibration map and PCA (expected
confusion sums, raw-score histogram, reconstruction error) against the same call with them
left out, beside the model run itself (feeds + onnxruntime, what Agent.predict spends on the
model). Per window: telemetry bytes with and without the new fields. CPU time of the calling
thread (`time.thread_time`: other processes on a busy machine move it far less than the wall
clock), interleaved repeats, the median of each; prints a markdown table and writes bench/results/monitoring.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.protocol import Resources, encode  # noqa: E402
from edge_agent.runtime import ModelRuntime  # noqa: E402
from edge_agent.telemetry import Telemetry  # noqa: E402
from model_tools.bundle import read_bundle  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def bundles():
    """(label, bundle) for a binary, a three-class and a 30-feature model."""
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from model_tools.pipeline import build_bundle

    out = []
    for label, n_features, n_classes, est in (
        ("binary, 6 features (LR)", 6, 2, make_pipeline(StandardScaler(), LogisticRegression())),
        ("3 classes, 8 features (GaussianNB)", 8, 3, GaussianNB()),
        ("binary, 30 features (LR)", 30, 2, make_pipeline(StandardScaler(), LogisticRegression())),
    ):
        X, y = make_classification(n_samples=3000, n_features=n_features, n_informative=min(n_features - 3, 5),
                                   n_redundant=2, n_classes=n_classes, random_state=0)
        est.fit(X[:2000], y[:2000])
        data = build_bundle(est, (X[:2000], y[:2000]), validation=(X[2000:], y[2000:]), name="b", version="1",
                            quantize="float32").bundle_bytes
        out.append((label, read_bundle(data, require_signature=False), X[2000:]))
    return out


def plain(manifest):
    """The same manifest without the monitoring inputs: the agent records what it did before."""
    profile = msgspec.structs.replace(manifest.profile, multivariate=None)
    return msgspec.structs.replace(manifest, estimation=None, profile=profile)


def time_record(manifest, rows, outs, batch: int) -> float:
    """µs per row of Telemetry.record over every row, `batch` rows a call."""
    t = Telemetry("d", clock=lambda: 0.0, sample_rows=16)
    t.set_model(manifest)
    started = time.thread_time()
    for part, out in zip(rows, outs, strict=True):
        t.record(part, out.primary, 1e-5, out.probabilities)
    return (time.thread_time() - started) / (len(rows) * batch) * 1e6


def time_model(rt, rows, batch: int) -> float:
    started = time.thread_time()
    for part in rows:
        rt.run(rt.feeds(part))
    return (time.thread_time() - started) / (len(rows) * batch) * 1e6


def window_bytes(manifest, rt, X, n: int) -> int:
    t = Telemetry("d", clock=lambda: 0.0, sample_rows=16)
    t.set_model(manifest)
    for row in X[:n].tolist():
        out = rt.run(rt.feeds([row]))
        t.record([row], out.primary, 1e-5, out.probabilities)
    return len(encode(t.flush(60.0, 1 << 40, Resources(), 0, "b")))


def refused_bytes(manifest) -> int:
    t = Telemetry("d", clock=lambda: 0.0, sample_rows=0)
    t.set_model(manifest)
    n = len(manifest.inputs)
    t.record_error("nan_not_allowed", manifest.inputs[0].name, [[float("nan")] * n] * 30)
    before = len(encode(msgspec.structs.replace(t.flush(60.0, 1, Resources(), 0, "b"), refused=None)))
    t.record_error("nan_not_allowed", manifest.inputs[0].name, [[float("nan")] * n] * 30)
    return len(encode(t.flush(120.0, 2, Resources(), 0, "b"))) - before


def agent_predict(repeats: int, n: int) -> tuple[float, float]:
    """Median µs of Agent.predict for one row: the fixtures' binary bundle as built, and the same
    model re-signed without its monitoring inputs (interleaved runs)."""
    from edge_agent import Agent
    from model_tools.bundle import write_bundle
    from tests.agent_fixtures import bundle_bytes, dataset, install_active, keypair, make_config

    data = bundle_bytes("lr")
    bundle = read_bundle(data, require_signature=False)
    stripped = write_bundle(None, plain(bundle.manifest), bundle.model_bytes, bundle.golden, keypair()[0])
    X, _ = dataset()
    rows = [[float(v) for v in r] for r in X[:1000]]
    with tempfile.TemporaryDirectory() as tmp:
        agents = []
        for name, payload in (("with", data), ("without", stripped)):
            config = make_config(Path(tmp) / name, telemetry={"window_s": 3600})
            install_active(config.path, payload)
            agents.append(Agent(config, link_mode="none").start())
        times: list[list[float]] = [[], []]
        for _ in range(repeats):
            for k, agent in enumerate(agents):
                started = time.thread_time()
                for i in range(n):
                    agent.predict([rows[i % 1000]])
                times[k].append((time.thread_time() - started) / n * 1e6)
        for agent in agents:
            agent.close()
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rows and repeats")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    lines = [
        "# Monitoring cost on the agent",
        "",
        "`Telemetry.record` with the bundle's calibration map and PCA (label-free performance sums, "
        "reconstruction error) vs without them, per row, beside the model run (feeds + onnxruntime) "
        f"of the same rows: CPU time of the calling thread (steadier than the wall clock on a shared "
        f"machine), median of {repeats} interleaved runs. Window bytes: one window of single-row "
        "predictions encoded as the agent sends it.",
        "",
        "| model | rows per call | model run µs/row | record µs/row, without | with | added µs/row | "
        "window bytes, 500 rows, without | with | added | refused-rows block (30 rows) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, bundle, X in bundles():
        manifest, rt = bundle.manifest, ModelRuntime(bundle)
        base = plain(manifest)
        sizes = (
            window_bytes(base, rt, X, 500), window_bytes(manifest, rt, X, 500), refused_bytes(manifest)
        )
        for batch in (1, 32):
            n = (2000 if args.quick else 6000) // batch
            rows = [X[(i * batch) % 900 : (i * batch) % 900 + batch].tolist() for i in range(n)]
            outs = [rt.run(rt.feeds(part)) for part in rows]
            model, without, with_ = [], [], []
            for _ in range(repeats):
                model.append(time_model(rt, rows[: n // 4], batch))
                without.append(time_record(base, rows, outs, batch))
                with_.append(time_record(manifest, rows, outs, batch))
            m, a, b = (statistics.median(v) for v in (model, without, with_))
            lines.append(
                f"| {label} | {batch} | {m:.1f} | {a:.1f} | {b:.1f} | {b - a:.1f} | "
                + (f"{sizes[0]:,} | {sizes[1]:,} | {sizes[1] - sizes[0]:,} | {sizes[2]:,} |" if batch == 1 else "| | | |")
            )
    with_, without = agent_predict(repeats, 500 if args.quick else 2000)
    lines += [
        "",
        f"`Agent.predict` of one row (validation, model, telemetry, prediction record), binary 6-feature LR: "
        f"{with_:.1f} µs with the monitoring inputs, {without:.1f} µs with the same model re-signed without "
        f"them: {with_ - without:+.1f} µs per prediction.",
        "",
        "Single rows take the plain-Python path (a bisect per calibrated column, the reconstruction "
        "error as |z|² − |Wz|² when the PCA is small); batches take numpy's. Load average during "
        f"the run: {os.getloadavg()[0]:.1f} (timings on a busy machine are inflated alike on both sides).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "monitoring.md").write_text(text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
