"""Inference benchmark: sklearn predict vs the bundle's onnxruntime session, per estimator family.

Run: python bench/inference.py [--quick]. Prints a markdown table and writes
bench/results/inference.md. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import pickle
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.datasets import make_classification, make_regression  # noqa: E402
from sklearn.ensemble import (  # noqa: E402
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    IsolationForest,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.neural_network import MLPClassifier, MLPRegressor  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import OneHotEncoder, StandardScaler  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

from model_tools.feeds import feeds_from_columns  # noqa: E402
from model_tools.pipeline import build_bundle  # noqa: E402
from model_tools.session import make_session  # noqa: E402

BATCH = 256


def _clf(n=3000, f=20, sep=1.5):
    return make_classification(
        n_samples=n, n_features=f, n_informative=8, class_sep=sep, random_state=0
    )


def _reg(n=3000, f=20):
    return make_regression(n_samples=n, n_features=f, noise=5.0, random_state=0)


def _mixed(n=3000):
    rng = np.random.default_rng(0)
    X = np.empty((n, 5), dtype=object)
    for i in range(4):
        X[:, i] = rng.normal(size=n)
    X[:, 4] = rng.choice(["red", "green", "blue", "dark grey"], size=n)
    y = ((X[:, 0].astype(float) + (X[:, 4] == "red")) > 0.3).astype(int)
    return X, y


def families():
    ct = ColumnTransformer(
        [
            ("num", StandardScaler(), [0, 1, 2, 3]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), [4]),
        ]
    )
    return [
        (
            "LogisticRegression (scaled)",
            make_pipeline(StandardScaler(), LogisticRegression()),
            _clf,
        ),
        ("ColumnTransformer + OneHot + LR", make_pipeline(ct, LogisticRegression()), _mixed),
        (
            "RandomForestClassifier (100)",
            RandomForestClassifier(100, max_depth=10, random_state=0),
            _clf,
        ),
        (
            "HistGradientBoostingClassifier",
            HistGradientBoostingClassifier(max_iter=100, random_state=0),
            _clf,
        ),
        (
            "GradientBoostingRegressor",
            GradientBoostingRegressor(n_estimators=100, random_state=0),
            _reg,
        ),
        (
            "MLPClassifier (128, 64)",
            make_pipeline(
                StandardScaler(),
                MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=300, random_state=0),
            ),
            lambda: _clf(sep=2.0),
        ),
        (
            "MLPRegressor (128, 64)",
            make_pipeline(
                StandardScaler(),
                MLPRegressor(hidden_layer_sizes=(128, 64), max_iter=300, random_state=0),
            ),
            _reg,
        ),
        ("SVC (rbf)", make_pipeline(StandardScaler(), SVC()), _clf),
        ("KNeighborsClassifier", KNeighborsClassifier(), lambda: _clf(n=2000)),
        (
            "IsolationForest (100)",
            IsolationForest(n_estimators=100, random_state=0),
            lambda: (_clf()[0], None),
        ),
    ]


def _time(fn, runs: int) -> tuple[float, float]:
    for _ in range(min(20, runs)):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    us = np.asarray(out) * 1e6
    return float(np.median(us)), float(np.percentile(us, 99))


def _throughput(fn, rows: int, runs: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    return rows * runs / (time.perf_counter() - t0)


def bench_one(name, est, make_data, runs: int, batch_runs: int) -> dict:
    X, y = make_data()
    n_test = 500
    X_train, X_test = X[:-n_test], X[-n_test:]
    y_train = None if y is None else y[:-n_test]
    y_test = None if y is None else y[-n_test:]
    est.fit(X_train) if y is None else est.fit(X_train, y_train)
    result = build_bundle(
        est, (X_train, y_train), validation=(X_test, y_test), name="bench", version="1"
    )
    variants = {v.name: v for v in result.variants if v.built}
    m = result.manifest
    columns = [X_test[:, i] for i in range(X_test.shape[1])]
    feeds = feeds_from_columns(m.onnx_inputs, columns)
    one = {k: v[:1] for k, v in feeds.items()}
    batch = {k: np.concatenate([v] * (BATCH // len(v) + 1))[:BATCH] for k, v in feeds.items()}
    X_one, X_batch = X_test[:1], np.concatenate([X_test] * (BATCH // len(X_test) + 1))[:BATCH]

    row = {"family": name, "chosen": result.chosen}
    row["sk_p50"], row["sk_p99"] = _time(lambda: est.predict(X_one), runs)
    row["sk_tput"] = _throughput(lambda: est.predict(X_batch), BATCH, batch_runs)
    int8 = [v for n, v in variants.items() if n != "float32"]
    # The int8 column shows the chosen int8 variant, else the smallest one that was built.
    int8_key = (
        result.chosen
        if result.chosen != "float32"
        else (min(int8, key=lambda v: v.size).name if int8 else None)
    )
    for vname in ("float32", "int8"):
        key = "float32" if vname == "float32" else int8_key
        if key is None or key not in variants:
            row[vname] = None
            continue
        sess = make_session(variants[key].model_bytes)
        p50, p99 = _time(lambda s=sess: s.run(None, one), runs)
        tput = _throughput(lambda s=sess: s.run(None, batch), BATCH, batch_runs)
        parity = next(r for r in result.parity if r.variant == key)
        row[vname] = {"name": key, "p50": p50, "p99": p99, "tput": tput, "bytes": variants[key].size,
                      "agreement": parity.agreement}  # fmt: skip
    row["pickle_bytes"] = len(pickle.dumps(est))
    row["chosen_bytes"] = variants[result.chosen].size
    row["speedup"] = row["sk_p50"] / row["float32"]["p50"]
    return row


def render(rows: list[dict], quick: bool) -> str:
    def us(v):
        return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"

    lines = [
        "# Inference benchmark",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}; onnxruntime with one intra-op "
        f"thread; single-row latency in µs (median / p99), batch throughput in rows/s for {BATCH}-row "
        f"batches; sizes in bytes.{' Quick run.' if quick else ''}",
        "",
        "| family | sklearn 1-row | ORT f32 1-row | speed-up | ORT int8 1-row | sklearn rows/s | ORT f32 rows/s "
        "| ORT int8 rows/s | pickle | ONNX f32 | chosen (size, % of f32) | int8 agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, q = r["float32"], r["int8"]
        int8_lat = f"{us(q['p50'])} / {us(q['p99'])} ({q['name']})" if q else "—"
        int8_tput = f"{q['tput']:,.0f}" if q else "—"
        agree = f"{q['agreement']:.2%}" if q else "—"
        lines.append(
            f"| {r['family']} | {us(r['sk_p50'])} / {us(r['sk_p99'])} | {us(f['p50'])} / {us(f['p99'])} "
            f"| {r['speedup']:.0f}× | {int8_lat} | {r['sk_tput']:,.0f} | {f['tput']:,.0f} | {int8_tput} "
            f"| {r['pickle_bytes']:,} | {f['bytes']:,} | {r['chosen']} ({r['chosen_bytes']:,}, "
            f"{r['chosen_bytes'] / f['bytes']:.0%}) | {agree} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing runs")
    args = parser.parse_args()
    runs, batch_runs = (200, 10) if args.quick else (1000, 50)
    warnings.filterwarnings("ignore")
    rows = []
    for name, est, make_data in families():
        print(f"benchmarking {name}...", file=sys.stderr)
        rows.append(bench_one(name, est, make_data, runs, batch_runs))
    table = render(rows, args.quick)
    out = ROOT / "bench" / "results" / "inference.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
