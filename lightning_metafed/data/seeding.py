"""Counter-based seeding: every random draw is a pure function of a tuple of integers.

``generator(seed, stream, round, client)`` gives the same ``torch.Generator`` state for the same
tuple on every run and in every process, which is what makes sampling resumable and independent of
the order in which clients are visited.

:func:`hash_state` / :func:`extend` / :func:`finish` compute the same :func:`mix` on int64 tensors,
so a whole round's draws (every sampled client, every example) are one batch of tensor operations
whose values equal the scalar ``mix`` of each tuple (two's-complement int64 arithmetic wraps exactly
as the 64-bit unsigned arithmetic of :func:`mix`).
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

__all__ = [
    "mix", "generator", "python_rng", "uniform", "hash_state", "extend", "finish", "unit", "unit_tensor",
    "TRAIN", "EVAL", "LOCAL", "POPULATION", "CLIENTS", "DROPOUT", "STEPS", "BYZANTINE", "ATTACK", "PRIVACY",
    "CLIP_COUNT", "COMPRESS",
]

_MASK = (1 << 64) - 1
_START = 0x243F6A8885A308D3

# Stream tags keep unrelated draws independent even when their other integers coincide.
TRAIN, EVAL, LOCAL, POPULATION, CLIENTS = 1, 2, 3, 4, 5
DROPOUT, STEPS, BYZANTINE, ATTACK, PRIVACY = 6, 7, 8, 9, 10
CLIP_COUNT, COMPRESS = 11, 12


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A 63-bit seed mixed from ``values`` (order matters)."""
    h = _START
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK))
    return h & ((1 << 63) - 1)


def generator(*values: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``mix(*values)``."""
    return torch.Generator().manual_seed(mix(*values))


def python_rng(*values: int) -> random.Random:
    """A ``random.Random`` seeded with ``mix(*values)`` (O(m) sampling from huge ranges)."""
    return random.Random(mix(*values))


def uniform(*values: int) -> float:
    """A number in ``[0, 1)`` that is a pure function of ``values``."""
    return mix(*values) / float(1 << 63)


def unit(h: int) -> float:
    """A number in ``[0, 1)`` from the top 53 bits of a 63-bit :func:`mix` value (exact in float64)."""
    return (h >> 10) * 2.0**-53


# ------------------------------------------------------------------ the same mixing on int64 tensors


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _M1, _M2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _splitmix64_tensor(x: Tensor) -> Tensor:
    """:func:`_splitmix64` on int64 values (a new tensor; in-place steps keep large draws cheap)."""
    x = x + _GOLDEN
    t = torch.empty_like(x)
    for shift, factor in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(x, shift, out=t)
        t &= (1 << (64 - shift)) - 1  # a logical (unsigned) shift
        x ^= t
        if factor is not None:
            x *= factor
    return x


def extend(state: Tensor | int, value: Tensor | int) -> Tensor | int:
    """The mixing state after one more value (``state`` from :func:`hash_state`); tensors broadcast."""
    if isinstance(state, Tensor) or isinstance(value, Tensor):
        if not isinstance(state, Tensor):
            state = torch.tensor(_signed(state), dtype=torch.long)
        return _splitmix64_tensor(state ^ value)
    return _signed(_splitmix64((state & _MASK) ^ (int(value) & _MASK)))


def hash_state(*values: Tensor | int) -> Tensor | int:
    """The unfinished mixing state of ``values`` (ints or int64 tensors, broadcast together):
    ``finish(hash_state(*values))`` equals ``mix(*values)`` element by element."""
    state: Tensor | int = _signed(_START)
    for v in values:
        state = extend(state, v)
    return state


def finish(state: Tensor | int) -> Tensor | int:
    """The 63-bit seed of a mixing state (``mix``'s result; non-negative)."""
    return state & ((1 << 63) - 1)


def unit_tensor(h: Tensor) -> Tensor:
    """:func:`unit` of 63-bit values: float64 numbers in ``[0, 1)``."""
    return (h >> 10).double() * 2.0**-53
