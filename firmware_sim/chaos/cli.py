"""`edgefleet sim chaos`: run a chaos plan from the command line and print its report."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from firmware_sim.chaos.driver import run_chaos
from firmware_sim.chaos.plan import ChaosError, ChaosPlan


@click.command("chaos")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seeds which devices get which faults and the whole timeline; the same seed replays the run.")
@click.option("--devices", type=click.IntRange(10, 5_000), default=200, show_default=True,
              help="Simulated devices (real agents, one MQTT connection each).")
@click.option("--duration", type=click.FloatRange(min=10.0), default=300.0, show_default=True,
              help="Seconds of chaos (real time: the fleet server runs on the real clock).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the server's data dir and the devices here (default: a temporary dir, removed).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def chaos_command(seed: int, devices: int, duration: float, workdir: Path | None, as_json: bool) -> None:
    """Run a rollout on a simulated fleet while processes die, devices fail and passwords rotate; check invariants.

    Exits 0 when every invariant holds, 1 when one does not.
    """
    plan = ChaosPlan(seed=seed, devices=devices, duration=duration)
    echo = (lambda m: click.echo(m, err=True)) if not as_json else (lambda m: None)
    try:
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="edgefleet-chaos-") as tmp:
                report = run_chaos(plan, Path(tmp), say=echo)
        else:
            report = run_chaos(plan, workdir, say=echo)
    except ChaosError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.table())
    if not report.passed:
        raise SystemExit(1)
