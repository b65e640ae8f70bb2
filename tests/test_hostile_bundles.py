"""Hostile bundles: zip bombs (refused before they inflate), zip-slip, links, huge manifests, wrong
hashes, random damage, and signatures by a revoked key — on the server's upload (real HTTP) and
on a device's update (real agent, real broker)."""

from __future__ import annotations

import contextlib
import io
import random
import stat
import struct
import tracemalloc
import zipfile

import pytest

from model_tools.bundle import MANIFEST, SIGNATURE, BundleError, read_bundle
from model_tools.errors import SignatureError, TamperedBundleError, UnsafeBundleError
from model_tools.signing import key_id
from tests.agent_fixtures import (
    bundle_bytes,
    bundle_server_fixture,  # noqa: F401 - fixture
    collector_fixture,  # noqa: F401 - fixture
    install_active,
    keypair,
    make_config,
    publish_desired,
)
from tests.brokers import wait_until

pytest_plugins = ["tests.server_fixtures"]

MiB = 1024 * 1024


def members_of(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rezip(members: dict[str, bytes], extra: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return buf.getvalue()


def bomb(valid: bytes, model_bytes: int) -> bytes:
    """The valid bundle's signed manifest with a model.onnx of zeros (~1000:1 compression)."""
    m = members_of(valid)
    m["model.onnx"] = bytes(model_bytes)
    return rezip(m)


def lie_about_size(data: bytes, member: str, size: int) -> bytes:
    """Rewrite a member's uncompressed size in the central directory (what zipfile believes)."""
    name = member.encode()
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        n = struct.unpack("<H", data[pos + 28:pos + 30])[0]
        if data[pos + 46:pos + 46 + n] == name:
            return data[:pos + 24] + struct.pack("<I", size) + data[pos + 28:]
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(f"no central directory entry for {member}")


@pytest.fixture(scope="module")
def valid():
    return bundle_bytes("lr", "1.0.0")


TRUSTED = [keypair()[1]]


def peak_mib(fn) -> float:
    tracemalloc.start()
    with contextlib.suppress(BundleError):
        fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / MiB


def test_zip_bomb_by_an_untrusted_signer_is_refused_before_inflating(valid):
    """64 MiB of zeros in 64 KiB, within the size limits: the signature is checked on the small
    members first, so the model is never inflated."""
    data = bomb(bundle_bytes("lr", "1.0.0", signer="mallory"), 64 * MiB)
    assert len(data) < 200 * 1024
    with pytest.raises(SignatureError):
        read_bundle(data, TRUSTED)
    assert peak_mib(lambda: read_bundle(data, TRUSTED)) < 4
    unsigned = members_of(data)
    unsigned[SIGNATURE] = b""
    assert peak_mib(lambda: read_bundle(rezip(unsigned), TRUSTED)) < 4


def test_zip_bomb_with_a_lying_header_inflates_no_more_than_it_claims(valid):
    data = lie_about_size(bomb(valid, 64 * MiB), "model.onnx", 1000)
    with pytest.raises(TamperedBundleError, match="corrupt|sha256"):
        read_bundle(data, TRUSTED)
    assert peak_mib(lambda: read_bundle(data, TRUSTED)) < 4


def test_a_header_claiming_gigabytes_is_refused_from_the_header(valid):
    data = lie_about_size(valid, "model.onnx", 0xFFFF_FFF0)
    with pytest.raises(UnsafeBundleError, match="limit"):
        read_bundle(data, TRUSTED)


@pytest.mark.parametrize("name", ["../evil.onnx", "/etc/passwd", "a/../../b", "C:\\x", "..\\..\\x"])
def test_zip_slip_names_are_refused(valid, name):
    with pytest.raises(UnsafeBundleError, match="zip-slip|absolute"):
        read_bundle(rezip(members_of(valid), [(zipfile.ZipInfo(name), b"x")]), TRUSTED)


def test_symlinks_are_refused(valid):
    m = members_of(valid)
    link = zipfile.ZipInfo("model.onnx")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    del m["model.onnx"]
    with pytest.raises(UnsafeBundleError, match="symbolic link"):
        read_bundle(rezip(m, [(link, b"/etc/passwd")]), TRUSTED)


def test_huge_manifest_is_refused_before_parsing(valid):
    m = members_of(valid)
    m[MANIFEST] = b'{"name": "' + b"x" * (2 * MiB) + b'"}'
    with pytest.raises(UnsafeBundleError, match="manifest.json"):
        read_bundle(rezip(m), TRUSTED)


def test_manifest_with_a_wrong_hash_is_refused(valid):
    """A re-signed manifest whose sha256 of model.onnx does not match the member."""
    from model_tools.bundle import write_bundle

    b = read_bundle(valid, TRUSTED)
    other = write_bundle(None, b.manifest, b.model_bytes + b"\x00", b.golden, keypair()[0])
    m = members_of(other)
    m["model.onnx"] = b.model_bytes  # the original model under the manifest that hashes another
    with pytest.raises(TamperedBundleError, match="sha256 of model.onnx"):
        read_bundle(rezip(m), TRUSTED)


def test_random_damage_is_always_a_bundle_error(valid):
    """Byte flips anywhere (headers, deflate streams, signature): always a BundleError, never a
    zlib.error or ValueError that a caller would not expect."""
    rng = random.Random(3)
    for _ in range(400):
        b = bytearray(valid)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        with contextlib.suppress(BundleError):
            read_bundle(bytes(b), TRUSTED)
    for cut in range(0, len(valid), max(1, len(valid) // 200)):
        with pytest.raises(BundleError):
            read_bundle(valid[:cut], TRUSTED)


def test_a_revoked_key_is_refused_even_when_still_trusted(valid):
    kid = key_id(keypair()[1])
    with pytest.raises(SignatureError, match=f"key {kid}, which is revoked"):
        read_bundle(valid, TRUSTED, revoked_key_ids={kid})


# ------------------------------------------------------------------ through the server


@pytest.mark.broker
def test_server_refuses_uploads_signed_by_a_revoked_key(fleet, tmp_path):
    from click.testing import CliRunner

    from fleet_server.cli import server
    from fleet_server.registry import trust_key
    from tests.agent_fixtures import public_pem

    kid = trust_key(fleet.svc, public_pem(), "release")
    assert fleet.api("post", "/api/v1/models", data=bundle_bytes("lr", "1.0.0")).status_code == 201
    result = CliRunner().invoke(server, ["revoke-key", "--data-dir", str(fleet.config.data_dir), kid,
                                         "--reason", "leaked"])
    assert result.exit_code == 0, result.output
    r = fleet.api("post", "/api/v1/models", data=bundle_bytes("lr", "1.1.0"))
    assert r.status_code == 422 and f"key {kid}, which is revoked" in r.json()["error"]
    # ...and it cannot be trusted again.
    r = fleet.api("post", "/api/v1/keys", json={"pem": public_pem()})
    assert r.status_code == 409 and "revoked" in r.json()["error"]
    audit = fleet.svc.storage.list_audit(limit=20)
    assert any(a["outcome"] == "failed" and "revoked" in str(a["detail"]) for a in audit), audit
    bad = CliRunner().invoke(server, ["revoke-key", "--data-dir", str(fleet.config.data_dir), "../etc"])
    assert bad.exit_code != 0 and "not a key id" in bad.output


# ------------------------------------------------------------------ through a device


@pytest.mark.broker
def test_device_with_revoked_key_ids_keeps_its_model(tmp_path, broker, collector, bundle_server):
    """The key is still in [trust] public_keys_pem, and revoked: Verify refuses, the model stays.
    (A replayed older signed version is refused as a downgrade: test_agent_update.py.)"""
    from edge_agent.service import AgentService

    kid = key_id(keypair()[1])
    config = make_config(tmp_path, broker)
    config.server.url = bundle_server.base  # the device's credentials go to this origin only
    config.trust.revoked_key_ids = [kid]
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    service = AgentService(config).start()
    try:
        publish_desired(broker, config.device_id,
                        bundle_server.desired(config.device_id, "new.efb", bundle_bytes("lr", "1.1.0")))
        wait_until(lambda: collector.outcomes(), 30, message="update outcome")
        assert collector.outcomes() == ["failure"]
        reasons = [e.reason or "" for e in collector.events()]
        assert any(f"key {kid}, which is revoked" in r for r in reasons), reasons
        assert service.agent.active_version() == "1.0.0"
    finally:
        service.stop()
