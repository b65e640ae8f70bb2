"""An emulated arm64 Debian device for tests and benchmarks: a minimal root built from Debian's
packages (cached outside the clone), run under qemu-user through binfmt, the agent installed from
an aarch64 wheelhouse, and a memory cgroup to cap it like a small Raspberry Pi.

Every failure a user can meet says what is wrong and what to do: no binfmt handler, no space
for the root, the package mirror unreachable. Nothing here skips.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from edge_agent.release.platforms import DEFAULT_PYTHON
from edge_agent.release.wheelhouse import (
    build_wheel,
    download_wheels,
    installed_pins,
    source_root,
    wheel_requirements,
    write_checksums,
)

# What the device root holds: the interpreter, venv (for the installer test), curl (the one-line
# install command) and the shell and base utilities the install script uses; apt adds what they
# depend on. The cache key is this list and the release.
ROOT_PACKAGES = (
    "python3", "python3-venv", "curl", "base-files", "base-passwd", "bash", "coreutils", "dash", "debianutils",
    "diffutils", "findutils", "grep", "gzip", "hostname", "libc-bin", "mawk", "ncurses-base", "sed",
    "sysvinit-utils", "tar", "util-linux", "libstdc++6", "libgcc-s1", "tzdata",
)
# What maintainer scripts would have created and the device's programs expect.
ROOT_DIRS = {"tmp": 0o1777, "var/tmp": 0o1777, "root": 0o700, "usr/local/bin": 0o755, "usr/local/sbin": 0o755,
             "usr/local/lib": 0o755, "usr/local/share": 0o755}
ROOT_BYTES_NEEDED = 1 << 30  # the root is ~150 MB; room for the agent and its data besides
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
MACHINE = "aarch64"
COMPLETE = ".edgefleet-root-complete"


class DeviceRootError(RuntimeError):
    """The emulated device cannot be set up; the message says why and what to do."""


def cache_dir() -> Path:
    """The user's cache dir for edgefleet (outside any clone): $XDG_CACHE_HOME or ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet"


# ---------------------------------------------------------------- the host


def host_release(os_release: Path = Path("/etc/os-release")) -> str:
    """The host's Debian codename (the root uses the same release, from the same mirror)."""
    text = os_release.read_text() if os_release.exists() else ""
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    codename = fields.get("VERSION_CODENAME", "").strip('"')
    if fields.get("ID", "").strip('"') != "debian" or not codename:
        raise DeviceRootError(f"the arm64 device root is built from Debian's packages for the host's release; "
                              f"this host is not Debian ({fields.get('PRETTY_NAME', 'no /etc/os-release')})")
    return codename


def host_mirror(release: str, apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror URI the host's apt uses for `release` (deb822 .sources or sources.list)."""
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.sources")),
             *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.lstrip().startswith("#"):
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.split()
                if "deb" in fields.get("types", []) and release in fields.get("suites", []) and fields.get("uris"):
                    return fields["uris"][0].rstrip("/")
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == release:
                    return parts[1].rstrip("/")
    raise DeviceRootError(f"no Debian mirror for {release} in {apt_dir}/sources.list(.d): the device root is "
                          "built from the mirror the host's apt uses")


def binfmt_problem(entry: Path = BINFMT) -> str | None:
    """Why arm64 programs cannot run here, or None when the qemu-aarch64 handler is enabled."""
    if not shutil.which("qemu-aarch64-static") and not Path("/usr/bin/qemu-aarch64-static").exists():
        return "qemu-aarch64-static is missing: apt-get install qemu-user-static binfmt-support (make setup does)"
    if not entry.exists():
        return (f"no qemu-aarch64 binfmt handler ({entry} is missing): run `make binfmt`, or as root "
                "`mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-aarch64`")
    text = entry.read_text()
    if not text.startswith("enabled"):
        return "the qemu-aarch64 binfmt handler is disabled: run `update-binfmts --enable qemu-aarch64` as root"
    flags = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("flags:")), "")
    if "F" not in flags:
        return ("the qemu-aarch64 binfmt handler lacks the F (fix binary) flag, so it cannot run inside a "
                "chroot: reinstall Debian's qemu-user-static")
    return None


