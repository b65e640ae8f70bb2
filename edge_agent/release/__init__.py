"""Device releases: the edgefleet wheel, offline wheelhouses per device platform, the installer."""

from edge_agent.release.platforms import (
    SUPPORTED,
    UNSUPPORTED_MESSAGE,
    device_platform,
    wheelhouse_name,
)
from edge_agent.release.wheelhouse import (
    CHECKSUMS,
    ReleaseError,
    Wheelhouse,
    build_release,
    build_wheelhouse,
    verify_checksums,
)

__all__ = [
    "CHECKSUMS",
    "SUPPORTED",
    "UNSUPPORTED_MESSAGE",
    "ReleaseError",
    "Wheelhouse",
    "build_release",
    "build_wheelhouse",
    "device_platform",
    "verify_checksums",
    "wheelhouse_name",
]
