"""`edgefleet server ...`: each command parses options, calls one service, prints the result."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fleet_server.config import PRIVATE_UMASK, ConfigError, ServerConfig, load_config
from fleet_server.storage import StorageError
from fleet_server.storage.open import check_storage

ERRORS: tuple[type[Exception], ...] = (ConfigError, ValueError, OSError, StorageError)


def data_dir_option(fn: Callable) -> Callable:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="EDGEFLEET_DATA_DIR",
        required=True,
        help="Server data directory (database, bundles, broker files). Env: EDGEFLEET_DATA_DIR.",
    )(fn)


def user_errors(fn: Callable) -> Callable:
    """Turn errors a user can cause into a clean message instead of a traceback."""

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except ERRORS as exc:
            raise click.ClickException(str(exc)) from exc

    return inner


def _services(data_dir: Path, **overrides: Any):
    from fleet_server.service import bootstrap

    return bootstrap(load_config(data_dir, **overrides))


@click.group()
def server() -> None:
    """Run and administer the fleet server."""
    # Whatever a server command creates (database, WAL, bundles, secrets, backups, the managed
    # broker's files) is for the server's user only, whatever the shell's umask.
    os.umask(PRIVATE_UMASK)


def _serve(config: ServerConfig, **kwargs: Any) -> None:
    from fleet_server.service import FleetServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stopping.set()

    # Handlers first: a SIGTERM during start-up still stops everything cleanly.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fleet = FleetServer(config, **kwargs)
    try:
        fleet.start()
    except BaseException:
        fleet.stop()
        raise
    if kwargs.get("http", True):
        click.echo(f"edgefleet server: API on {fleet.url}, MQTT {config.broker_url}", err=True)
    else:
        click.echo(f"edgefleet ingest worker {config.worker_id}: MQTT {config.broker_url}", err=True)
    try:
        while not stopping.wait(0.5):
            pass
    finally:
        click.echo("stopping...", err=True)
        fleet.stop()


@server.command()
@data_dir_option
@click.option("--listen", help="HOST:PORT of the HTTP API (default 127.0.0.1:8080).")
@click.option("--mqtt-url", help="Use an existing broker (mqtt://host:port) instead of the managed one.")
@click.option("--managed-broker", is_flag=True, help="Start and manage Mosquitto (the default without --mqtt-url).")
@click.option("--broker-port", type=int, help="Loopback port of the managed broker (default 1883).")
@click.option("--public-url", help="Base URL devices download bundles from (default http://LISTEN).")
@click.option("--storage-url", help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default: DATA_DIR/fleet.db; "
              "also EDGEFLEET_STORAGE_URL).")
@user_errors
def run(data_dir: Path, listen: str | None, mqtt_url: str | None, managed_broker: bool,
        broker_port: int | None, public_url: str | None, storage_url: str | None) -> None:
    """Run the API, MQTT ingest, drift alerts and (managed) broker until SIGTERM or Ctrl-C."""
    if managed_broker and mqtt_url:
        raise click.UsageError("--managed-broker and --mqtt-url exclude each other: pick one")
    config = load_config(data_dir, listen=listen, mqtt_url=mqtt_url, broker_port=broker_port, public_url=public_url,
                         storage_url=storage_url)
    if managed_broker:
        config.mqtt_url = ""
    check_storage(config.storage_location)
    _serve(config)


@server.command()
@data_dir_option
@click.option("--mqtt-url", help="Broker URL (default: the managed broker's loopback port).")
@click.option("--worker-id", default="1", show_default=True,
              help="Distinct per ingest process: it names the persistent MQTT session.")
@click.option("--storage-url", help="The server's database (default: from server.toml or EDGEFLEET_STORAGE_URL, "
              "else DATA_DIR/fleet.db).")
@user_errors
def ingest(data_dir: Path, mqtt_url: str | None, worker_id: str, storage_url: str | None) -> None:
    """Run an extra ingest-only process sharing the telemetry subscription and the database."""
    config = load_config(data_dir, worker_id=worker_id, storage_url=storage_url)
    check_storage(config.storage_location)
    # Never start a second managed broker: connect to the running one (or the given URL).
    config.mqtt_url = mqtt_url or f"mqtt://{config.broker_host}:{config.broker_port}"
    _serve(config, http=False, loops=False)


@server.command("add-device")
@data_dir_option
@click.argument("device_id")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag the device; repeatable.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the agent config here (mode 0600) instead of printing it.")
@click.option("--agent-data-dir", default="/var/lib/edgefleet", show_default=True,
              help="data_dir written into the agent config.")
@click.option("--agent-listen", default="127.0.0.1:8470", show_default=True, metavar="HOST:PORT",
              help="The agent's local HTTP API ([http] listen); one port per agent on a shared host.")
@click.option("--window-s", type=click.FloatRange(0, 86400, min_open=True), default=60.0, show_default=True,
              metavar="SECONDS", help="The agent's telemetry window ([telemetry] window_s).")
@user_errors
def add_device(data_dir: Path, device_id: str, tags: tuple[str, ...], output: Path | None,
               agent_data_dir: str, agent_listen: str, window_s: float) -> None:
    """Provision a device and print its ready agent config (the password is shown only now).
    The options are those of POST /api/v1/devices."""
    from fleet_server.devices import parse_tags, provision_device

    svc = _services(data_dir)
    p = provision_device(svc, device_id, parse_tags(tags), data_dir=agent_data_dir, listen=agent_listen,
                         window_s=window_s)
    if output:
        output.touch(mode=0o600)
        output.write_text(p.agent_config)
        click.echo(f"device {device_id} provisioned; agent config written to {output}", err=True)
    else:
        click.echo(p.agent_config, nl=False)
    from fleet_server.device_install import install_command

    # On stderr, as TOML comments: stdout stays the config (`add-device pi-1 > agent.toml`).
    click.echo("# install the agent on the device, once agent.toml (and, with TLS, edgefleet-ca.pem) "
               "are in /etc/edgefleet:", err=True)
    click.echo(f"# {install_command(svc.config, device_id, p.password)}", err=True)


@server.command("revoke-device")
@data_dir_option
@click.argument("device_id")
@user_errors
def revoke_device(data_dir: Path, device_id: str) -> None:
    """Revoke a device: it can no longer connect to the broker or download bundles."""
    from fleet_server.devices import revoke_device as revoke

    revoke(_services(data_dir), device_id)
    click.echo(f"device {device_id} revoked")


@server.command("rotate-device-password")
@data_dir_option
@click.argument("device_id")
@user_errors
def rotate_device_password(data_dir: Path, device_id: str) -> None:
    """Give a device a new password over its own channel; the old one works until it confirms."""
    from fleet_server.rotation import request_rotation

    status = request_rotation(_services(data_dir), device_id, "cli")
    click.echo(f"password rotation {status['rotation_id']} of {device_id} {status['state']}: the device takes its "
               "new password when it is online (a running server announces it); GET "
               f"/api/v1/devices/{device_id} and the console's device page show when it confirmed")


@server.command("list-devices")
@data_dir_option
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only devices with this tag; repeatable.")
@click.option("--model-version", help="Only devices whose active model version is this.")
@click.option("--online/--offline", default=None, help="Only online (or offline) devices.")
@click.option("--seen-within", type=float, metavar="SECONDS", help="Only devices heard from this recently.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def list_devices(data_dir: Path, tags: tuple[str, ...], model_version: str | None, online: bool | None,
                 seen_within: float | None, as_json: bool) -> None:
    """List devices, filtered by tag, model version, online state and last seen."""
    from fleet_server.devices import list_devices as list_
    from fleet_server.devices import parse_tags

    rows = list_(_services(data_dir), tags=parse_tags(tags), model_version=model_version, online=online,
                 seen_within_s=seen_within)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for d in rows:
        tag_text = ",".join(f"{k}={v}" for k, v in sorted(d["tags"].items()))
        click.echo(f"{d['id']:24} {d['status']:8} {d['active_version'] or '-':12} {tag_text}")


@server.command("add-model")
@data_dir_option
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@user_errors
def add_model(data_dir: Path, bundle: Path) -> None:
    """Verify a signed bundle against the trusted keys and register it."""
    from fleet_server.registry import upload_bundle

    m = upload_bundle(_services(data_dir), bundle.read_bytes())
    click.echo(f"registered {m['name']} {m['version']} (sha256 {m['sha256'][:12]}..., signed by {m['key_id']})")


@server.command("list-models")
@data_dir_option
@user_errors
def list_models(data_dir: Path) -> None:
    """List registered model versions."""
    from fleet_server.registry import list_models as list_

    for m in list_(_services(data_dir)):
        click.echo(f"{m['name']:20} {m['version']:12} {m['variant'] or '-':14} {m['size']:>10} {m['sha256'][:12]}")


@server.command("trust-key")
@data_dir_option
@click.argument("pubkey", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--comment", default="", help="A note stored with the key (who signs with it).")
@user_errors
def trust_key(data_dir: Path, pubkey: Path, comment: str) -> None:
    """Trust a bundle-signing public key (PEM, from 'edgefleet model keygen')."""
    from fleet_server.registry import trust_key as trust

    click.echo(f"trusted key {trust(_services(data_dir), pubkey.read_bytes(), comment or pubkey.name)}")


def parse_duration(text: str) -> float:
    """Seconds in `90`, `90s`, `15m`, `12h`, `30d` or `2w`."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip().lower()
    factor = units.get(text[-1:], 0)
    number = text[:-1] if factor else text
    try:
        value = float(number) * (factor or 1)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration: use e.g. 3600, 90m, 12h, 30d") from None
    if not value > 0:
        raise click.BadParameter(f"{text!r} must be a positive duration")
    return value


