"""TLS for the fleet server: a small CA and server certificates (`edgefleet server tls-init`), and
the HTTPS server for the API, console and bundle downloads.

The CA is the one file devices trust (`ca.pem`); the server certificate (ECDSA P-256, SAN for
localhost, 127.0.0.1, ::1 and the given host names) serves both the broker's MQTT-over-TLS
listener and HTTPS. Private keys are written 0600 and never leave the data dir.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a publicly trusted certificate; renew yearly


class TlsError(ValueError):
    """TLS material that is missing or cannot be used; the message says what to do."""


@dataclass(frozen=True)
class TlsPaths:
    """Where `tls-init` writes, under `DATA_DIR/tls/`."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"  # what devices trust: copy it next to their agent.toml

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"


@dataclass
class TlsInitResult:
    paths: TlsPaths
    names: list[str]
    ca_created: bool
    not_after: datetime.datetime
    ca_fingerprint: str  # SHA-256 of the CA certificate, for checking a copy on a device


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as colon-separated hex (what `openssl x509 -fingerprint -sha256` prints)."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def generate_ca(common_name: str = "edgefleet CA", days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def check_hostname(name: str) -> str:
    """A host name or IP address fit for a certificate; raises TlsError otherwise."""
    name = name.strip().strip("[]").lower()
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    ok = bool(name) and len(name) <= 253 and all(
        (i == 0 and label == "*")
        or (0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-"
            and all(c.isascii() and (c.isalnum() or c == "-") for c in label))
        for i, label in enumerate(labels)
    )
    if not ok:
        raise TlsError(f"{name!r} is not a host name or IP address (e.g. fleet.example.com or 192.168.1.10)")
    return name.rstrip(".")


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[str], days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate for exactly `names` (DNS names or IP addresses), signed by the CA."""
    if not names:
        raise TlsError("a server certificate needs at least one host name")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _load_ca(paths: TlsPaths) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise TlsError(f"cannot read the CA in {paths.dir} ({exc}); run tls-init with --new-ca to replace it") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{paths.ca_key} is not an EC key; run tls-init with --new-ca to replace it")
    return key, cert


def _previous_names(path: Path) -> list[str]:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return [n for n in names if n not in LOOPBACK_NAMES]


def init_tls(
    data_dir: str | Path,
    hostnames: Iterable[str] = (),
    *,
    days: int = SERVER_DAYS,
    ca_days: int = CA_DAYS,
    new_ca: bool = False,
) -> TlsInitResult:
    """Create the CA (unless one exists and `new_ca` is false) and (re)issue the server certificate.

    Re-running it renews the server certificate under the same CA (keeping its host names when
    none are given), so devices keep trusting the server; `new_ca` replaces the CA, after which every device needs the new `ca.pem`.
    """
    if days <= 0 or ca_days <= 0:
        raise TlsError("--days and --ca-days must be positive")
    paths = TlsPaths(Path(data_dir) / "tls")
    paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    given = [check_hostname(h) for h in hostnames]
    if not given and paths.server_cert.exists():
        given = _previous_names(paths.server_cert)  # a renewal keeps the names it had
    names = list(dict.fromkeys([*given, *LOOPBACK_NAMES]))  # the first name becomes the subject CN
    ca_created = new_ca or not (paths.ca_key.exists() and paths.ca_cert.exists())
    if ca_created:
        ca_key, ca_cert = generate_ca(days=ca_days)
        _write_private(paths.ca_key, _key_pem(ca_key))
        _write_public(paths.ca_cert, cert_pem(ca_cert))
    else:
        ca_key, ca_cert = _load_ca(paths)
        if ca_cert.not_valid_after_utc <= _now() + datetime.timedelta(days=1):
            raise TlsError(f"the CA in {paths.ca_cert} has expired; run tls-init with --new-ca")
    key, cert = issue_server_certificate(ca_key, ca_cert, names, days)
    # Key first: a reader never pairs a new certificate with the old key.
    _write_private(paths.server_key, _key_pem(key))
    _write_public(paths.server_cert, cert_pem(cert))
    return TlsInitResult(paths, names, ca_created, cert.not_valid_after_utc, fingerprint(ca_cert))


# ------------------------------------------------------------------ HTTPS server


class HttpsServer:
    """The WSGI app over HTTPS (cheroot, whose TLS adapter uses Python's `ssl`; waitress has none).

    TLS 1.2 or newer, keep-alive, a fixed pool of worker threads. `start()` binds at once, so
    a busy port fails in the caller; `port` is the bound port (0 picks a free one).
    """

    def __init__(self, app: Callable[..., Any], host: str, port: int, cert_file: str | Path,
                 key_file: str | Path, threads: int = 8) -> None:
        import ssl

        from cheroot import wsgi
        from cheroot.ssl.builtin import BuiltinSSLAdapter

        from fleet_server.body_gate import MAX_REQUEST_BODY_BYTES

        for path in (cert_file, key_file):
            if not Path(path).is_file():
                raise TlsError(f"TLS file {path} is missing; run 'edgefleet server tls-init' or fix the path")
        adapter = BuiltinSSLAdapter(str(cert_file), str(key_file))
        adapter.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server = wsgi.Server((host, port), app, numthreads=threads, server_name="edgefleet",
                                  shutdown_timeout=5)
        self.server.ssl_adapter = adapter
        # cheroot streams bodies to the app, which checks credentials and each route's limit
        # before reading; this caps what any request may send at all.
        self.server.max_request_body_size = MAX_REQUEST_BODY_BYTES
        self.server.prepare()  # binds and listens
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.bind_addr[1])

    def start(self) -> HttpsServer:
        self._thread = threading.Thread(target=self.server.serve, name="https", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        if self._thread is not None:
            self._thread.join(10)
