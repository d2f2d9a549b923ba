"""Argument checks shared by every constructor: a ``ValueError`` naming the argument and the value."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ConfigObject", "check_int", "check_positive", "check_range"]


class ConfigObject:
    """A small hyperparameter holder (optimizer, aggregator, partitioner, fault or privacy config):
    its repr lists its attributes, so configs and checkpoint hparams read back as they were written."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


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


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> float:
    """``float(value)`` if it is a number in the interval (default ``[low, high)``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"Expected `{name}` in {interval}, got {value!r}")
    return float(value)