@server.command("create-token")
@data_dir_option
@click.option("--role", type=click.Choice(["viewer", "operator"]), default="viewer", show_default=True,
              help="viewer reads; operator also changes devices, models, alerts and webhooks.")
@click.option("--name", default="cli", show_default=True, help="Who or what the token is for.")
@click.option("--expires-in", metavar="DURATION",
              help="Refuse the token after this long (seconds, or 90m, 12h, 30d, 2w); default: never.")
@user_errors
def create_token(data_dir: Path, role: str, name: str, expires_in: str | None) -> None:
    """Create an API token (printed once; only its hash is stored)."""
    from fleet_server.auth import issue_token

    lifetime = parse_duration(expires_in) if expires_in else None
    svc = _services(data_dir)
    click.echo(issue_token(svc.storage, name, role, svc.clock(), lifetime))


@server.command("revoke-key")
@data_dir_option
@click.argument("key_id")
@click.option("--reason", default="", help="Why (stored with the revocation, shown in refusals).")
@user_errors
def revoke_key(data_dir: Path, key_id: str, reason: str) -> None:
    """Revoke a bundle-signing key: uploads of bundles it signed are refused from now on."""
    from fleet_server.registry import revoke_key as revoke

    if revoke(_services(data_dir), key_id, reason):
        click.echo(f"key {key_id} revoked; add it to [trust] revoked_key_ids of every device config too")
    else:
        click.echo(f"key {key_id} was already revoked")


