"""Which models `run` and `LLM` accept: a checkpoint artifact, a Hugging Face directory, or builtin:NAME."""

import logging
import os
from pathlib import Path

from kiln.core.artifact import is_artifact, load_artifact
from kiln.core.builtin_models import is_builtin
from kiln.core.errors import UserInputError

logger = logging.getLogger(__name__)


def kiln_cache_dir() -> Path:
    """kiln's cache: $KILN_CACHE_DIR, else ~/.cache/kiln."""
    return Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln")


def resolve_dummy_model(spec: str, quantization: str | None = None) -> Path:
    """A config-only model directory (in kiln's cache) for a preset name or a config.json path."""
    from kiln.models.presets import dummy_model_dir

    return dummy_model_dir(spec, kiln_cache_dir(), quantization)


def builtin_cache_dir(source: str) -> Path:
    """Where a built-in model's converted checkpoint is kept (under kiln_cache_dir())."""
    root = kiln_cache_dir()
    return root / "checkpoints" / source.removeprefix("builtin:")


def resolve_model_source(model: str) -> Path:
    """The checkpoint directory behind a model argument; a built-in is converted once into the cache."""
    if not is_builtin(model):
        return resolve_model_dir(model)
    cached = builtin_cache_dir(model)
    if not is_artifact(cached):
        # The one place the runtime reaches into `convert`, lazily: a built-in ships as a GGUF file
        # and must become a checkpoint once before anything can run it.
        from kiln.convert.stage import ConvertSpec, convert

        logger.info("first use of %s: converting it into %s", model, cached)
        convert(ConvertSpec(source=model, output=cached, force=True))
    return resolve_model_dir(str(cached))


def resolve_model_dir(model: str) -> Path:
    """Validate a model directory (an artifact is checked against its manifest) and return it."""
    path = Path(model)
    if not path.is_dir():
        raise UserInputError(
            f"model {model} is not a directory; pass a checkpoint from `kiln convert`, a Hugging Face "
            "model directory, or builtin:NAME"
        )
    if is_artifact(path):
        artifact = load_artifact(path)
        if artifact.manifest.kind not in ("checkpoint", "engine"):
            raise UserInputError(
                f"{path} is a {artifact.manifest.kind} artifact; a checkpoint or an engine is needed here"
            )
        return path
    if not (path / "config.json").is_file():
        raise UserInputError(f"{path} has no config.json and no kiln manifest; it is not a model directory")
    return path
