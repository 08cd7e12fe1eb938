"""Argument checks shared by the electronic modules.

They raise :class:`ArgumentError`, whose message says what was expected and what
was received; callers with their own error classes (the ASE calculator) re-raise
it as theirs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .dense import ElectronicError

__all__ = ["ArgumentError", "check_positive", "check_choice"]


class ArgumentError(ElectronicError):
    """A bad argument or option (k-points, DOS grid, KPM options...)."""


def check_positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> None:
    """Require a finite number (``integer``: an int, bools excluded) > 0 (or >= 0)."""
    ok_type = (
        isinstance(value, (int, np.integer))
        if integer
        else isinstance(value, (int, float, np.integer, np.floating))
    )
    if (
        isinstance(value, bool)
        or not ok_type
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        kind = "an integer" if integer else "a finite number"
        raise ArgumentError(
            f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}"
        )


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Require ``value`` to be one of ``choices`` ("name must be 'a', 'b' or 'c', got ...")."""
    if value not in choices:
        expected = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ArgumentError(f"{name} must be {expected}, got {value!r}")
