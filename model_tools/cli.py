"""`edgefleet model ...`: thin commands over model_tools (parse, call one function, report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import msgspec

from model_tools.errors import ModelToolsError

KEY_NAME = "edgefleet"


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _progress(message: str) -> None:
    click.echo(f"edgefleet: {message}...", err=True)


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print a stable JSON document instead of text."
)


@click.group()
def model() -> None:
    """Convert, quantize, sign and verify model bundles."""


@model.command()
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(),
    help="Directory (writes edgefleet.key/.pub in it; an existing dir or a path ending in /) "
    "or path prefix (writes PREFIX.key/.pub).",
)
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
@json_option
def keygen(output: str, force: bool, as_json: bool) -> None:
    """Create an Ed25519 signing key pair (private key file mode 0600)."""
    from model_tools.signing import generate_keypair, key_id, save_private_key, save_public_key

    is_dir = output.endswith(("/", "\\")) or Path(output).is_dir()
    target = Path(output)
    if is_dir:
        target.mkdir(parents=True, exist_ok=True)
        private_path, public_path = target / f"{KEY_NAME}.key", target / f"{KEY_NAME}.pub"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        private_path = target.with_name(target.name + ".key")
        public_path = target.with_name(target.name + ".pub")
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        raise click.ClickException(
            f"{', '.join(existing)} already exist(s): refusing to overwrite a key (use --force)"
        )
    private, public = generate_keypair()
    save_private_key(private, private_path)
    save_public_key(public, public_path)
    kid = key_id(public)
    if as_json:
        _echo_json(
            {"private_key": str(private_path), "public_key": str(public_path), "key_id": kid}
        )
    else:
        click.echo(f"private key: {private_path} (keep it secret)")
        click.echo(f"public key:  {public_path} (give it to devices and the fleet server)")
        click.echo(f"key id:      {kid}")


@model.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option(
    "--sample",
    required=True,
    type=click.Path(path_type=Path),
    help="Sample data: .csv with header, .npy or .npz (X, y).",
)
@click.option(
    "--validation",
    type=click.Path(path_type=Path),
    help="Held-out data for the parity gate (default: 20 % carved from the sample).",
)
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    help="Data for the reference profile (default: the sample).",
)
@click.option(
    "--training",
    type=click.Path(path_type=Path),
    help="Labelled training data: calibrates the performance estimate by 5-fold cross-validation.",
)
@click.option("--name", required=True, help="Model name.")
@click.option("--version", "version", required=True, help="Model version.")
@click.option(
    "--quantize",
    type=click.Choice(["auto", "int8", "float32"]),
    default="auto",
    show_default=True,
    help="auto: smallest variant that passes the parity gate.",
)
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path),
    help="Ed25519 private key (from 'edgefleet model keygen'); unsigned without it.",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow loading a pickle/joblib model (this runs code from the file).",
)
@click.option(
    "--trust-type",
    "trust_types",
    multiple=True,
    help="A type a .skops file may contain beyond skops' defaults and edgefleet's reviewed "
    "scikit-learn types (repeatable; the error for an untrusted file lists the flags to add).",
)
@click.option(
    "--label-column",
    help="CSV column with the true labels (default: 'label' or 'target' if present); "
    "the --reference file may lack it.",
)
@click.option(
    "--min-agreement",
    type=float,
    default=0.995,
    show_default=True,
    help="Parity gate: minimum label agreement with sklearn.",
)
@click.option(
    "--max-accuracy-drop",
    type=float,
    default=0.005,
    show_default=True,
    help="Parity gate: maximum accuracy drop (fraction, 0.005 = 0.5 points).",
)
@click.option(
    "--max-r2-drop",
    type=float,
    default=0.005,
    show_default=True,
    help="Parity gate: maximum R² drop (regression).",
)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle file to write (.efb).",
)
@json_option
def convert(
    model_path: Path,
    sample: Path,
    validation: Path | None,
    reference: Path | None,
    training: Path | None,
    name: str,
    version: str,
    quantize: str,
    sign_key: Path | None,
    trust_pickle: bool,
    trust_types: tuple[str, ...],
    label_column: str | None,
    min_agreement: float,
    max_accuracy_drop: float,
    max_r2_drop: float,
    output: Path,
    as_json: bool,
) -> None:
    """Convert a fitted scikit-learn model into a verified, signed bundle."""
    from model_tools.load import load_estimator
    from model_tools.parity import ParityGateError, ParityThresholds
    from model_tools.pipeline import build_bundle
    from model_tools.signing import load_private_key

    try:
        key = load_private_key(sign_key) if sign_key is not None else None
        _progress(f"loading {model_path}")
        estimator = load_estimator(model_path, trusted_types=trust_types, trust_pickle=trust_pickle)
        result = build_bundle(
            estimator,
            sample,
            name=name,
            version=version,
            validation=validation,
            reference=reference,
            quantize=quantize,  # type: ignore[arg-type]
            sign_key=key,
            parity=ParityThresholds(
                min_agreement=min_agreement,
                max_accuracy_drop=max_accuracy_drop,
                max_r2_drop=max_r2_drop,
            ),
            progress=_progress,
            out_path=output,
            label_column=label_column,
            training=training,
        )
    except ParityGateError as exc:
        if as_json:
            _echo_json(
                {
                    "ok": False,
                    "error": str(exc).splitlines()[0],
                    "parity": [r.to_dict() for r in exc.table],
                }
            )
            sys.exit(1)
        raise _fail(exc) from exc
    except ModelToolsError as exc:
        if as_json:
            _echo_json({"ok": False, "error": str(exc)})
            sys.exit(1)
        raise _fail(exc) from exc
    if as_json:
        _echo_json({"ok": True, **result.to_json()})
        return
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(result.parity_text)
    click.echo("")
    for v in result.quantization["variants"]:
        click.echo(f"  {v['variant']}: {v['note']}")
    b = result.manifest.budget
    click.echo(
        f"\nwrote {output} ({len(result.bundle_bytes)} bytes, {result.chosen}, "
        + (f"signed by {result.key_id})" if result.key_id else "UNSIGNED: pass --sign-key)")
    )
    click.echo(
        f"budget: model {b.model_bytes} bytes, single-row latency p50 {b.latency_ms_p50:.3f} ms "
        f"p99 {b.latency_ms_p99:.3f} ms, memory ~{b.peak_memory_bytes / 1e6:.1f} MB"
    )


def _summary(bundle: Any, path: Path) -> dict[str, Any]:
    import hashlib

    m = bundle.manifest
    data = path.read_bytes()
    return {
        "bundle": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "signed": bool(bundle.signature),
        "manifest": msgspec.to_builtins(m),
    }


@model.command()
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@json_option
def inspect(bundle_path: Path, as_json: bool) -> None:
    """Show a bundle's manifest: schema, outputs, parity, quantization, budget, profile.

    Checks member hashes but not the signature: use 'edgefleet model verify' for that.
    """
    from model_tools.bundle import read_bundle

    try:
        bundle = read_bundle(bundle_path, require_signature=False)
    except ModelToolsError as exc:
        raise _fail(exc) from exc
    if as_json:
        _echo_json(_summary(bundle, bundle_path))
        return
    m = bundle.manifest
    click.echo(f"{m.name} {m.version} ({m.task}, {m.variant}), created {m.created_at}")
    click.echo(
        f"signed: {'yes (verify with edgefleet model verify)' if bundle.signature else 'NO'}"
    )
    click.echo("inputs:")
    for f in m.inputs:
        detail = (
            f"range [{f.min}, {f.max}]" + (", NaN allowed" if f.allow_nan else "")
            if f.kind == "numeric"
            else f"{len(f.categories or [])} categories"
        )
        click.echo(f"  {f.name}: {f.kind} {f.dtype}, {detail}")
    click.echo(
        "onnx inputs: " + ", ".join(f"{i.name}[{i.dtype}]<-{i.columns}" for i in m.onnx_inputs)
    )
    o = m.outputs
    click.echo(
        f"outputs: label={o.label} probabilities={o.probabilities} value={o.value} classes={o.classes}"
    )
    parity = m.parity
    if parity.get("variants"):
        from model_tools.parity import ParityRow, format_parity_table

        rows = [ParityRow(**r) for r in parity["variants"]]
        click.echo(
            f"parity on {parity.get('rows')} rows"
            + ("" if parity.get("labels") else " (no labels)")
            + ":"
        )
        click.echo(format_parity_table(rows, parity.get("chosen"), parity.get("reason", "")))
    b = m.budget
    click.echo(
        f"budget: {b.model_bytes} bytes, p50 {b.latency_ms_p50:.3f} ms, p99 {b.latency_ms_p99:.3f} ms, "
        f"memory ~{b.peak_memory_bytes / 1e6:.1f} MB"
    )
    click.echo(f"profile: {m.profile.rows} reference rows, {len(m.profile.features)} features")
    for w in m.profile.warnings:
        click.echo(f"  warning: {w}")
    click.echo("files: " + ", ".join(f"{k} {v[:12]}" for k, v in sorted(m.files.items())))


@model.command()
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Trusted Ed25519 public key (repeatable: any one must verify).",
)
@json_option
def verify(bundle_path: Path, public_keys: tuple[Path, ...], as_json: bool) -> None:
    """Check every member's sha256 and the signature against trusted public keys."""
    from model_tools.bundle import read_bundle
    from model_tools.signing import load_public_keys

    try:
        keys = load_public_keys(public_keys)
        bundle = read_bundle(bundle_path, keys)
    except ModelToolsError as exc:
        if as_json:
            _echo_json(
                {
                    "ok": False,
                    "bundle": str(bundle_path),
                    "error": str(exc),
                    "kind": type(exc).__name__,
                }
            )
            sys.exit(1)
        raise _fail(exc) from exc
    if as_json:
        _echo_json(
            {
                "ok": True,
                "bundle": str(bundle_path),
                "name": bundle.name,
                "version": bundle.version,
                "key_id": bundle.key_id,
                "files": dict(bundle.manifest.files),
            }
        )
    else:
        click.echo(
            f"OK: {bundle.name} {bundle.version} signed by key {bundle.key_id}; all member hashes match"
        )
