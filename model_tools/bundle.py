"""The `.efb` bundle: a zip of model.onnx, manifest.json, golden.npz and manifest.sig.

Devices import this module: it needs only stdlib, numpy, msgspec and cryptography.
Reading is defensive (zip-slip, links, duplicates, bombs, truncation) because a bundle arrives
over the network; every member is hashed against the signed manifest before it is trusted.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from model_tools.digest import sha256_hex as _sha256_hex
from model_tools.errors import (
    BundleError,
    SignatureError,
    TamperedBundleError,
    UnsafeBundleError,
)
from model_tools.feeds import feeds_from_columns
from model_tools.manifest import Manifest, ManifestError, decode_manifest, encode_manifest
from model_tools.signing import key_id as _key_id
from model_tools.signing import sign, verify_signature

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "GOLDEN",
    "MANIFEST",
    "MODEL",
    "SIGNATURE",
    "Bundle",
    "BundleError",
    "BundleLimits",
    "SignatureError",
    "TamperedBundleError",
    "UnsafeBundleError",
    "extract_bundle",
    "golden_from_bytes",
    "golden_to_bytes",
    "load_extracted",
    "read_bundle",
    "sha256_hex",
    "write_bundle",
]

MODEL = "model.onnx"
MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
SIGNATURE = "manifest.sig"
MEMBERS = (MANIFEST, SIGNATURE, MODEL, GOLDEN)
HASHED_MEMBERS = (MODEL, GOLDEN)  # manifest.json is covered by the signature instead

MiB = 1024 * 1024
# A fixed zip timestamp makes a bundle's bytes depend on its content only.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class BundleLimits:
    """Size limits applied before anything is decompressed into memory or onto disk."""

    max_model_bytes: int = 256 * MiB
    max_manifest_bytes: int = 1 * MiB
    max_golden_bytes: int = 16 * MiB
    max_signature_bytes: int = 4096
    max_total_bytes: int = 300 * MiB
    max_members: int = 8

    def for_member(self, name: str) -> int:
        return {
            MODEL: self.max_model_bytes,
            MANIFEST: self.max_manifest_bytes,
            GOLDEN: self.max_golden_bytes,
            SIGNATURE: self.max_signature_bytes,
        }.get(name, self.max_manifest_bytes)


@dataclass
class Bundle:
    """A verified bundle in memory."""

    manifest: Manifest
    manifest_bytes: bytes
    model_bytes: bytes
    golden: dict[str, np.ndarray]
    signature: bytes
    key_id: str | None = None
    members: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def golden_inputs(self) -> dict[str, np.ndarray]:
        """Golden feeds by ONNX input name (string inputs as object arrays, ready for ORT)."""
        out = {}
        for key, value in self.golden.items():
            if key.startswith("input:"):
                out[key[len("input:") :]] = (
                    value.astype(object) if value.dtype.kind == "U" else value
                )
        return out

    @property
    def golden_outputs(self) -> dict[str, np.ndarray]:
        """Expected outputs of the bundled model on the golden inputs, by ONNX output name."""
        return {k[len("output:") :]: v for k, v in self.golden.items() if k.startswith("output:")}

    def feeds(self, columns: list[np.ndarray]) -> dict[str, np.ndarray]:
        """ORT feeds for one array per feature, per the manifest's onnx_inputs."""
        return feeds_from_columns(self.manifest.onnx_inputs, columns)


def sha256_hex(data: bytes) -> str:
    return _sha256_hex(data)


def golden_to_bytes(golden: Mapping[str, np.ndarray]) -> bytes:
    """Serialize the golden arrays as .npz without pickles (strings become numpy unicode)."""
    arrays = {}
    for name, value in golden.items():
        arr = np.asarray(value)
        if arr.dtype == object:
            arr = arr.astype(str)
        arrays[name] = arr
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def golden_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Read golden.npz, refusing pickled objects."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise TamperedBundleError(f"golden.npz is unreadable ({exc}); rebuild the bundle") from exc


