"""Kiln: an LLM inference toolchain for NVIDIA GPUs.

`from kiln import LLM, SamplingParams` is the offline API; both load lazily, so `import kiln` (and
the CLI's start) stays fast.
"""

from typing import Any

from kiln.core.version import __version__

__all__ = ["LLM", "RequestOutputKind", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from kiln.runtime.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kiln.runtime.sampling_params import SamplingParams

        return SamplingParams
    if name == "RequestOutputKind":
        from kiln.runtime.outputs import RequestOutputKind

        return RequestOutputKind
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
