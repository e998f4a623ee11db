"""Stage options from three layers: built-in defaults, a YAML file (`--config`), then explicit flags.

CLI options default to None so that "not given" can be told apart from "given the default value";
the resolved values are what a stage's spec (and its manifest) records.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kiln.core.errors import UserInputError


def read_options_file(path: Path) -> dict[str, Any]:
    """A YAML mapping of option names (dashes or underscores) to values."""
    if not path.is_file():
        raise UserInputError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserInputError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"config file {path} must hold a mapping of option names to values")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def resolve_options(
    defaults: Mapping[str, Any], flags: Mapping[str, Any], config_file: Path | None = None
) -> dict[str, Any]:
    """defaults < config file < flags that were given (not None); unknown keys in the file are refused."""
    resolved = dict(defaults)
    if config_file is not None:
        from_file = read_options_file(config_file)
        unknown = sorted(set(from_file) - set(defaults))
        if unknown:
            known = ", ".join(sorted(defaults))
            raise UserInputError(f"config file {config_file}: unknown option(s) {', '.join(unknown)}; known: {known}")
        resolved.update(from_file)
    resolved.update({key: value for key, value in flags.items() if value is not None})
    return resolved