def write_bundle(
    out_path: str | os.PathLike[str] | None,
    manifest: Manifest,
    model_bytes: bytes,
    golden: Mapping[str, np.ndarray],
    private_key: Ed25519PrivateKey | None,
) -> bytes | Path:
    """Hash the members into `manifest.files`, sign manifest.json, and write the zip.

    Returns the bundle bytes when `out_path` is None, else the written path. The manifest's
    `files` field is replaced (so callers need not fill it). Unsigned bundles get an empty
    manifest.sig, which readers refuse unless told not to require a signature.
    """
    golden_bytes = golden_to_bytes(golden)
    manifest = msgspec.structs.replace(
        manifest, files={MODEL: sha256_hex(model_bytes), GOLDEN: sha256_hex(golden_bytes)}
    )
    manifest_bytes = encode_manifest(manifest)
    signature = sign(private_key, manifest_bytes) if private_key is not None else b""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in (
            (MANIFEST, manifest_bytes),
            (SIGNATURE, signature),
            (MODEL, model_bytes),
            (GOLDEN, golden_bytes),
        ):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, data)
    data = buf.getvalue()
    if out_path is None:
        return data
    path = Path(out_path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _check_member_name(info: zipfile.ZipInfo) -> None:
    name = info.filename
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
        raise UnsafeBundleError(
            f"bundle member {name!r} has an absolute path: refusing to unpack (zip-slip); "
            "only use bundles built by 'edgefleet model convert'"
        )
    if ".." in PurePosixPath(name).parts:
        raise UnsafeBundleError(
            f"bundle member {name!r} contains '..': refusing to unpack (zip-slip); "
            "only use bundles built by 'edgefleet model convert'"
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UnsafeBundleError(
            f"bundle member {name!r} is a symbolic link: links are never unpacked; "
            "rebuild the bundle with 'edgefleet model convert'"
        )
    # Zips written by other tools may carry permission bits only (no file type): accept those.
    if info.is_dir() or (stat.S_IFMT(mode) and not stat.S_ISREG(mode)):
        raise UnsafeBundleError(f"bundle member {name!r} is not a regular file: refusing it")


def _read_zip_members(
    source: str | os.PathLike[str] | bytes,
    limits: BundleLimits,
    check_small: Callable[[Mapping[str, bytes]], None] | None = None,
) -> dict[str, bytes]:
    """Open the zip defensively and return its members' bytes.

    manifest.json and manifest.sig are read first and handed to `check_small` (the signature
    check), so that a bundle nobody trusted signed is refused before its large members are
    inflated: a zip bomb within the size limits still costs no more than the manifest.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        fileobj: io.BufferedIOBase | str | os.PathLike[str] = io.BytesIO(bytes(source))
        label = "bundle"
    else:
        fileobj = source
        label = str(source)
        if not os.path.isfile(source):
            raise BundleError(f"{label}: no such bundle file")
    try:
        zf = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as exc:
        raise UnsafeBundleError(
            f"{label} is not a zip file or is truncated ({exc}); download it again"
        ) from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise UnsafeBundleError(
                f"{label} has {len(infos)} members (at most {limits.max_members} allowed): "
                "not an edgefleet bundle"
            )
        seen: set[str] = set()
        declared_total = 0
        for info in infos:
            _check_member_name(info)
            if info.filename in seen:
                raise UnsafeBundleError(
                    f"{label} contains member {info.filename!r} twice: refusing an ambiguous bundle"
                )
            seen.add(info.filename)
            limit = limits.for_member(info.filename)
            if info.file_size > limit:
                raise UnsafeBundleError(
                    f"bundle member {info.filename!r} is {info.file_size} bytes, over the "
                    f"{limit}-byte limit; raise BundleLimits if the model really is that big"
                )
            declared_total += info.file_size
        if declared_total > limits.max_total_bytes:
            raise UnsafeBundleError(
                f"{label} unpacks to {declared_total} bytes, over the {limits.max_total_bytes}-byte limit"
            )
        members: dict[str, bytes] = {}
        small = [i for i in infos if i.filename in (MANIFEST, SIGNATURE)]
        for info in small:
            members[info.filename] = _inflate(zf, info, limits, label)
        if check_small is not None:
            check_small(members)
        for info in infos:
            if info not in small:
                members[info.filename] = _inflate(zf, info, limits, label)
    return members


def _inflate(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: BundleLimits, label: str) -> bytes:
    """One member's bytes, never more than its limit whatever its header claims."""
    limit = limits.for_member(info.filename)
    try:
        with zf.open(info) as fh:
            # Never trust the header's size (zip bombs): ask for at most what it claims + 1 (a
            # larger request lets zlib inflate that much in one go before zipfile cuts it) and
            # never past the limit; a member longer than it claims then fails its CRC.
            data = fh.read(min(limit, info.file_size) + 1)
    except zipfile.BadZipFile as exc:
        raise TamperedBundleError(
            f"bundle member {info.filename!r} is corrupt ({exc}): the file was modified "
            "or damaged in transit; download it again"
        ) from exc
    except (zlib.error, ValueError, NotImplementedError) as exc:
        # A damaged deflate stream, compression method or header offset: not a zip error to
        # zipfile, but damage all the same.
        raise TamperedBundleError(
            f"bundle member {info.filename!r} is corrupt ({type(exc).__name__}: {exc}): the file was "
            "modified or damaged in transit; download it again"
        ) from exc
    except (EOFError, OSError, zipfile.LargeZipFile) as exc:
        raise UnsafeBundleError(
            f"{label} is truncated or damaged reading {info.filename!r} ({exc}); download it again"
        ) from exc
    if len(data) > limit:
        raise UnsafeBundleError(
            f"bundle member {info.filename!r} decompresses past its {limit}-byte limit "
            "(its header lies about its size): refusing it"
        )
    return data


def _verify_members(
    members: Mapping[str, bytes],
    trusted_keys: Iterable[Ed25519PublicKey] | None,
    require_signature: bool,
    revoked_key_ids: Collection[str] = (),
) -> Bundle:
    """Signature first, then the manifest, then every member's hash."""
    extra = sorted(set(members) - set(MEMBERS))
    if extra:
        raise TamperedBundleError(
            f"bundle has unexpected member(s) {extra}: a bundle holds only {list(MEMBERS)}; "
            "rebuild it with 'edgefleet model convert'"
        )
    if MANIFEST not in members:
        raise TamperedBundleError("bundle has no manifest.json: it is not an edgefleet bundle")
    manifest_bytes = members[MANIFEST]
    signature = members.get(SIGNATURE, b"")
    signer: str | None = None
    if require_signature:
        if SIGNATURE not in members or not signature:
            raise SignatureError(
                "bundle is not signed (manifest.sig missing or empty): "
                "convert it again with --sign-key"
            )
        signer = verify_signature(list(trusted_keys or []), manifest_bytes, signature, revoked_key_ids)
    try:
        manifest = decode_manifest(manifest_bytes)
    except ManifestError as exc:
        raise TamperedBundleError(f"{exc}; rebuild the bundle") from exc
    for name in HASHED_MEMBERS:
        if name not in members:
            raise TamperedBundleError(f"bundle is missing member {name!r}; rebuild the bundle")
        expected = manifest.files.get(name)
        if expected is None:
            raise TamperedBundleError(f"manifest lists no sha256 for {name!r}; rebuild the bundle")
        actual = sha256_hex(members[name])
        if actual != expected:
            raise TamperedBundleError(
                f"sha256 of {name} is {actual[:12]}..., the signed manifest says {expected[:12]}...: "
                "the member was modified; do not use this bundle"
            )
    unknown = sorted(set(manifest.files) - set(HASHED_MEMBERS))
    if unknown:
        raise TamperedBundleError(f"manifest lists unknown member(s) {unknown}; rebuild the bundle")
    return Bundle(
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        model_bytes=members[MODEL],
        golden=golden_from_bytes(members[GOLDEN]),
        signature=signature,
        key_id=signer,
        members=dict(members),
    )


def read_bundle(
    path_or_bytes: str | os.PathLike[str] | bytes,
    trusted_keys: Iterable[Ed25519PublicKey] | None = None,
    *,
    require_signature: bool = True,
    limits: BundleLimits = BundleLimits(),  # noqa: B008 - frozen, immutable default
    revoked_key_ids: Collection[str] = (),
) -> Bundle:
    """Open a bundle safely and verify it: member hashes and (by default) the signature, which
    must not be by a key in `revoked_key_ids` (checked before the large members are inflated)."""
    keys = list(trusted_keys or [])

    def check_signature(small: Mapping[str, bytes]) -> None:
        if not require_signature:
            return
        if MANIFEST not in small:
            raise TamperedBundleError("bundle has no manifest.json: it is not an edgefleet bundle")
        if not small.get(SIGNATURE):
            raise SignatureError(
                "bundle is not signed (manifest.sig missing or empty): convert it again with --sign-key"
            )
        verify_signature(keys, small[MANIFEST], small[SIGNATURE], revoked_key_ids)

    members = _read_zip_members(path_or_bytes, limits, check_signature)
    return _verify_members(members, keys, require_signature, revoked_key_ids)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def extract_bundle(
    path: str | os.PathLike[str] | bytes,
    dest_dir: str | os.PathLike[str],
    trusted_keys: Iterable[Ed25519PublicKey] | None,
    *,
    require_signature: bool = True,
    limits: BundleLimits = BundleLimits(),  # noqa: B008
    overwrite: bool = False,
    revoked_key_ids: Collection[str] = (),
) -> Bundle:
    """Verify a bundle, then install its members into `dest_dir` atomically.

    Members go to a temp dir beside `dest_dir`, are fsynced, and the dir is renamed into
    place, so a power cut leaves either no `dest_dir` or a complete one.
    """
    bundle = read_bundle(path, trusted_keys, require_signature=require_signature, limits=limits,
                         revoked_key_ids=revoked_key_ids)
    dest = Path(dest_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} already exists: remove it or pass overwrite=True")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for name in MEMBERS:
            if name not in bundle.members:
                continue
            target = tmp / name
            with open(target, "wb") as fh:
                fh.write(bundle.members[name])
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return bundle


def load_extracted(
    directory: str | os.PathLike[str],
    trusted_keys: Iterable[Ed25519PublicKey] | None,
    *,
    require_signature: bool = True,
    limits: BundleLimits = BundleLimits(),  # noqa: B008
) -> Bundle:
    """Re-read an installed bundle dir and verify it again (disks rot, people edit files)."""
    root = Path(directory)
    if not root.is_dir():
        raise BundleError(f"{root} is not an installed bundle directory")
    members: dict[str, bytes] = {}
    for entry in root.iterdir():
        if entry.is_symlink():
            raise UnsafeBundleError(
                f"{entry} is a symbolic link: an installed bundle never has one"
            )
        if not entry.is_file():
            raise TamperedBundleError(f"{entry} is not a regular file: reinstall the bundle")
        limit = limits.for_member(entry.name)
        if entry.stat().st_size > limit:
            raise UnsafeBundleError(f"{entry} is over its {limit}-byte limit: reinstall the bundle")
        members[entry.name] = entry.read_bytes()
    bundle = _verify_members(members, trusted_keys, require_signature)
    return bundle


def bundle_key_id(private_key: Ed25519PrivateKey | None) -> str | None:
    """key_id of the key a bundle will be signed with, or None when unsigned."""
    return _key_id(private_key.public_key()) if private_key is not None else None
