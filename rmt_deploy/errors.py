"""The project's error types: each is a user error with a one-line message that says
what is wrong and how to fix it. Anything else escaping is a bug."""


class RmtError(Exception):
    """Base class of every error caused by input (files, options, API arguments)."""


class CheckpointError(RmtError):
    """A checkpoint cannot be read or does not match the model it should hold."""


class ConfigError(RmtError):
    """An RMT configuration or option is invalid."""


class InputError(RmtError):
    """Input text or token ids cannot be processed."""


class ManifestError(RmtError):
    """An export folder or manifest is missing, corrupt or inconsistent."""


class ValidationError(RmtError):
    """An exported graph does not reproduce the reference within tolerance."""


class BackendError(RmtError):
    """A runtime backend is unavailable or cannot run the model."""


class NumericError(RmtError):
    """A model produced NaN or infinity: its weights, export or state are damaged."""
