"""to_device: the values, and rows that start 16-byte aligned (Triton compiles a kernel per pointer alignment)."""

import numpy as np
import pytest
import torch

from kiln.core.host_transfer import to_device


@pytest.mark.parametrize(
    "dtype,width", [(torch.int64, 1001), (torch.int64, 1), (torch.int64, 4), (torch.int32, 7), (torch.float32, 6)]
)
def test_rows_start_aligned_and_hold_the_data(dtype, width) -> None:
    rows = np.arange(3 * width).reshape(3, width)
    staged = to_device(rows.tolist(), dtype, "cpu", align_rows=True)
    assert staged.shape == (3, width) and staged.dtype == dtype
    assert torch.equal(staged, torch.tensor(rows, dtype=dtype))
    assert all(row.data_ptr() % 16 == 0 and row.is_contiguous() for row in staged)


def test_packed_unless_rows_are_asked_for() -> None:
    # The prefill attention indexes its [2, num_tiles] tile list as one contiguous block
    assert to_device([[1, 2, 3], [4, 5, 6]], torch.int32, "cpu").is_contiguous()
    assert to_device([1, 2, 3], torch.int64, "cpu", align_rows=True).is_contiguous()
    single = to_device([[1, 2, 3]], torch.int64, "cpu", align_rows=True)
    assert single.is_contiguous() and single.tolist() == [[1, 2, 3]]
