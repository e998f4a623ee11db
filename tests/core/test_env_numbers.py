"""Numbers from environment variables (core/env_numbers.py): the default when unset, a warning when bad."""

import pytest

from kiln.core.env_numbers import number_from_env


@pytest.mark.parametrize(
    ("value", "expected", "warned"),
    [
        (None, 7, False),
        ("", 7, False),
        ("12", 12, False),
        ("-3", None, True),
        ("many", None, True),
        ("1.5", None, True),
    ],
)
def test_number_from_env(monkeypatch, caplog, value, expected, warned) -> None:
    if value is None:
        monkeypatch.delenv("KILN_TEST_NUMBER", raising=False)
    else:
        monkeypatch.setenv("KILN_TEST_NUMBER", value)
    got = number_from_env("KILN_TEST_NUMBER", int, 7, "a count >= 0", "the default is not used", lambda n: n >= 0)
    assert got == expected
    message = f"KILN_TEST_NUMBER={value!r} is not a count >= 0; the default is not used"
    assert (message in caplog.text) == warned
