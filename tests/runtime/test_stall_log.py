"""KILN_LOG_STALLS diagnostics: the description of a Triton specialisation, and the compile log on a GPU."""

from __future__ import annotations

import logging

import pytest
import torch

from kiln.runtime.stall_log import describe_specialisation


def test_specialisation_names_the_classes_that_compile_anew() -> None:
    # Triton's compile arguments: constexpr values and divisibility attributes keyed by argument path.
    names = ["x_ptr", "n", "stride", "BLOCK"]
    constants = {(1,): 1, (3,): 64}
    attrs = {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
    assert describe_specialisation(names, {"BLOCK"}, constants, attrs) == "x_ptr%16, n=1*, stride%16, BLOCK=64"
    assert describe_specialisation(names, {"BLOCK"}, {(3,): 64}, {}) == "BLOCK=64"


@pytest.mark.gpu
def test_each_new_specialisation_is_logged(caplog) -> None:
    from specialised_kernel import add_one_kernel

    from kiln.runtime.stall_log import log_kernel_compiles

    log_kernel_compiles()
    x = torch.zeros(64, device="cuda")
    with caplog.at_level(logging.WARNING, logger="kiln.runtime.stall_log"):
        for n in (1, 32, 7, 5):  # classes: == 1, divisible by 16, other, other again (no new compile)
            add_one_kernel[(1,)](x, n, BLOCK=64)
    torch.cuda.synchronize()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3, lines
    assert all(line.startswith("compiled kernel add_one_kernel in ") for line in lines)
    assert lines[0].endswith("x_ptr%16, n=1*, BLOCK=64") and lines[1].endswith("x_ptr%16, n%16, BLOCK=64")
    assert lines[2].endswith("x_ptr%16, BLOCK=64")
    assert x[:32].tolist() == [4.0] + [3.0] * 4 + [2.0] * 2 + [1.0] * 25
