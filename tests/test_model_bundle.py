"""Bundle format and verification: tampering, unsafe zips, signatures, install."""

from __future__ import annotations

import io
import stat
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from model_tools.bundle import (
    BundleLimits,
    SignatureError,
    TamperedBundleError,
    UnsafeBundleError,
    extract_bundle,
    load_extracted,
    read_bundle,
)
from model_tools.errors import BundleError
from model_tools.pipeline import build_bundle
from model_tools.session import run_model
from model_tools.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
)
from tests.model_fixtures import classification_data


@pytest.fixture(scope="module")
def keys():
    return generate_keypair()


@pytest.fixture(scope="module")
def bundle_bytes(keys):
    X, y = classification_data(n=600)
    est = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    return build_bundle(est, (X, y), name="lr", version="1.0", sign_key=keys[0]).bundle_bytes


def members_of(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def rezip(members, *, symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members:
                info = zipfile.ZipInfo(name)
                mode = stat.S_IFLNK | 0o777 if name == symlink else stat.S_IFREG | 0o644
                info.external_attr = mode << 16
                zf.writestr(info, data)
    return buf.getvalue()


def flip(data: bytes, at: int | None = None) -> bytes:
    at = len(data) // 2 if at is None else at
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_roundtrip_verifies(bundle_bytes, keys):
    bundle = read_bundle(bundle_bytes, [keys[1]])
    assert bundle.key_id == key_id(keys[1])
    assert bundle.manifest.name == "lr" and bundle.version == "1.0"
    assert set(bundle.manifest.files) == {"model.onnx", "golden.npz"}


@pytest.mark.parametrize(
    ("member", "error", "message"),
    [
        ("model.onnx", TamperedBundleError, "sha256 of model.onnx"),
        ("golden.npz", TamperedBundleError, "sha256 of golden.npz"),
        ("manifest.json", SignatureError, "does not verify"),
        ("manifest.sig", SignatureError, "does not verify"),
    ],
)
def test_flipped_byte_in_any_member_is_refused(bundle_bytes, keys, member, error, message):
    members = [(n, flip(d) if n == member else d) for n, d in members_of(bundle_bytes)]
    with pytest.raises(error, match=message):
        read_bundle(rezip(members), [keys[1]])


@pytest.mark.parametrize("member", ["model.onnx", "golden.npz", "manifest.json"])
def test_flipped_byte_in_the_file_is_refused(bundle_bytes, keys, member):
    # A raw flip inside a member's compressed data, as a bad disk or network would do it.
    with zipfile.ZipFile(io.BytesIO(bundle_bytes)) as zf:
        info = zf.getinfo(member)
    name_len, extra_len = struct.unpack(
        "<HH", bundle_bytes[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    with pytest.raises(
        BundleError, match=f"'{member}' is corrupt|sha256 of {member}|does not verify"
    ):
        read_bundle(flip(bundle_bytes, start + info.compress_size // 2), [keys[1]])


def test_edited_manifest_is_refused(bundle_bytes, keys):
    members = [
        (n, d.replace(b'"version": "1.0"', b'"version": "9.9"') if n == "manifest.json" else d)
        for n, d in members_of(bundle_bytes)
    ]
    assert members != members_of(bundle_bytes)
    with pytest.raises(SignatureError, match="manifest was changed after signing"):
        read_bundle(rezip(members), [keys[1]])


def test_signature_from_another_key_is_refused(bundle_bytes):
    _, other = generate_keypair()
    with pytest.raises(SignatureError, match=f"any trusted key \\({key_id(other)}\\)"):
        read_bundle(bundle_bytes, [other])


def test_any_trusted_key_may_verify(bundle_bytes, keys):
    _, other = generate_keypair()
    assert read_bundle(bundle_bytes, [other, keys[1]]).key_id == key_id(keys[1])


def test_no_trusted_keys_is_refused(bundle_bytes):
    with pytest.raises(SignatureError, match="no trusted public key"):
        read_bundle(bundle_bytes, [])


def test_unsigned_bundle_is_refused_unless_allowed(keys):
    X, y = classification_data(n=300)
    est = LogisticRegression().fit(X, y)
    data = build_bundle(est, (X, y), name="u", version="1", quantize="float32").bundle_bytes
    with pytest.raises(SignatureError, match="not signed.*--sign-key"):
        read_bundle(data, [keys[1]])
    assert read_bundle(data, require_signature=False).key_id is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil.txt", "contains '..'"),
        ("/etc/evil", "absolute path"),
        ("a/../../x", "contains '..'"),
    ],
)
def test_zip_slip_is_refused(bundle_bytes, keys, name, message):
    with pytest.raises(UnsafeBundleError, match=message):
        read_bundle(rezip([*members_of(bundle_bytes), (name, b"x")]), [keys[1]])


def test_symlink_member_is_refused(bundle_bytes, keys):
    members = [*members_of(bundle_bytes), ("link", b"/etc/passwd")]
    with pytest.raises(UnsafeBundleError, match="symbolic link"):
        read_bundle(rezip(members, symlink="link"), [keys[1]])


def test_duplicate_member_is_refused(bundle_bytes, keys):
    members = members_of(bundle_bytes)
    model = next(d for n, d in members if n == "model.onnx")
    with pytest.raises(UnsafeBundleError, match="'model.onnx' twice"):
        read_bundle(rezip([*members, ("model.onnx", model)]), [keys[1]])


def test_extra_member_is_refused(bundle_bytes, keys):
    with pytest.raises(TamperedBundleError, match="unexpected member"):
        read_bundle(rezip([*members_of(bundle_bytes), ("notes.txt", b"hi")]), [keys[1]])


def test_missing_member_is_refused(bundle_bytes, keys):
    members = [(n, d) for n, d in members_of(bundle_bytes) if n != "golden.npz"]
    with pytest.raises(TamperedBundleError, match="missing member 'golden.npz'"):
        read_bundle(rezip(members), [keys[1]])


@pytest.mark.parametrize("keep", [10, 200, -30])
def test_truncated_file_is_refused(bundle_bytes, keys, keep):
    with pytest.raises(UnsafeBundleError, match="not a zip file or is truncated"):
        read_bundle(bundle_bytes[:keep], [keys[1]])


def test_not_a_zip_is_refused(tmp_path, keys):
    path = tmp_path / "x.efb"
    path.write_text("hello")
    with pytest.raises(UnsafeBundleError, match="not a zip file"):
        read_bundle(path, [keys[1]])


def test_oversize_member_is_refused(bundle_bytes, keys):
    with pytest.raises(UnsafeBundleError, match="over the 100-byte limit"):
        read_bundle(bundle_bytes, [keys[1]], limits=BundleLimits(max_model_bytes=100))


def test_zip_bomb_is_refused(keys):
    # 10 kB of zeros deflate to a few bytes: the limit applies to the inflated size.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.onnx", b"\0" * 10_000)
    with pytest.raises(UnsafeBundleError, match="limit"):
        read_bundle(buf.getvalue(), [keys[1]], limits=BundleLimits(max_model_bytes=1000))


def test_too_many_members_is_refused(keys):
    members = [(f"m{i}", b"") for i in range(20)]
    with pytest.raises(UnsafeBundleError, match="20 members"):
        read_bundle(rezip(members), [keys[1]])


def test_golden_set_has_no_pickles_and_reproduces(bundle_bytes, keys):
    bundle = read_bundle(bundle_bytes, [keys[1]])
    golden_npz = dict(members_of(bundle_bytes))["golden.npz"]
    with np.load(io.BytesIO(golden_npz), allow_pickle=False) as npz:
        names = set(npz.files)
    assert names == {"input:X", "output:label", "output:probabilities"}
    assert bundle.golden["input:X"].shape == (32, 8)
    got = run_model(bundle.model_bytes, bundle.golden_inputs)
    tol = bundle.manifest.golden_tolerance
    for name, expected in bundle.golden_outputs.items():
        np.testing.assert_allclose(got[name], expected, atol=tol.atol, rtol=tol.rtol)


def test_extract_then_load_extracted(bundle_bytes, keys, tmp_path):
    src = tmp_path / "m.efb"
    src.write_bytes(bundle_bytes)
    dest = tmp_path / "versions" / "1.0"
    bundle = extract_bundle(src, dest, [keys[1]])
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["golden.npz", "manifest.json", "manifest.sig", "model.onnx"]
    )
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    again = load_extracted(dest, [keys[1]])
    assert again.model_bytes == bundle.model_bytes
    with pytest.raises(BundleError, match="already exists"):
        extract_bundle(src, dest, [keys[1]])
    (dest / "model.onnx").write_bytes(flip((dest / "model.onnx").read_bytes()))
    with pytest.raises(TamperedBundleError, match="sha256 of model.onnx"):
        load_extracted(dest, [keys[1]])


def test_extract_refuses_before_writing(bundle_bytes, tmp_path):
    _, other = generate_keypair()
    dest = tmp_path / "v"
    with pytest.raises(SignatureError):
        extract_bundle(bundle_bytes, dest, [other])
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_keys_roundtrip_and_private_key_mode(tmp_path):
    private, public = generate_keypair()
    save_private_key(private, tmp_path / "k.key")
    save_public_key(public, tmp_path / "k.pub")
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert key_id(load_public_key(tmp_path / "k.pub")) == key_id(public)
    assert key_id(load_private_key(tmp_path / "k.key").public_key()) == key_id(public)
    assert len(key_id(public)) == 16
    with pytest.raises(SignatureError, match="not an Ed25519 private key|cannot read private key"):
        load_private_key(tmp_path / "k.pub")


def test_bundle_reader_imports_only_light_dependencies():
    code = (
        "import sys, model_tools, model_tools.bundle, model_tools.signing, model_tools.feeds\n"
        "heavy = [m for m in ('sklearn', 'skl2onnx', 'onnx', 'skops', 'scipy', 'onnxruntime')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
