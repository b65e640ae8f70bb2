"""What the agent process holds: `edgefleet agent run` serving, scraped and connected over
mqtt:// loads neither cryptography (signatures are checked in a short-lived child process),
click, prometheus_client, ssl, urllib.request/http.client/email, nor psutil; the child check
accepts and refuses as cryptography does; stdlib resource figures that match psutil's; Ed25519
PEM public keys read without `serialization`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys

import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, x25519

from edge_agent.agent import trusted_keys_from_config
from edge_agent.resources import detect_hardware, process_resources, rss_bytes, total_ram_bytes
from edge_agent.signatures import TrustedKey
from edge_agent.validation import RequestError
from model_tools.errors import SignatureError
from model_tools.signing import (
    ED25519_SPKI_PREFIX,
    generate_keypair,
    key_id,
    load_public_key,
    public_key_from_pem,
    save_public_key,
)
from tests.agent_fixtures import (
    ROOT,
    bundle_bytes,
    config_toml,
    dataset,
    install_active,
    make_config,
)
from tests.brokers import free_port

# The modules the long-lived agent process must not load (top-level names, or exact module
# names): what each costs is in bench/agent.py's RSS breakdown and docs/device.md#memory.
AVOIDED = ("psutil", "bcrypt", "cryptography", "click", "prometheus_client", "ssl", "urllib.request",
           "http.client", "email", "hashlib", "_hashlib", "hmac", "statistics")

# `edgefleet agent run --config FILE` as the systemd unit starts it, in a fresh interpreter; a
# thread (socket and json only) predicts, scrapes /metrics, lists the loaded modules and stops
# the agent with SIGTERM. argv: config, HTTP port, one input row.
AGENT_RUN_SCRIPT = r"""
import json, os, signal, socket, sys, threading, time

config, port, row = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
AVOIDED = json.loads(sys.argv[4])

def http(sock, request):
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b" ")[1], body

