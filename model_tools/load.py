"""Load a fitted estimator from disk: .skops safely, pickle/joblib only with explicit consent."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from model_tools.errors import EstimatorLoadError

PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib", ".jbl"}


def load_estimator(
    path: str | os.PathLike[str],
    *,
    trusted_types: Iterable[str] = (),
    trust_pickle: bool = False,
) -> Any:
    """Load a fitted estimator.

    `.skops` files are loaded only when every type they contain is trusted by skops by default,
    is on edgefleet's reviewed list of scikit-learn internals (`model_tools.trusted_types`,
    whose index arrays are then checked) or is listed in `trusted_types`. Pickle and joblib
    files execute code while loading, so they are refused unless `trust_pickle` is set.
    """
    path = Path(path)
    if not path.is_file():
        raise EstimatorLoadError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix == ".skops":
        return _load_skops(path, list(trusted_types))
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise EstimatorLoadError(
                f"{path} is a pickle/joblib file: loading it runs arbitrary code from the file. "
                "Only if you made it or trust its author, pass --trust-pickle (trust_pickle=True); "
                "better, save the model with skops.io.dump and convert the .skops file"
            )
        return _load_pickle(path)
    raise EstimatorLoadError(
        f"{path}: unknown model format {suffix!r}; save the estimator with skops.io.dump (.skops), "
        "or joblib/pickle (.joblib, .pkl) together with --trust-pickle"
    )


def _load_skops(path: Path, trusted: list[str]) -> Any:
    import skops.io as sio

    from model_tools.trusted_types import (
        check_structures,
        curated_names,
        installed_sklearn_version,
        range_text,
    )

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # skops raises many types for a corrupt file
        raise EstimatorLoadError(f"{path} is not a valid .skops file ({exc})") from exc
    curated = curated_names()
    missing = sorted(set(untrusted) - set(trusted) - curated)
    if missing:
        flags = " ".join(f"--trust-type {t}" for t in missing)
        note = ""
        if not curated:
            note = (
                f" (edgefleet's reviewed list of scikit-learn types covers {range_text()}; "
                f"scikit-learn {installed_sklearn_version()} is installed, so it is not applied)"
            )
        raise EstimatorLoadError(
            f"{path} contains types that are not trusted by default: {', '.join(missing)}{note}. "
            f"Review them; if you trust them, pass {flags}"
        )
    try:
        estimator = sio.load(path, trusted=sorted(set(untrusted)) or None)
    except Exception as exc:
        raise EstimatorLoadError(f"cannot load {path}: {exc}") from exc
    check_structures(estimator, str(path))
    return estimator


def _load_pickle(path: Path) -> Any:
    try:
        if path.suffix.lower() in (".joblib", ".jbl"):
            import joblib

            return joblib.load(path)
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception as exc:
        raise EstimatorLoadError(f"cannot unpickle {path}: {exc}") from exc
