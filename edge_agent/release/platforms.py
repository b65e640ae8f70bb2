"""The device platforms edgefleet ships wheelhouses for, and the ones it refuses (with why).

Stdlib only: the installer (`edge_agent.release.install`) reads the same facts on a device that has
nothing installed yet, so it carries its own copy; tests check that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

# Debian 12 (bookworm) and 64-bit Raspberry Pi OS bookworm ship Python 3.11 and glibc 2.36.
DEFAULT_PYTHON = "3.11"
DEVICE_GLIBC = (2, 36)


@dataclass(frozen=True)
class DevicePlatform:
    """One wheelhouse target: a CPU architecture as `uname -m` names it."""

    machine: str
    summary: str

    def platform_tags(self, glibc: tuple[int, int] = DEVICE_GLIBC) -> list[str]:
        """The manylinux tags pip may pick for this machine, newest first (up to `glibc`)."""
        tags = [f"manylinux_2_{minor}_{self.machine}" for minor in range(glibc[1], 16, -1)]
        return [*tags, f"manylinux2014_{self.machine}"]


SUPPORTED: dict[str, DevicePlatform] = {
    "aarch64": DevicePlatform(
        "aarch64", "64-bit Raspberry Pi OS or Debian arm64 (Raspberry Pi 3, 4, 5, Zero 2 W)"),
    "x86_64": DevicePlatform("x86_64", "x86-64 Linux (test machines, industrial PCs)"),
}

# What `pip download --platform manylinux_2_*_armv7l --only-binary=:all:` finds on the package
# index for CPython 3.11: no onnxruntime, numpy, msgspec or cffi (which cryptography needs)
# wheel. pip would start source builds of them on the device, which fail or take hours.
UNSUPPORTED_MESSAGE = (
    "edgefleet's agent runs on 64-bit Linux only (aarch64 or x86_64); this machine is {machine}. "
    "onnxruntime, numpy, msgspec and cffi publish no 32-bit ARM (armv7l/armv6l) wheels, and "
    "building them on the device is not supported. On a Raspberry Pi 3, 4, 5 or Zero 2 W install "
    "the 64-bit Raspberry Pi OS (or Debian arm64); a Pi 1, 2 or Zero (W) cannot run the agent."
)


def wheelhouse_name(machine: str, python: str = DEFAULT_PYTHON) -> str:
    """The directory of one wheelhouse: `cp311-aarch64`."""
    return f"cp{python.replace('.', '')}-{machine}"


def device_platform(machine: str) -> DevicePlatform:
    """The supported platform for `uname -m`, or ValueError with the plain reason."""
    if machine == "arm64":  # macOS and some BSDs spell aarch64 this way
        machine = "aarch64"
    if machine not in SUPPORTED:
        raise ValueError(UNSUPPORTED_MESSAGE.format(machine=machine))
    return SUPPORTED[machine]
