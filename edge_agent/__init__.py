"""edge_agent: serve signed ONNX bundles on a device, report telemetry, apply updates safely.

The agent imports numpy, onnxruntime, paho-mqtt and msgspec only: never scikit-learn,
skl2onnx, Flask or the fleet server. cryptography verifies signatures in a short-lived child
process (edge_agent.signatures); prometheus-client only backs `Agent.registry`.
"""

from edge_agent.agent import Agent, Prediction
from edge_agent.config import AgentConfig, ConfigError, config_from_dict, load_config
from edge_agent.feedback import FeedbackResult
from edge_agent.validation import RequestError
from edge_agent.version import __version__

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
