"""Argument checks shared by every constructor: a ``ValueError`` naming the argument and the value."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_int", "check_positive"]


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` if it is an ``int`` (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"Expected `{name}` to be an integer{bound}, got {value!r}")
    return value


def check_positive(name: str, value: Any, allow_zero: bool = False) -> float:
    """``float(value)`` if it is a finite number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"Expected `{name}` to be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)
