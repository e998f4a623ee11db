"""Kiln: an LLM inference toolchain for NVIDIA GPUs."""

from kiln.core.version import __version__

__all__ = ["__version__"]
