"""`edgefleet release ...`: build the wheel and the device wheelhouses."""

from __future__ import annotations

from pathlib import Path

import click

from edge_agent.release.platforms import DEFAULT_PYTHON, SUPPORTED
from edge_agent.release.wheelhouse import CHECKSUMS, ReleaseError, build_release


@click.group()
def release() -> None:
    """Build what devices install: the edgefleet wheel and offline wheelhouses."""


@release.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("dist"),
              show_default=True, help="Where the wheel and wheelhouse/<cpXY-machine>/ go.")
@click.option("--machine", "machines", multiple=True, type=click.Choice(sorted(SUPPORTED)),
              help="Device platform (uname -m); repeatable. Default: all supported.")
@click.option("--python", "python", default=DEFAULT_PYTHON, show_default=True,
              help="The devices' Python version (Debian 12 / Raspberry Pi OS bookworm: 3.11).")
@click.option("--wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Package this edgefleet wheel instead of building one from the checkout.")
@click.option("--no-pin", is_flag=True,
              help="Take the newest matching versions instead of the ones installed here.")
def build(out_dir: Path, machines: tuple[str, ...], python: str, wheel: Path | None, no_pin: bool) -> None:
    """Build the edgefleet wheel and one wheelhouse per device platform, with SHA256SUMS.

    Copy OUT/wheelhouse to the fleet server's data dir (or build there with --out DATA_DIR):
    devices install from it with the command `edgefleet server add-device` prints.
    """
    try:
        houses = build_release(out_dir, list(machines) or None, python, wheel=wheel, pin=not no_pin)
    except (ReleaseError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    for house in houses:
        size = sum(p.stat().st_size for p in house.path.glob("*.whl"))
        click.echo(f"{house.path}: {len(house.wheels)} wheels, {size / 2**20:.1f} MiB, {CHECKSUMS}")
