"""The `edgefleet` command: a click group that loads each sub-group from its package on first use.

Lazy loading keeps layering intact and lets a device with only the `agent` extra start
`edgefleet agent ...` without scikit-learn, Flask or the simulator installed.
"""

from __future__ import annotations

import importlib

import click

# name -> (module:attribute, extra that provides it, one-line help shown by `edgefleet --help`)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "model": ("model_tools.cli:model", "tools", "Convert, quantize, sign and verify model bundles."),
    "agent": ("edge_agent.cli:agent", "agent", "Run the on-device agent and talk to it."),
    "release": ("edge_agent.release.cli:release", "agent", "Build the wheel and the devices' offline wheelhouses."),
    "server": ("fleet_server.cli:server", "server", "Run and administer the fleet server."),
    "sim": ("firmware_sim.cli:sim", "sim", "Simulate device fleets and rehearse rollouts."),
    "demo": ("firmware_sim.demo:demo_command", "sim", "Run the whole system on this machine."),
}


class LazyGroup(click.Group):
    """A group whose sub-commands are imported by name when first needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        target, extra, _ = SUBCOMMANDS[cmd_name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise click.ClickException(
                f"'edgefleet {cmd_name}' needs the '{extra}' extra: "
                f'pip install "edgefleet[{extra}]" ({exc})'
            ) from exc
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing must not import anything: a device lacks the server and tools extras.
        rows = [(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="edgefleet")
def main() -> None:
    """edgefleet: signed ONNX model bundles, on-device serving, fleet drift and canary rollouts."""