def probe():
    deadline = time.time() + 120
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            if time.time() > deadline:
                os._exit(3)
            time.sleep(0.05)
    body = json.dumps({"rows": [row]}).encode()
    status, answer = http(sock, b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    mstatus, metrics = http(sock, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in AVOIDED or m in AVOIDED)
    print(json.dumps({"status": int(status), "answer": json.loads(answer), "metrics_status": int(mstatus),
                      "metrics": metrics.decode(), "loaded": loaded}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
sys.argv = ["edgefleet", "agent", "run", "--config", config, "--log-level", "WARNING"]
from edge_agent.launch import main
main()
"""


@pytest.mark.broker
def test_agent_run_serves_scraped_and_connected_without_the_heavy_modules(tmp_path, broker):
    """`edgefleet agent run` over mqtt:// with a verified model, one prediction and one scrape."""
    port = free_port()
    config = make_config(tmp_path, broker, listen=f"127.0.0.1:{port}")
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    path = tmp_path / "agent.toml"
    path.write_text(config_toml(config))
    X, _ = dataset()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", AGENT_RUN_SCRIPT, str(path), str(port), json.dumps([float(v) for v in X[0]]),
         json.dumps(AVOIDED)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["loaded"] == [], f"the agent imported {result['loaded']}; avoid {AVOIDED}"
    # The model was verified at start (with the key from [trust] public_keys_pem, in a child
    # process) and serves; the scrape answered.
    assert result["status"] == 200 and result["answer"]["version"] == "1.0.0"
    assert result["metrics_status"] == 200 and "edgefleet_predictions_total 1.0" in result["metrics"]


CHILD_CHECK_SCRIPT = r"""
import json, sys
from edge_agent.signatures import TrustedKey
key, good, bad, data = (bytes.fromhex(x) for x in sys.argv[1:5])
k = TrustedKey(key)
print(json.dumps({"good": k.verifies(good, data), "bad": k.verifies(bad, data),
                  "other data": k.verifies(good, data + b"x"),
                  "loaded": sorted(m for m in sys.modules if m.startswith("cryptography"))}))
"""


def test_signatures_are_checked_in_a_child_process_like_cryptography_does():
    private, public = generate_keypair()
    data = b'{"name": "demo"}'
    good = private.sign(data)
    bad = bytes([good[0] ^ 1]) + good[1:]
    out = subprocess.run(
        [sys.executable, "-c", CHILD_CHECK_SCRIPT, public.public_bytes_raw().hex(), good.hex(), bad.hex(), data.hex()],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"good": True, "bad": False, "other data": False, "loaded": []}
    # In a process that has cryptography already, the same answers without a child.
    key = TrustedKey(public.public_bytes_raw())
    assert (key.verifies(good, data), key.verifies(bad, data)) == (True, False)
    assert key_id(key) == key_id(public)


def test_metrics_text_is_what_prometheus_client_writes(tmp_path):
    from prometheus_client import generate_latest

    from edge_agent import Agent
    from edge_agent.metrics import render

    config = make_config(tmp_path)
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    agent = Agent(config, link_mode="none").start()
    try:
        X, _ = dataset()
        agent.predict([[float(v) for v in r] for r in X[:3]])
        with pytest.raises(RequestError):
            agent.predict([[1.0]])
        agent.telemetry.total_lat_sum = 12345678.9  # a large value: written with an exponent, as Go does

        def stable(text: str) -> list[str]:  # the process's RSS moves between two reads
            return [line for line in text.splitlines() if not line.startswith("edgefleet_agent_resident_memory_bytes ")]

        ours = render(agent).decode()
        assert stable(ours) == stable(generate_latest(agent.registry).decode())
        assert "edgefleet_predict_latency_seconds_sum 12345.6789" in ours and "edgefleet_predictions_total 3.0" in ours
    finally:
        agent.close()


# ---------------------------------------------------------------- resources


def test_resource_figures_are_psutils():
    assert total_ram_bytes() == psutil.virtual_memory().total
    hw = detect_hardware()
    assert hw.ram_mb == psutil.virtual_memory().total // (1024 * 1024)
    assert hw.cpu_count == os.cpu_count()
    assert not hw.cpu_model.isdigit()  # x86's "model: 17" line is not the CPU model
    # Same source (/proc/self/statm): equal unless the heap moved between the two reads.
    before = psutil.Process().memory_info().rss
    mine = rss_bytes()
    after = psutil.Process().memory_info().rss
    assert min(before, after) - 2**20 <= mine <= max(before, after) + 2**20


def test_process_resources_sample(tmp_path):
    sample = process_resources(tmp_path)()
    assert sample.rss_bytes > 0 and sample.cpu_s > 0
    assert sample.disk_free_bytes == pytest.approx(psutil.disk_usage(str(tmp_path)).free, rel=0.01)
    assert process_resources(tmp_path / "missing")().disk_free_bytes == 0


# ---------------------------------------------------------------- Ed25519 public keys


def _pem(key) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_public_key_from_pem_matches_cryptography_and_keeps_key_ids():
    for _ in range(20):
        private, public = generate_keypair()
        pem = _pem(public)
        ours = public_key_from_pem(pem)
        theirs = serialization.load_pem_public_key(pem)
        assert ours.public_bytes_raw() == theirs.public_bytes_raw() == public.public_bytes_raw()
        # Key ids as they were computed with serialization: sha256 of the raw public bytes.
        raw = theirs.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert key_id(ours) == key_id(private) == hashlib.sha256(raw).hexdigest()[:16]
        assert public_key_from_pem(pem.decode()).public_bytes_raw() == raw
        signature = private.sign(b"manifest")
        ours.verify(signature, b"manifest")


@pytest.mark.parametrize("variant", ["crlf", "indented", "text around", "second block"])
def test_public_key_pem_layouts_cryptography_accepts(variant):
    other = _pem(generate_keypair()[1])
    public = generate_keypair()[1]
    pem = _pem(public)
    data = {
        "crlf": pem.replace(b"\n", b"\r\n"),
        "indented": b"\n".join(b"    " + line for line in pem.split(b"\n")),
        "text around": b"release key, 2025\n" + pem + b"(end)\n",
        "second block": pem + other,  # the first PUBLIC KEY block is read
    }[variant]
    assert serialization.load_pem_public_key(data).public_bytes_raw() == public.public_bytes_raw()
    assert public_key_from_pem(data).public_bytes_raw() == public.public_bytes_raw()


def test_public_key_from_pem_refuses_everything_else():
    private, public = generate_keypair()
    pem = _pem(public)
    # x25519 has Ed25519's 44-byte length and another OID: the prefix check must catch it.
    for other in (x25519.X25519PrivateKey.generate().public_key(), ed448.Ed448PrivateKey.generate().public_key(),
                  ec.generate_private_key(ec.SECP256R1()).public_key()):
        with pytest.raises(SignatureError, match="not an Ed25519 public key"):
            public_key_from_pem(_pem(other))
    der = ED25519_SPKI_PREFIX + public.public_bytes_raw()

    def block(payload: bytes) -> bytes:
        return b"-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(payload) + b"\n-----END PUBLIC KEY-----\n"

    assert public_key_from_pem(block(der)).public_bytes_raw() == public.public_bytes_raw()
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    refused = [
        (private_pem, "no '-----BEGIN PUBLIC KEY-----'"),
        (b"", "no '-----BEGIN PUBLIC KEY-----'"),
        (pem.split(b"-----END")[0], "no '-----BEGIN PUBLIC KEY-----'"),
        (pem.replace(b"MCowBQYDK2VwAyEA", b"MCowBQYDK2VwAyE*"), "not valid base64"),
        (block(der[:-1]), "this one is 43 bytes"),
        (block(der + b"\0"), "this one is 45 bytes"),
    ]
    for data, message in refused:
        with pytest.raises(SignatureError, match=message):
            public_key_from_pem(data)


def test_load_public_key_errors_name_the_file(tmp_path):
    public = generate_keypair()[1]
    path = save_public_key(public, tmp_path / "k.pub")
    assert key_id(load_public_key(path)) == key_id(public)
    with pytest.raises(SignatureError, match="cannot read public key .*missing.pub"):
        load_public_key(tmp_path / "missing.pub")
    (tmp_path / "x.pub").write_bytes(_pem(x25519.X25519PrivateKey.generate().public_key()))
    with pytest.raises(SignatureError, match="x.pub is not a usable public key: not an Ed25519 public key"):
        load_public_key(tmp_path / "x.pub")


def test_config_pem_that_is_not_ed25519_is_refused_by_index(tmp_path):
    config = make_config(tmp_path)
    assert len(trusted_keys_from_config(config)) == 1
    config.trust.public_keys_pem.append(_pem(x25519.X25519PrivateKey.generate().public_key()).decode())
    with pytest.raises(ValueError, match=r"\[trust\] public_keys_pem\[1\]: not an Ed25519 public key"):
        trusted_keys_from_config(config)