def check_space(path: Path, needed: int = ROOT_BYTES_NEEDED) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed:
        raise DeviceRootError(f"no space for the arm64 device root: {free / 2**20:.0f} MiB free at {path}, "
                              f"{needed / 2**20:.0f} MiB needed; free some space or set XDG_CACHE_HOME elsewhere")


def check_mirror(mirror: str, release: str, timeout: float = 20.0) -> None:
    url = f"{mirror}/dists/{release}/Release"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read(1)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeviceRootError(f"the Debian mirror is unreachable ({url}: {reason}); the arm64 device root "
                              "cannot be built without it") from exc


# ---------------------------------------------------------------- the root


def root_key(release: str, packages: tuple[str, ...] = ROOT_PACKAGES) -> str:
    return hashlib.sha256(f"{release} arm64 extract {' '.join(sorted(packages))}".encode()).hexdigest()[:12]


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_root(cache: Path | None = None, packages: tuple[str, ...] = ROOT_PACKAGES, release: str | None = None,
               mirror: str | None = None, log=print) -> Path:
    """The cached arm64 root for `packages`, built with mmdebstrap on first use (seconds).

    The packages and their dependencies are extracted, not installed: no maintainer script runs
    under emulation (installing them would take twenty minutes of dpkg and byte-compiling under
    qemu), and what their scripts would have made (/etc/passwd and /etc/group from base-passwd's
    masters, /tmp, /usr/local) is made here. Built into a temporary directory and renamed when complete, so
    an interrupted build is started over, never used; a lock keeps two test runs from building
    it at once.
    """
    problem = binfmt_problem()
    if problem:
        raise DeviceRootError(problem)
    cache = cache or cache_dir()
    release = release or host_release()
    target = cache / f"arm64-root-{root_key(release, packages)}"
    if (target / COMPLETE).exists():
        return target
    with _lock(cache / f"{target.name}.lock"):
        if (target / COMPLETE).exists():
            return target
        mirror = mirror or host_mirror(release)
        check_space(cache)
        check_mirror(mirror, release)
        for stale in cache.glob(f".{target.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)  # an earlier build that was interrupted
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
        tool = shutil.which("mmdebstrap")
        if not tool:
            raise DeviceRootError("mmdebstrap is missing: apt-get install mmdebstrap (make setup does)")
        mode = "root" if os.geteuid() == 0 else "unshare"
        cmd = [tool, "--arch=arm64", "--variant=extract", f"--include={','.join(packages)}", f"--mode={mode}",
               "--quiet", release, str(tmp), mirror]
        log(f"building the arm64 device root (once): {' '.join(cmd)}")
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            if "No space left" in tail:
                raise DeviceRootError(f"no space left on the device while building the arm64 root in {cache}:\n{tail}")
            raise DeviceRootError(f"mmdebstrap failed (exit {proc.returncode}) building the arm64 root from "
                                  f"{mirror}:\n{tail}")
        for rel, mode in ROOT_DIRS.items():
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            (tmp / rel).chmod(mode)
        for name in ("passwd", "group"):
            master = tmp / "usr/share/base-passwd" / f"{name}.master"
            if master.is_file() and not (tmp / "etc" / name).exists():
                shutil.copyfile(master, tmp / "etc" / name)
        (tmp / COMPLETE).write_text(f"{release} {' '.join(packages)} {time.monotonic() - started:.0f}s\n")
        tmp.chmod(0o755)
        tmp.rename(target)
        log(f"arm64 device root ready in {time.monotonic() - started:.0f} s: {target}")
    return target


# ---------------------------------------------------------------- the aarch64 wheelhouse


def agent_wheelhouse(dest: Path, machine: str = MACHINE, python: str = DEFAULT_PYTHON,
                     cache: Path | None = None) -> Path:
    """A wheelhouse for `machine` in `dest`: this checkout's wheel plus its agent dependencies.

    The dependencies (pinned to this environment's versions) are downloaded once and cached by
    pin set; the edgefleet wheel is built fresh, so the device runs the code under test.
    """
    source = source_root()
    if source is None:
        raise DeviceRootError("the arm64 tests need a source checkout (pyproject.toml beside edge_agent)")
    dest.mkdir(parents=True, exist_ok=True)
    wheel = build_wheel(source, dest / "build")
    requirements = wheel_requirements(wheel)
    pins = installed_pins(requirements)
    key = hashlib.sha256("\n".join([machine, python, *requirements, *pins]).encode()).hexdigest()[:12]
    deps = (cache or cache_dir()) / f"wheels-{machine}-{key}"
    if not deps.is_dir():
        deps.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{deps.name}.", dir=deps.parent))
        try:
            download_wheels(requirements, tmp, machine, python, pins)
            tmp.rename(deps)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    house = dest / f"cp{python.replace('.', '')}-{machine}"
    house.mkdir(exist_ok=True)
    for whl in [*deps.glob("*.whl"), wheel]:
        shutil.copyfile(whl, house / whl.name)
    write_checksums(house)
    return house


# ---------------------------------------------------------------- memory cgroup


class MemoryCgroup:
    """A memory cgroup with a hard limit (cgroup v2 memory.max, or v1 memory.limit_in_bytes)."""

    _counter = itertools.count()

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.path, self.version = self._create()
        limit_file = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        (self.path / limit_file).write_text(str(limit_bytes))
        if self.version == 1:
            with suppress(OSError):  # no swap accounting: memory.limit_in_bytes is the cap anyway
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))

    @staticmethod
    def _mounts() -> list[tuple[str, str, str]]:
        out = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fstype, _, options = right.split(" ", 2)
            out.append((left.split()[4], fstype, options))
        return out

    def _create(self) -> tuple[Path, int]:
        name = f"edgefleet-arm64-{os.getpid()}-{next(self._counter)}"
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            own[controllers] = path
        errors = []
        for mount, fstype, options in self._mounts():
            if fstype == "cgroup" and "memory" in options.split(","):
                parent = Path(mount) / next((p for c, p in own.items() if "memory" in c.split(",")), "/").lstrip("/")
                try:
                    (parent / name).mkdir()
                    return parent / name, 1
                except OSError as exc:
                    errors.append(f"v1 {parent}: {exc}")
        for mount, fstype, _ in self._mounts():
            if fstype != "cgroup2" or "memory" not in (Path(mount) / "cgroup.controllers").read_text().split():
                continue
            parent = Path(mount) / own.get("", "/").lstrip("/")
            try:
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    (parent / "cgroup.subtree_control").write_text("+memory")
                (parent / name).mkdir()
                return parent / name, 2
            except OSError as exc:
                errors.append(f"v2 {parent}: {exc}")
        raise DeviceRootError("cannot create a memory cgroup to cap the emulated device at "
                              f"{self.limit / 2**20:.0f} MiB (needs root and a mounted memory controller): "
                              + ("; ".join(errors) or "no cgroup memory controller is mounted"))

    def enter(self) -> None:
        """Move the calling process into the cgroup (as a Popen preexec_fn: before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def limit_bytes(self) -> int:
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        return int((self.path / name).read_text())

    def peak_bytes(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        with suppress(OSError, ValueError):
            return int((self.path / name).read_text())
        return None

    def remove(self) -> None:
        for pid in self.pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)


# ---------------------------------------------------------------- running programs on the device

# Mount what programs expect (/proc for RSS and CPU figures, /dev, /sys for the CPU layout) in a
# private mount namespace, so nothing stays mounted on the host, then chroot. qemu-user 7 passes
# the host's x86 /proc/cpuinfo through, and onnxruntime's cpuinfo library crashes (SIGSEGV at
# import) parsing it as ARM's: the device sees a Raspberry Pi 4's instead, as on the real board.
_ENTER = """
set -e
root=$1; cpuinfo=$2; shift 2
mount -t proc proc "$root/proc"
mount --bind "$cpuinfo" "$root/proc/cpuinfo"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
exec chroot "$root" "$@"
"""

PI4_PROCESSOR = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""
PI4_BOARD = "Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n"
QEMU_CPU = "cortex-a72"  # the Raspberry Pi 4's core: onnxruntime picks the kernels it would there


def pi4_cpuinfo(cpus: int) -> str:
    return "\n".join(PI4_PROCESSOR.format(n=n) for n in range(cpus)) + "\n" + PI4_BOARD

DEVICE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "MALLOC_ARENA_MAX": "2",  # as edgefleet-agent.service runs the agent
    "QEMU_CPU": QEMU_CPU,
}


@dataclass
class Device:
    """One emulated device: an overlay over the cached root, so what a test writes (/opt, /etc,
    the agent's data) lands in its own upper dir and the cached root stays as built."""

    root: Path  # the merged view (what the device sees as /)
    layers: Path

    @classmethod
    def create(cls, base: Path, scratch: Path) -> Device:
        layers = Path(tempfile.mkdtemp(prefix="arm64-device-", dir=scratch))
        for name in ("upper", "work", "merged"):
            (layers / name).mkdir()
        (layers / "cpuinfo").write_text(pi4_cpuinfo(os.cpu_count() or 1))
        options = f"lowerdir={base},upperdir={layers / 'upper'},workdir={layers / 'work'}"
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(layers / "merged")],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise DeviceRootError(f"cannot mount an overlay over the arm64 root (needs root and overlayfs): "
                                  f"{proc.stderr.strip()}")
        return cls(layers / "merged", layers)

    def host(self, device_path: str) -> Path:
        """Where a device path lives on the host."""
        return self.root / device_path.lstrip("/")

    def popen(self, argv: list[str], env: dict[str, str] | None = None, cgroup: MemoryCgroup | None = None,
              **kwargs) -> subprocess.Popen:
        """Start `argv` inside the root under emulation (in `cgroup` when given)."""
        env_args = [f"{k}={v}" for k, v in {**DEVICE_ENV, **(env or {})}.items()]
        cmd = ["unshare", "--mount", "--fork", "--kill-child=SIGTERM", "--", "sh", "-c", _ENTER, "sh",
               str(self.root), str(self.layers / "cpuinfo"), "/usr/bin/env", "-i", *env_args, *argv]
        return subprocess.Popen(cmd, preexec_fn=cgroup.enter if cgroup else None, start_new_session=True, **kwargs)

    def run(self, argv: list[str], env: dict[str, str] | None = None, cgroup: MemoryCgroup | None = None,
            timeout: float = 600, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        proc = self.popen(argv, env, cgroup, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        finally:
            if proc.poll() is None:  # a timeout (ours or the test's): leave nothing running
                stop(proc)
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode} on the arm64 device:\n"
                                 f"{out[-1500:]}\n{err[-3000:]}")
        return result

    def machine(self) -> str:
        return self.run(["/usr/bin/python3", "-c", "import platform; print(platform.machine())"]).stdout.strip()

    def cleanup(self) -> None:
        subprocess.run(["umount", "--lazy", str(self.root)], capture_output=True)
        shutil.rmtree(self.layers, ignore_errors=True)


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM the process group (unshare, the program under qemu), SIGKILL after `timeout`."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


