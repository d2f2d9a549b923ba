"""Checks and resolution of the data module's size arguments (an int count or a fraction)."""

from __future__ import annotations

from typing import Any

__all__ = ["Size", "check_fractions", "check_size", "resolve_size"]

#: A number of examples (``int >= 1``) or a fraction of a client's examples (``float`` in ``(0, 1)``).
Size = int | float


def check_size(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool):
        raise ValueError(f"Expected `{name}` to be an int >= 1 or a fraction in (0, 1), got {value!r}")
    if isinstance(value, int) and value >= 1:
        return
    if isinstance(value, float) and 0.0 < value < 1.0:
        return
    raise ValueError(f"Expected `{name}` to be an int >= 1 or a fraction in (0, 1), got {value!r}")


def check_fractions(name: str, value: Any) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(v) for v in value)
    except TypeError:
        fractions = ()
    if len(fractions) != 3 or any(not (f >= 0) for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise ValueError(
            f"Expected `{name}` to be three fractions (train, val, test) >= 0 summing to 1 with train > 0, got {value!r}"
        )
    return fractions  # type: ignore[return-value]


def resolve_size(value: Size, n: int) -> int:
    return value if isinstance(value, int) else max(1, int(round(value * n)))
