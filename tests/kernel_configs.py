"""Launch settings of the Triton kernels changed for one test, then restored (shared by the kernel tests)."""

from __future__ import annotations

import contextlib
import os

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def dense_gemv_config(**overrides):
    """DENSE_GEMV_CONFIG with `overrides` (small tiles, many programs in the interpreter), restored after."""
    from kiln.kernels.triton_dense_gemv import DENSE_GEMV_CONFIG

    if INTERPRETER:  # one "SM" there: many programs per SM so that tiles still split along K
        overrides = {"block_n": 32, "block_k": 32, "programs_per_sm": 8, **overrides}
    saved = dict(DENSE_GEMV_CONFIG)
    DENSE_GEMV_CONFIG.update(overrides)
    try:
        yield
    finally:
        DENSE_GEMV_CONFIG.clear()
        DENSE_GEMV_CONFIG.update(saved)
