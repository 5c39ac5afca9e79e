"""Numbers taken from JSON someone else wrote (a server answer, a token's claims)."""

from __future__ import annotations

import math
from typing import Any


def finite_number(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else. Python's json gives bools
    (ints to isinstance), NaN and Infinity, and integers like 10**400 that float() cannot
    hold (OverflowError): each was a crash or a value that never compares as expected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
