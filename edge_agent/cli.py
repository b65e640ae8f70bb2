"""`edgefleet agent ...`: run the agent, score files, ask a running agent.

Commands parse options, call one library function and turn domain errors into ClickException.
"""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from edge_agent.config import AgentConfig, ConfigError, load_config

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    help="The agent's TOML configuration file.",
)


def _load(config_path: Path | None) -> AgentConfig:
    if config_path is None:
        raise click.UsageError("--config is required here")
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def agent() -> None:
    """Run the on-device agent and talk to it."""


@agent.command()
@config_option
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def run(config_path: Path | None, log_level: str) -> None:
    """Run the agent: serve the active model, report telemetry, apply updates."""
    from edge_agent.service import run_service

    config = _load(config_path)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_service(config)
    except OSError as exc:
        raise click.ClickException(f"cannot start the agent: {exc}") from exc


def _http(url: str, token: str, body: Any | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, {"error": "http", "message": str(exc)}
    except urllib.error.URLError as exc:
        raise click.ClickException(f"cannot reach the agent at {url}: {exc.reason}") from exc


@agent.command()
@config_option
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV file with a header naming the features.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the CSV with predictions (default: stdout summary only).")
@click.option("--url", help="A running agent's base URL, e.g. http://127.0.0.1:8470 (instead of scoring locally).")
@click.option("--row", "rows", multiple=True,
              help='One row as JSON: a list in feature order or an object keyed by feature name. Repeatable.')
@click.option("--token", default="", help="Bearer token of the running agent ([http] token).")
def predict(config_path: Path | None, input_path: Path | None, output_path: Path | None,
            url: str | None, rows: tuple[str, ...], token: str) -> None:
    """Score rows: locally from --input with the active bundle, or through a running agent (--url)."""
    if url:
        _predict_remote(url, rows, input_path, token)
        return
    if input_path is None or output_path is None:
        raise click.UsageError("score a file with --config, --input and --output, or call a running agent with --url")
    config = _load(config_path)
    from edge_agent.agent import trusted_keys_from_config
    from edge_agent.batch import score_csv
    from edge_agent.runtime import ModelRuntime
    from edge_agent.store import DataDir
    from model_tools.bundle import load_extracted
    from model_tools.errors import BundleError

    data = DataDir(config.data_dir)
    active, _ = data.committed()
    if not active:
        raise click.ClickException(f"no model is active in {config.data_dir}: the agent has not installed one yet")
    try:
        runtime = ModelRuntime(load_extracted(data.version_dir(active), trusted_keys_from_config(config)),
                               intra_op_threads=config.runtime.intra_op_threads)
        result = score_csv(runtime, input_path, output_path)
    except (BundleError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{result.predicted} of {result.rows} rows scored with {runtime.name} {runtime.version}; "
               f"{result.errors} refused (see the error column of {output_path})")


def _predict_remote(url: str, rows: tuple[str, ...], input_path: Path | None, token: str) -> None:
    if input_path is not None:
        import csv

        with open(input_path, newline="", encoding="utf-8") as fh:
            parsed: list[Any] = [
                {k: (None if v == "" else _number(v)) for k, v in r.items()} for r in csv.DictReader(fh)
            ]
    else:
        try:
            parsed = [json.loads(r) for r in rows]
        except ValueError as exc:
            raise click.UsageError(f"--row must be JSON: {exc}") from exc
    if not parsed:
        raise click.UsageError("give --row (repeatable) or --input")
    status, answer = _http(url.rstrip("/") + "/v1/predict", token, {"rows": parsed})
    click.echo(json.dumps(answer, indent=2))
    if status != 200:
        sys.exit(1)


def _number(v: str) -> Any:
    try:
        return float(v)
    except ValueError:
        return v


@agent.command()
@click.option("--url", default="http://127.0.0.1:8470", show_default=True, help="The running agent's base URL.")
@click.option("--token", default="", help="Bearer token of the running agent ([http] token).")
def status(url: str, token: str) -> None:
    """Show a running agent's health and model."""
    code, health = _http(url.rstrip("/") + "/v1/health", token)
    _, model = _http(url.rstrip("/") + "/v1/model", token)
    click.echo(json.dumps({"health": health, "model": model}, indent=2))
    if code != 200:
        sys.exit(1)


@agent.command("config-keys")
def config_keys() -> None:
    """List every configuration key (documented in docs/device.md)."""
    from edge_agent.config import all_keys

    for key in all_keys():
        click.echo(key)
