"""Engine fingerprints: another architecture is refused in one sentence, other versions only warn."""

from __future__ import annotations

import logging

import pytest
import torch

from kiln.core.errors import UserInputError
from kiln.core.fingerprint import check_fingerprint, library_versions, make_fingerprint
from kiln.core.gpu_targets import KNOWN_TARGETS, current_device_target

CPU = torch.device("cpu")


def test_matching_fingerprint_passes_quietly(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        check_fingerprint(make_fingerprint(current_device_target(CPU)), CPU, "e")
    assert not caplog.records


def test_other_versions_warn(caplog) -> None:
    fingerprint = make_fingerprint(KNOWN_TARGETS["cpu"])
    fingerprint["versions"] = {**library_versions(), "torch": "1.0.0", "kiln": "0.0.1"}
    with caplog.at_level(logging.WARNING):
        check_fingerprint(fingerprint, CPU, "e")
    (record,) = caplog.records
    assert "torch 1.0.0 -> " in record.getMessage() and "kiln 0.0.1 -> " in record.getMessage()


def test_other_architecture_is_refused() -> None:
    with pytest.raises(UserInputError, match=r"built for a100-80gb \(sm80\) and cannot run on the CPU; rebuild"):
        check_fingerprint(make_fingerprint(KNOWN_TARGETS["a100-80gb"]), CPU, "e")
