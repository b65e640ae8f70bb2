"""Build what a device installs offline: the edgefleet wheel and, per device platform, a
wheelhouse of the agent extra's dependencies as binary wheels, with a SHA256SUMS list.

Wheels come from the package index once, on the build machine (`pip download --platform ...
--only-binary=:all:`); the fleet server then serves them to devices on LANs without internet.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from zipfile import ZipFile

from edge_agent.release.platforms import DEFAULT_PYTHON, SUPPORTED, device_platform, wheelhouse_name

CHECKSUMS = "SHA256SUMS"
EXTRA = "agent"
SOURCE_IGNORE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".demo",
                 "test-artifacts", ".hypothesis")


class ReleaseError(Exception):
    """A release step failed; the message says which and what to do."""


@dataclass(frozen=True)
class Wheelhouse:
    """One platform's directory: every wheel `pip install --no-index edgefleet[agent]` needs."""

    path: Path
    machine: str
    python: str
    wheels: tuple[str, ...]


def source_root() -> Path | None:
    """The checkout this package runs from, when it is one (an installed wheel has no pyproject)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def _pip(*args: str, what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ReleaseError(f"{what} failed (pip exit {proc.returncode}):\n{tail}")


def build_wheel(source: Path, out_dir: Path) -> Path:
    """`pip wheel --no-deps` of the project at `source` into `out_dir`; returns the wheel."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-wheel-") as tmp:
        # setuptools builds in the source tree (build/, *.egg-info): a copy keeps the checkout
        # clean and keeps files deleted since an earlier build out of this wheel.
        tree = Path(tmp) / "src"
        shutil.copytree(source, tree, ignore=shutil.ignore_patterns(*SOURCE_IGNORE))
        _pip("wheel", "--no-deps", "--quiet", "--wheel-dir", tmp, str(tree), what=f"building the wheel of {source}")
        built = sorted(Path(tmp).glob("edgefleet-*.whl"))
        if len(built) != 1:
            raise ReleaseError(f"expected one edgefleet wheel from {source}, got {[p.name for p in built]}")
        target = out_dir / built[0].name
        shutil.copyfile(built[0], target)
    return target


def wheel_requirements(wheel: Path, extra: str = EXTRA) -> list[str]:
    """The Requires-Dist lines of `wheel` that apply with `extra` (markers evaluated for it)."""
    from packaging.requirements import Requirement

    with ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(name).decode()
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        if canonical(req.name) == "edgefleet":
            continue  # an extra that names the project itself (edgefleet[agent] from [tools])
        req.marker = None
        out.append(str(req))
    return sorted(out)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_pins(requirements: list[str]) -> list[str]:
    """`name==version` for every distribution the requirements pull into this environment.

    Pinning the wheelhouse to what the build machine runs means devices get the versions the
    tests ran against, not whatever the index offers that day.
    """
    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in pins:
            continue
        try:
            pins[name] = metadata.version(req.name)
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here: the index decides
        for sub in requires:
            parsed = Requirement(sub)
            if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                todo.append(parsed)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def download_wheels(requirements: list[str], dest: Path, machine: str, python: str = DEFAULT_PYTHON,
                    constraints: list[str] | None = None) -> None:
    """Binary wheels of `requirements` (and their dependencies) for `machine` into `dest`."""
    platform = device_platform(machine)
    args = ["download", "--quiet", "--only-binary=:all:", "--implementation", "cp",
            "--python-version", python, "--dest", str(dest)]
    for tag in platform.platform_tags():
        args += ["--platform", tag]
    with tempfile.TemporaryDirectory(prefix="edgefleet-pins-") as tmp:
        if constraints:
            path = Path(tmp) / "constraints.txt"
            path.write_text("\n".join(constraints) + "\n")
            args += ["--constraint", str(path)]
        _pip(*args, *requirements,
             what=f"downloading {machine} wheels for Python {python} from the package index (is it reachable?)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(directory: Path) -> Path:
    """SHA256SUMS over every wheel in `directory`, in `sha256sum -c` format."""
    lines = [f"{sha256_file(p)}  {p.name}" for p in sorted(directory.glob("*.whl"))]
    path = directory / CHECKSUMS
    path.write_text("\n".join(lines) + "\n")
    return path


def read_checksums(directory: Path) -> dict[str, str]:
    """file name -> sha256 from `directory`'s SHA256SUMS."""
    out: dict[str, str] = {}
    for line in (directory / CHECKSUMS).read_text().splitlines():
        if line.strip():
            digest, _, name = line.partition("  ")
            out[name.strip()] = digest
    return out


def verify_checksums(directory: Path) -> list[str]:
    """What does not match SHA256SUMS (missing, changed or unlisted wheels); empty when all do."""
    listed = read_checksums(directory)
    problems = [f"{name}: missing" for name in listed if not (directory / name).is_file()]
    problems += [f"{name}: sha256 differs" for name, digest in listed.items()
                 if (directory / name).is_file() and sha256_file(directory / name) != digest]
    problems += [f"{p.name}: not in {CHECKSUMS}" for p in sorted(directory.glob("*.whl")) if p.name not in listed]
    return problems


def build_wheelhouse(wheel: Path, out_dir: Path, machine: str, python: str = DEFAULT_PYTHON,
                     pin: bool = True) -> Wheelhouse:
    """`out_dir/cp311-<machine>/`: the edgefleet wheel, its agent dependencies, SHA256SUMS.

    Built in a temporary directory and renamed into place, so an interrupted build never
    leaves a wheelhouse that looks complete.
    """
    requirements = wheel_requirements(wheel)
    target = out_dir / wheelhouse_name(machine, python)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=out_dir))
    try:
        download_wheels(requirements, tmp, machine, python, installed_pins(requirements) if pin else None)
        shutil.copyfile(wheel, tmp / wheel.name)
        write_checksums(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    wheels = tuple(sorted(p.name for p in target.glob("*.whl")))
    return Wheelhouse(target, machine, python, wheels)


def build_release(out_dir: Path, machines: list[str] | None = None, python: str = DEFAULT_PYTHON,
                  source: Path | None = None, wheel: Path | None = None, pin: bool = True) -> list[Wheelhouse]:
    """The edgefleet wheel (built from `source`, or the given `wheel`) and one wheelhouse per machine.

    Layout: `out_dir/edgefleet-<version>-py3-none-any.whl` and `out_dir/wheelhouse/cp311-<machine>/`.
    """
    machines = machines or list(SUPPORTED)
    for machine in machines:
        device_platform(machine)  # refuse armv7 and friends before any download
    if wheel is None:
        source = source or source_root()
        if source is None:
            raise ReleaseError("no source checkout here: pass the edgefleet wheel to package (--wheel)")
        wheel = build_wheel(source, out_dir)
    return [build_wheelhouse(wheel, out_dir / "wheelhouse", m, python, pin) for m in machines]
