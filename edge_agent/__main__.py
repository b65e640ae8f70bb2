"""`python -m edge_agent ...` is `edgefleet agent ...` (what systemd and tests start)."""

from edge_agent.cli import agent

if __name__ == "__main__":
    agent(prog_name="python -m edge_agent")
