"""Which directories `run` accepts: a checkpoint artifact or a plain Hugging Face model directory."""

from pathlib import Path

from kiln.core.artifact import is_artifact, load_artifact
from kiln.core.errors import UserInputError


def resolve_model_dir(model: str) -> Path:
    """Validate a model argument and return its directory (an artifact is checked against its manifest)."""
    path = Path(model)
    if not path.is_dir():
        raise UserInputError(
            f"model {model} is not a directory; pass a checkpoint from `kiln convert`, a Hugging Face "
            "model directory, or builtin:NAME"
        )
    if is_artifact(path):
        artifact = load_artifact(path)
        if artifact.manifest.kind != "checkpoint":
            raise UserInputError(f"{path} is a {artifact.manifest.kind} artifact; `run` needs a checkpoint here")
        return path
    if not (path / "config.json").is_file():
        raise UserInputError(f"{path} has no config.json and no kiln manifest; it is not a model directory")
    return path
