"""Wheelhouse API: the agent's offline wheelhouses and installer, for devices (HTTP Basic) and
people with a token; files with Range and ETag like bundle downloads."""

from __future__ import annotations

from importlib import resources

from flask import Blueprint, Response, jsonify, send_file

from fleet_server.api.common import ApiError, basic_device, bearer_identity, refused, services
from fleet_server.device_install import WHEELHOUSE_NAME, wheelhouse_dir

bp = Blueprint("wheelhouse", __name__, url_prefix="/api/v1")

CHECKSUMS = "SHA256SUMS"


def _authenticated() -> Response | None:
    """None for a device or a token holder, else the 401 answer (as for bundle downloads)."""
    if basic_device() is not None or bearer_identity() is not None:
        return None
    message = "authenticate as a device (HTTP Basic) or with an API token"
    refused(401, f"{message} (unknown, wrong or revoked credentials)")
    response = jsonify(error=message)
    response.headers["WWW-Authenticate"] = 'Basic realm="edgefleet"'
    response.status_code = 401
    return response


def _listing(name: str) -> dict[str, str]:
    """file name -> sha256 from a wheelhouse's SHA256SUMS ({} when there is none)."""
    path = wheelhouse_dir(services().config) / name / CHECKSUMS
    if not WHEELHOUSE_NAME.match(name) or not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        digest, _, file = line.partition("  ")
        if file.strip():
            out[file.strip()] = digest
    return out


@bp.get("/wheelhouse")
def list_wheelhouses():
    if (denied := _authenticated()) is not None:
        return denied
    root = wheelhouse_dir(services().config)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and _listing(p.name)) if root.is_dir() else []
    return jsonify(wheelhouses=[{"name": n, "files": sorted(_listing(n))} for n in names])


@bp.get("/wheelhouse/install.py")
def installer():
    if (denied := _authenticated()) is not None:
        return denied
    text = resources.files("edge_agent.release").joinpath("install.py").read_text()
    return Response(text, mimetype="text/x-python")


@bp.get("/wheelhouse/<name>/<filename>")
def wheelhouse_file(name: str, filename: str):
    if (denied := _authenticated()) is not None:
        return denied
    listed = _listing(name)
    if not listed:
        raise ApiError(f"no wheelhouse {name[:40]!r} on this server: build it with `edgefleet release build "
                       f"--out {wheelhouse_dir(services().config).parent}` (machines: aarch64, x86_64)", 404)
    # Only files SHA256SUMS lists (and the list itself) are served: no path from the request
    # reaches the file system otherwise.
    if filename != CHECKSUMS and filename not in listed:
        raise ApiError(f"{filename[:80]!r} is not in wheelhouse {name}", 404)
    path = wheelhouse_dir(services().config) / name / filename
    return send_file(path, mimetype="text/plain" if filename == CHECKSUMS else "application/zip",
                     as_attachment=filename != CHECKSUMS, download_name=filename,
                     etag=listed.get(filename, False) or True, conditional=True, max_age=0)
