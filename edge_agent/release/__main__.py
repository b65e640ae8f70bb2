"""`python -m edge_agent.release build ...` is `edgefleet release build ...`."""

from edge_agent.release.cli import release

if __name__ == "__main__":
    release(prog_name="python -m edge_agent.release")
