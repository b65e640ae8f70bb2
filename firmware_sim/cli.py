"""`edgefleet sim ...`: run a simulated fleet against a fleet server, list scenarios.

Commands parse options and call `firmware_sim.runner` (one function per command); errors a user
can cause become a one-line message.
"""

from __future__ import annotations

from pathlib import Path

import click

from firmware_sim.provision import ProvisionError
from firmware_sim.scenario import SCENARIO_DIR, ScenarioError, load_scenario


@click.group()
def sim() -> None:
    """Simulate device fleets and rehearse rollouts."""


@sim.command("run")
@click.option("--devices", type=click.IntRange(1, 100_000), default=100, show_default=True,
              help="Simulated devices (ids sim-0001, sim-0002, ...).")
@click.option("--scenario", default="no-drift", show_default=True,
              help="Scenario TOML file, or the name of a shipped one (see 'edgefleet sim scenarios').")
@click.option("--server", "server_url", metavar="URL",
              help="A running fleet server to attach to (http://host:port). Without it, a server is "
                   "started in this process on --data-dir, on the simulated clock.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The server's data dir: provision devices through it (with --server), or run a "
                   "server on it (without --server).")
@click.option("--token", envvar="EDGEFLEET_TOKEN", help="Operator API token: provision devices through "
              "the REST API (with --server, instead of --data-dir). Env: EDGEFLEET_TOKEN.")
@click.option("--mqtt-url", help="Broker URL for the devices, when it differs from the one the "
              "server writes into agent configs.")
@click.option("--model", "model_ref", metavar="NAME:VERSION",
              help="Registered model the devices start with (default: the newest registered).")
@click.option("--speed", type=click.FloatRange(min=0.1), help="Simulated seconds per real second "
              "(default: the scenario's).")
@click.option("--duration", type=click.FloatRange(min=0.1), help="Simulated minutes to run "
              "(default: the scenario's).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path(".sim"),
              show_default=True, help="Device configs and data dirs (reused on the next run).")
@click.option("--progress-every", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Real seconds between progress lines.")
def run(devices: int, scenario: str, server_url: str | None, data_dir: Path | None, token: str | None,
        mqtt_url: str | None, model_ref: str | None, speed: float | None, duration: float | None,
        workdir: Path, progress_every: float) -> None:
    """Run N simulated devices (real agents) with a scenario's data, drift and faults."""
    from firmware_sim.runner import RunOptions, SimRunError, run_simulation

    try:
        options = RunOptions(
            devices=devices, scenario=load_scenario(scenario), server_url=server_url, data_dir=data_dir,
            token=token, mqtt_url=mqtt_url, model_ref=model_ref, speed=speed, duration_min=duration,
            workdir=workdir, progress_every=progress_every,
        )
        run_simulation(options, echo=click.echo)
    except (ScenarioError, ProvisionError, SimRunError) as exc:
        raise click.ClickException(str(exc)) from exc


@sim.command("scenarios")
def scenarios() -> None:
    """List the shipped scenarios with their descriptions."""
    for path in sorted(SCENARIO_DIR.glob("*.toml")):
        s = load_scenario(path)
        click.echo(f"{path.stem:16} {s.description}")


def _register_rehearse() -> None:
    from firmware_sim.rehearse import rehearse_command

    sim.add_command(rehearse_command)


def _register_chaos() -> None:
    from firmware_sim.chaos import chaos_command

    sim.add_command(chaos_command)


_register_rehearse()
_register_chaos()
