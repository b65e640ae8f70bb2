"""A device installs `edgefleet[agent]`: that must not pull scikit-learn, skl2onnx or Flask."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_ON_DEVICE = {"scikit-learn", "skl2onnx", "flask", "onnx", "scipy", "werkzeug"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str]) -> set[str]:
    """Every distribution the requirements pull in, following installed packages' metadata."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for sub in requires:
            parsed = Requirement(sub)
            if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                todo.append(parsed)
    return seen


def test_agent_extra_stays_light():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + project["optional-dependencies"]["agent"]
    pulled = closure(direct)
    assert "onnxruntime" in pulled and "paho-mqtt" in pulled
    assert not pulled & FORBIDDEN_ON_DEVICE, sorted(pulled & FORBIDDEN_ON_DEVICE)


def test_every_extra_is_declared():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"agent", "server", "tools", "sim", "dev"} <= set(extras)
