"""Numbers read from environment variables (the KILN_* tuning switches): unset, a value, or a warning."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

Number = TypeVar("Number", int, float)


def number_from_env(
    name: str,
    parse: Callable[[str], Number],
    default: Number | None,
    expected: str,
    otherwise: str,
    accept: Callable[[Number], bool] = lambda value: True,
) -> Number | None:
    """`name` parsed by `parse`; `default` when unset or empty; None, with a warning naming what was `expected`
    and what happens `otherwise`, when it does not parse or `accept` refuses it."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = parse(value)
    except ValueError:
        number = None
    if number is None or not accept(number):
        logger.warning("%s=%r is not %s; %s", name, value, expected, otherwise)
        return None
    return number
