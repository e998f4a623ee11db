"""Host-to-device copies for the step loop that never make the host wait for the GPU.

A copy from pageable host memory to the GPU synchronises the stream: the host would stop until every
kernel queued before it finished, which serialises host work and GPU work. Going through pinned memory
lets the copy be queued like a kernel. Tables are built in numpy: converting a Python list of lists
element by element cost ~10 ms per decode step at batch 256 with 8k-token contexts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

_NUMPY_DTYPES = {torch.int32: np.int32, torch.int64: np.int64, torch.float32: np.float32}


ROW_ALIGNMENT_BYTES = 16


def to_device(
    data: Sequence | np.ndarray, dtype: torch.dtype, device: torch.device | str, align_rows: bool = False
) -> Tensor:
    """A device tensor of `data` (a copy), queued without making the host wait for the device's stream.

    align_rows: 2-D data whose rows go to kernels one by one. Each row then starts 16-byte aligned (the
    result is a view with a padded row stride), since Triton compiles a kernel variant per pointer alignment:
    packed, the second of two int64 rows of an odd length (positions in a step of 1,001 tokens, a batch of
    one's sampling keys) was misaligned, and such steps compiled kernels anew while serving. Not for arrays a
    kernel indexes as one contiguous block (the prefill attention's tile list).
    """
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    host = torch.from_numpy(np.array(data, dtype=numpy_dtype)) if numpy_dtype else torch.tensor(data, dtype=dtype)
    width = host.shape[-1] if align_rows and host.dim() == 2 else 0
    per_row = ROW_ALIGNMENT_BYTES // host.element_size()
    if width % per_row and host.shape[0] > 1:
        padded = torch.zeros(host.shape[0], -(-width // per_row) * per_row, dtype=host.dtype)
        padded[:, :width] = host
        host = padded
    if torch.device(device).type == "cuda":
        copied = host.pin_memory().to(device, non_blocking=True)
    else:
        copied = host.to(device)
    return copied[:, :width] if width and copied.shape[1] != width else copied


def pad_rows(rows: Sequence[Sequence[int]], num_rows: int, width: int, fill: int, dtype: torch.dtype) -> np.ndarray:
    """[num_rows, width] array: row i starts with rows[i], the rest (and rows past len(rows)) is `fill`."""
    table = np.full((num_rows, width), fill, dtype=_NUMPY_DTYPES[dtype])
    for index, row in enumerate(rows):
        table[index, : len(row)] = row
    return table


def copy_into(target: Tensor, source: np.ndarray) -> None:
    """Write a host array into (a view of) a preallocated device tensor, queued on the stream."""
    host = torch.from_numpy(source)
    if target.device.type == "cuda":
        host = host.pin_memory()
    target.copy_(host, non_blocking=True)