@server.command("create-operator")
@data_dir_option
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator"]), default="viewer", show_default=True,
              help="viewer sees the console; operator also acts (acknowledge, roll out, pause, abort).")
@click.option("--password", envvar="EDGEFLEET_OPERATOR_PASSWORD",
              help="The password (at least 10 characters); prompted for, twice, when not given. "
                   "Env: EDGEFLEET_OPERATOR_PASSWORD.")
@click.option("--update", is_flag=True, help="Change the role and password of an existing operator.")
@user_errors
def create_operator(data_dir: Path, name: str, role: str, password: str | None, update: bool) -> None:
    """Create a web console account (argon2id-hashed password) with a viewer or operator role."""
    from fleet_server.console.accounts import create_operator as create

    if password is None:
        password = click.prompt(f"Password for {name}", hide_input=True, confirmation_prompt=True)
    op = create(_services(data_dir), name, role, password, update=update)
    click.echo(f"operator {op['name']} ({op['role']}) {'updated' if update else 'created'}")


@server.command("broker-config")
@data_dir_option
@click.option("--mode", type=click.Choice(["dynsec", "password_file"]), default=None,
              help="Account mode (default: broker_accounts of server.toml, dynsec unless set).")
@user_errors
def broker_config(data_dir: Path, mode: str | None) -> None:
    """Print what an external Mosquitto needs for the device accounts: its dynamic-security file
    (and plugin lines), or the password file and ACL."""
    from fleet_server.broker import broker_material

    svc = _services(data_dir, broker_accounts=mode)
    click.echo(broker_material(svc.config, svc.storage).render(), nl=False)
    click.echo(f"# server account password: {svc.config.secrets_dir / 'mqtt-server-password'}", err=True)


