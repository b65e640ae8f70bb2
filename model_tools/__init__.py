"""model_tools."""
