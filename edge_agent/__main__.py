"""`python -m edge_agent ...` is `edgefleet agent ...` (what tests start). `run` starts the
agent without click, as `edgefleet agent run` does (edge_agent.launch)."""

import sys

from edge_agent.launch import parse_run_options, run_agent

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["run"] and (options := parse_run_options(args[1:])) is not None:
        sys.exit(run_agent(options["config"], options["log_level"]))
    from edge_agent.cli import agent

    agent(prog_name="python -m edge_agent")