CONSOLE_SCRIPT = """#!{python}
import sys
from edge_agent.entry import main
sys.exit(main())
"""


VENV = "/opt/edgefleet/venv"


def install_agent(device: Device, wheelhouse: Path, machine: str = MACHINE, python: str = DEFAULT_PYTHON) -> str:
    """edgefleet[agent] from `wheelhouse` into the device's /opt/edgefleet/venv; returns the venv.

    pip runs on the host with the device's platform (`--platform ... --target`): the same wheels
    `pip install --no-index` would pick on the device, in seconds instead of minutes of emulated
    pip. The venv itself is made by the device's python3, and `bin/edgefleet` is the console
    script pip writes. (tests/test_arm64_device.py also runs the real installer on the device.)
    """
    from edge_agent.release.platforms import device_platform

    venv = VENV
    device.run(["/usr/bin/python3", "-m", "venv", "--without-pip", venv])
    site = device.host(f"{venv}/lib/python{python}/site-packages")
    version = next(wheelhouse.glob("edgefleet-*.whl")).name.split("-")[1]
    args = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheelhouse),
            "--only-binary=:all:", "--implementation", "cp", "--python-version", python, "--target", str(site),
            "--upgrade", "--no-compile", "--disable-pip-version-check"]
    for tag in device_platform(machine).platform_tags():
        args += ["--platform", tag]
    proc = subprocess.run([*args, f"edgefleet[agent]=={version}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeviceRootError(f"installing the agent into the arm64 root failed:\n{proc.stderr[-2000:]}")
    shutil.rmtree(site / "bin", ignore_errors=True)  # host-python scripts; ours follows
    script = device.host(f"{venv}/bin/edgefleet")
    script.write_text(CONSOLE_SCRIPT.format(python=f"{venv}/bin/python"))
    script.chmod(0o755)
    return venv
