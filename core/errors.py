"""Kiln's exception types: each carries the exit code the CLI returns and a message saying what to do."""


class KilnError(Exception):
    """Base of every error meant for the user (the CLI prints it as one red line, no traceback)."""

    exit_code: int = 1


class UserInputError(KilnError):
    """Bad input from the user: a wrong path, flag value or source format."""

    exit_code = 2


class ConfigError(UserInputError):
    """A model config (config.json) is missing, malformed or describes something we do not support."""


class UnsupportedArchitectureError(ConfigError):
    """The model architecture is not one kiln implements."""


class SourceError(UserInputError):
    """A conversion source is unusable: pickle checkpoint, corrupt safetensors, unreadable GGUF."""


class OutputExistsError(UserInputError):
    """The output directory exists and is not empty, and --force was not given."""


class WeightMappingError(KilnError):
    """Checkpoint tensors do not cover the model's parameters exactly (missing, unused or wrong shape)."""

    exit_code = 2


class ArtifactError(KilnError):
    """An artifact directory is invalid: no manifest, wrong kind or schema, missing or tampered files."""

    exit_code = 2


class QualityGateError(KilnError):
    """A quantized model lost more quality than the gate allows; nothing was written."""

    exit_code = 3
