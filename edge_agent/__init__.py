"""edge_agent: serve signed ONNX bundles on a device, report telemetry, apply updates safely.

The agent imports numpy, onnxruntime, paho-mqtt, cryptography, prometheus-client and msgspec
only: never scikit-learn, skl2onnx, Flask or the fleet server.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefleet")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from edge_agent.agent import Agent, Prediction  # noqa: E402
from edge_agent.config import AgentConfig, ConfigError, config_from_dict, load_config  # noqa: E402
from edge_agent.feedback import FeedbackResult  # noqa: E402
from edge_agent.validation import RequestError  # noqa: E402

__all__ = [
    "Agent",
    "AgentConfig",
    "ConfigError",
    "FeedbackResult",
    "Prediction",
    "RequestError",
    "__version__",
    "config_from_dict",
    "load_config",
]
