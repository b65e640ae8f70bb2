"""Errors a user can cause, in one light module (stdlib only) so the agent can catch them too."""

from __future__ import annotations


class ModelToolsError(ValueError):
    """Base of every model_tools error; the message says what was wrong and what to do."""


class InputDataError(ModelToolsError):
    """Sample, validation or reference data that does not fit the model."""


class EstimatorLoadError(ModelToolsError):
    """A model file that cannot be loaded safely (untrusted types, pickle without consent)."""


class ConversionError(ModelToolsError):
    """An estimator that skl2onnx cannot convert, or that is not fitted."""


class BundleError(ModelToolsError):
    """A bundle that cannot be used."""


class UnsafeBundleError(BundleError):
    """The zip itself is dangerous or broken: zip-slip, links, duplicates, bombs, truncation."""


class TamperedBundleError(BundleError):
    """A member's sha256 differs from the manifest, or a member is missing or extra."""


class SignatureError(BundleError):
    """No signature, an invalid one, or one from a key that is not trusted."""
