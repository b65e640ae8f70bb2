"""Console static files, gzip-compressed once in memory when the browser accepts it.

Chart.js alone is 210 KB; gzip makes it ~70 KB, which keeps every page well under 500 KB.
Files are read from the package directory only (the name is checked against what exists).
"""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
import threading
from pathlib import Path

from flask import Blueprint, Response, abort, request

STATIC_DIR = Path(__file__).parent / "static"
COMPRESSIBLE = (".js", ".css", ".svg", ".json", ".map", ".txt", ".md")

bp = Blueprint("console_static", __name__, url_prefix="/console/static")

_cache: dict[str, tuple[bytes, bytes | None, str, float]] = {}
_lock = threading.Lock()


def _load(filename: str) -> tuple[bytes, bytes | None, str]:
    path = (STATIC_DIR / filename).resolve()
    if not path.is_file() or STATIC_DIR.resolve() not in path.parents:
        abort(404)
    mtime = path.stat().st_mtime
    with _lock:
        hit = _cache.get(filename)
        if hit is not None and hit[3] == mtime:
            return hit[0], hit[1], hit[2]
    raw = path.read_bytes()
    packed = gzip.compress(raw, 9, mtime=0) if path.suffix in COMPRESSIBLE else None
    etag = hashlib.sha256(raw).hexdigest()[:24]
    with _lock:
        _cache[filename] = (raw, packed, etag, mtime)
    return raw, packed, etag


@bp.get("/<path:filename>", endpoint="file")
def static_file(filename: str) -> Response:
    raw, packed, etag = _load(filename)
    mimetype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if filename.endswith(".js"):
        mimetype = "text/javascript"
    gz = packed is not None and "gzip" in request.headers.get("Accept-Encoding", "")
    response = Response(packed if gz else raw, mimetype=mimetype)
    if gz:
        response.headers["Content-Encoding"] = "gzip"
    response.headers["Vary"] = "Accept-Encoding"
    response.headers["Cache-Control"] = "public, max-age=300"
    response.set_etag(etag + ("-gz" if gz else ""))
    return response.make_conditional(request)
