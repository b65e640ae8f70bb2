"""The web console: one blueprint per area, server-rendered pages whose small JS modules poll
JSON endpoints, every asset served by the fleet server itself (factory LANs have no internet).

`fleet_server.console.site.init_console(app)` registers the blueprints, the gzip static route and
the security headers; this package module holds only the headers, so page modules can import it.
"""

from __future__ import annotations

# script-src 'self' only: no inline scripts or handlers anywhere; Chart.js styles the canvas from
# JS (CSSOM), which CSP allows without 'unsafe-inline' styles.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}

__all__ = ["CSP", "SECURITY_HEADERS"]
