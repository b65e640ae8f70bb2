"""`edgefleet sim rehearse`: rehearse a rollout plan from the command line and print the report."""

from __future__ import annotations

import json
from pathlib import Path

import click

from firmware_sim.rehearse.run import DEFAULT_INTERVAL_S, DEFAULT_MAX_SIM_S, rehearse
from firmware_sim.rehearse.shape import (
    RehearsalError,
    fleet_shape_from_data_dir,
    registry_from_data_dir,
)


@click.command("rehearse")
@click.option("--rollout", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Rollout plan (TOML or JSON), as 'edgefleet server rollout create --plan' takes.")
@click.option("--devices", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Simulated devices.")
@click.option("--scenario", help="Scenario name or file: the devices' data, drift and faults "
              "(default: steady traffic from breast_cancer, one prediction a second per device).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="A real server's data dir (read only): the simulated fleet copies its hardware mix, "
                   "tags and offline devices; bundles and trusted keys come from its registry.")
@click.option("--current-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Bundle the devices run now (default with --data-dir: the version most of them run).")
@click.option("--candidate-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Bundle of the plan's model and version (default with --data-dir: from its registry).")
@click.option("--current", "current_version", metavar="VERSION",
              help="With --data-dir: the version the devices run now, when not the most common one.")
@click.option("--trust-key", "trust_keys", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Public key (PEM) that signed the bundles; repeatable. --data-dir adds its trusted keys.")
@click.option("--interval", type=click.FloatRange(min=1.0), default=DEFAULT_INTERVAL_S, show_default=True,
              help="Simulated seconds between two controller passes.")
@click.option("--speed", type=click.FloatRange(min=0.1),
              help="At most this many simulated seconds per real second (default: as fast as possible).")
@click.option("--max-hours", type=click.FloatRange(min=0.01), default=DEFAULT_MAX_SIM_S / 3600, show_default=True,
              help="Stop after this much simulated time (outcome 'unfinished').")
@click.option("--approve/--no-approve", default=True, show_default=True,
              help="Advance stages that wait for an operator's approval once their gates pass.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the throwaway server and devices here (default: a temporary dir, removed).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def rehearse_command(plan_path: Path, devices: int, scenario: str | None, data_dir: Path | None,
                     current_bundle: Path | None, candidate_bundle: Path | None, current_version: str | None,
                     trust_keys: tuple[Path, ...], interval: float, speed: float | None, max_hours: float,
                     approve: bool, workdir: Path | None, as_json: bool) -> None:
    """Rehearse a rollout plan on a simulated fleet before a real device is touched.

    Exits 0 when the rehearsed rollout completes, 1 when it pauses, aborts or does not finish.
    """
    from firmware_sim.scenario import ScenarioError, load_scenario
    from fleet_server.rollout_model import RolloutError
    from fleet_server.rollouts import load_plan

    try:
        plan = load_plan(plan_path)
        loaded = load_scenario(scenario) if scenario else None
        pems = [p.read_text() for p in trust_keys]
        shape = None
        current = current_bundle.read_bytes() if current_bundle else None
        candidate = candidate_bundle.read_bytes() if candidate_bundle else None
        if data_dir is not None:
            shape = fleet_shape_from_data_dir(data_dir)
            if current is None or candidate is None:
                cur, cand, keys, _ = registry_from_data_dir(data_dir, str(plan.get("model")),
                                                            str(plan.get("version")), current_version)
                current, candidate = current or cur, candidate or cand
                pems += keys
        if current is None or candidate is None:
            raise RehearsalError("give --current-bundle and --candidate-bundle, or --data-dir of the server "
                                 "whose registry holds both versions")
        report = rehearse(plan, devices=devices, scenario=loaded, current_bundle=current,
                          candidate_bundle=candidate, trusted_keys=pems, fleet_shape=shape, speed=speed,
                          interval_s=interval, max_sim_s=max_hours * 3600, approve=approve, workdir=workdir,
                          progress=None if as_json else (lambda m: click.echo(m, err=True)))
    except (RehearsalError, RolloutError, ScenarioError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())
    if report.outcome != "completed":
        raise SystemExit(1)