@server.command("tls-init")
@data_dir_option
@click.option("--hostname", "hostnames", multiple=True, metavar="NAME",
              help="A DNS name or IP address devices use to reach the server; repeatable.")
@click.option("--days", type=int, default=397, show_default=True, help="Validity of the server certificate.")
@click.option("--ca-days", type=int, default=3650, show_default=True, help="Validity of a newly created CA.")
@click.option("--new-ca", is_flag=True, help="Replace an existing CA; every device then needs the new ca.pem.")
@user_errors
def tls_init(data_dir: Path, hostnames: tuple[str, ...], days: int, ca_days: int, new_ca: bool) -> None:
    """Create the CA and (re)issue the server certificate for the broker's TLS listener and HTTPS."""
    from fleet_server.tls import init_tls

    r = init_tls(data_dir, hostnames, days=days, ca_days=ca_days, new_ca=new_ca)
    click.echo(f"{'created' if r.ca_created else 'kept'} CA {r.paths.ca_cert} (sha256 {r.ca_fingerprint})")
    click.echo(f"server certificate {r.paths.server_cert} for {', '.join(r.names)}, valid until "
               f"{r.not_after:%Y-%m-%d}")


@server.command("backup")
@data_dir_option
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The backup file to write (.tar.gz, mode 0600: it holds the server's secrets).")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@user_errors
def backup(data_dir: Path, output: Path, force: bool) -> None:
    """Back up the database, bundles, secrets, TLS files and server.toml (safe while the server runs)."""
    from fleet_server.backup import create_backup

    click.echo(f"backup written: {create_backup(data_dir, output, overwrite=force).summary()}")


@server.command("restore")
@data_dir_option
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@user_errors
def restore(data_dir: Path, archive: Path) -> None:
    """Restore a backup into a new or empty data dir (a non-empty one is refused)."""
    from fleet_server.backup import restore_backup

    info = restore_backup(archive, data_dir)
    click.echo(f"restored {len(info.files)} files into {data_dir}; start the server on it "
               "(pending migrations run at start)")


@server.command("migrate-storage")
@data_dir_option
@click.option("--to", "target", required=True, metavar="URL",
              help="The empty PostgreSQL database: postgresql://USER:PASSWORD@HOST:PORT/DB.")
@user_errors
def migrate_storage(data_dir: Path, target: str) -> None:
    """Copy this data dir's SQLite deployment (every table and the bundles) into an empty PostgreSQL
    database, verifying counts and checksums of every table. Stop the server first."""
    from fleet_server.storage.open import backend as storage_backend
    from fleet_server.storage.transfer import migrate_storage as transfer

    config = load_config(data_dir)
    source = Path(config.storage_location.split("://", 1)[1]) if config.storage_url and \
        storage_backend(config.storage_url) == "sqlite" else config.db_path
    report = transfer(data_dir, source, target)
    for line in report.lines():
        click.echo(line)
    click.echo(f"next: set storage_url to the new database in server.toml (or --storage-url) on every node, give "
               f"every node a copy of {config.secrets_dir} (server MQTT password, desired-state key), and start them")


# ------------------------------------------------------------------ rollouts


@server.group()
def rollout() -> None:
    """Create, inspect and operate staged model rollouts (the running server drives them)."""


def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _print_rollout(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    from fleet_server.rollout_text import render_status

    click.echo(render_status(status))


@rollout.command("create")
@data_dir_option
@click.option("--plan", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Rollout plan (TOML or JSON: model, version, target, stages, gates, on_failure, ...).")
@click.option("--model", help="Registered model name (overrides the plan).")
@click.option("--version", "version", help="Registered model version to roll out (overrides the plan).")
@click.option("--all", "all_devices", is_flag=True, help="Target the whole fleet.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Target devices with this tag; repeatable.")
@click.option("--group", help="Target the devices tagged group=GROUP.")
@click.option("--device", "devices", multiple=True, help="Target this device; repeatable.")
@click.option("--blue-green", is_flag=True, help="One 100 % live stage with instant rollback (abort).")
@click.option("--on-failure", type=click.Choice(["pause", "rollback"]), help="What a failed gate does (default pause).")
@click.option("--device-timeout", type=float, metavar="SECONDS",
              help="A device silent this long goes to the timeout bucket (default 600).")
@click.option("--name", help="A label for people.")
@click.option("--json", "as_json", is_flag=True, help="Print the rollout as JSON.")
@user_errors
def rollout_create(data_dir: Path, plan: Path | None, model: str | None, version: str | None, all_devices: bool,
                   tags: tuple[str, ...], group: str | None, devices: tuple[str, ...], blue_green: bool,
                   on_failure: str | None, device_timeout: float | None, name: str | None, as_json: bool) -> None:
    """Create a rollout (default stages: shadow 5 %, live 1 %, 10 %, 50 %, 100 %)."""
    from fleet_server.devices import parse_tags
    from fleet_server.rollouts import create_rollout, load_plan

    data = load_plan(plan) if plan else {}
    for key, value in (("model", model), ("version", version), ("on_failure", on_failure),
                       ("device_timeout_s", device_timeout), ("name", name)):
        if value is not None:
            data[key] = value
    if blue_green:
        data["blue_green"] = True
    if all_devices or tags or group or devices:
        target: dict[str, Any] = {"all": all_devices}
        if tags:
            target["tags"] = parse_tags(tags)
        if group:
            target["group"] = group
        if devices:
            target["devices"] = list(devices)
        data["target"] = target
    _print_rollout(create_rollout(_services(data_dir), data, _actor()), as_json)


@rollout.command("list")
@data_dir_option
@click.option("--state", type=click.Choice(["running", "paused", "completed", "aborting", "aborted"]),
              help="Only rollouts in this state.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def rollout_list(data_dir: Path, state: str | None, as_json: bool) -> None:
    """List rollouts, newest first."""
    from fleet_server.rollouts import list_rollouts

    rows = list_rollouts(_services(data_dir), state)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['id']:14} {r['model']:16} {r['version']:10} {r['state']:10} "
                   f"stage {r['stage'] + 1}/{r['stages']} {r['mode']:6} {r['verdict'] or '-'}")


@rollout.command("show")
@data_dir_option
@click.argument("rollout_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole status as JSON.")
@user_errors
def rollout_show(data_dir: Path, rollout_id: str, as_json: bool) -> None:
    """Show a rollout: stages, cohorts, gates (value, threshold, sample), timeouts, audit log."""
    from fleet_server.rollouts import rollout_status

    _print_rollout(rollout_status(_services(data_dir), rollout_id), as_json)


def _operation(action: str, doc: str, with_reason: bool) -> None:
    @data_dir_option
    @click.argument("rollout_id")
    @click.option("--json", "as_json", is_flag=True, help="Print the rollout as JSON.")
    @user_errors
    def command(data_dir: Path, rollout_id: str, as_json: bool, reason: str = "") -> None:
        from fleet_server import rollouts

        svc = _services(data_dir)
        fn = getattr(rollouts, action)
        status = fn(svc, rollout_id, _actor(), reason) if with_reason else fn(svc, rollout_id, _actor())
        _print_rollout(status, as_json)

    command.__doc__ = doc
    if with_reason:
        command = click.option("--reason", default="", help="Why (kept in the audit log).")(command)
    rollout.command(action)(command)


_operation("pause", "Pause a running rollout: devices keep what they run, no stage advances.", True)
_operation("resume", "Resume a paused rollout; its stage measures gates over a fresh window.", False)
_operation("advance", "Approve: end the current stage now and start the next (or complete).", False)
_operation("abort", "Abort: every device of the rollout goes back to its previous version.", True)


def main() -> None:  # pragma: no cover - for `python -m fleet_server.cli`
    server(prog_name="edgefleet server")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
