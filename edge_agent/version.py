"""The installed edgefleet version, as the agent reports it in `reported.agent_version`."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefleet")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
