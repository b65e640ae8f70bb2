"""The `edgefleet` command's entry point: `edgefleet agent run` starts the agent without click.

A device runs `edgefleet agent run --config FILE` for months. click and the CLI's other commands
(about 1 MiB of RSS) are needed to parse two options, so this module reads those itself and
hands anything else (help, other commands, options it does not know) to the click CLI.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def parse_run_options(args: Sequence[str]) -> dict[str, str] | None:
    """`--config FILE` and `--log-level LEVEL` (also `--opt=value`), or None for anything else."""
    out = {"config": "", "log_level": "INFO"}
    names = {"--config": "config", "--log-level": "log_level"}
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name not in names:
            return None
        if not eq:
            if i + 1 >= len(args):
                return None
            value = args[i + 1]
            i += 1
        out[names[name]] = value
        i += 1
    if not out["config"] or out["log_level"].upper() not in LOG_LEVELS:
        return None
    return out


def run_agent(config_path: str, log_level: str = "INFO") -> int:
    """What `edgefleet agent run` does: load the config, serve until SIGTERM. Exit status."""
    from edge_agent.config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from edge_agent.service import run_service

    try:
        run_service(config)
    except OSError as exc:
        print(f"Error: cannot start the agent: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None, prog_name: str | None = None) -> None:
    """`edgefleet ...`: the agent's run fast path, else the click CLI."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:2] == ["agent", "run"] and (options := parse_run_options(args[2:])) is not None:
        sys.exit(run_agent(options["config"], options["log_level"]))
    from edge_agent.entry import main as cli

    cli(args, prog_name=prog_name)
