"""Counter-based seeding: every random draw is a pure function of a tuple of integers.

``generator(seed, stream, round, client)`` gives the same ``torch.Generator`` state for the same
tuple on every run and in every process, which is what makes sampling resumable and independent of
the order in which clients are visited.
"""

from __future__ import annotations

import random

import torch

__all__ = [
    "mix", "generator", "python_rng", "uniform", "TRAIN", "EVAL", "LOCAL", "POPULATION", "CLIENTS",
    "DROPOUT", "STEPS", "BYZANTINE", "ATTACK", "PRIVACY",
]

_MASK = (1 << 64) - 1

# Stream tags keep unrelated draws independent even when their other integers coincide.
TRAIN, EVAL, LOCAL, POPULATION, CLIENTS = 1, 2, 3, 4, 5
DROPOUT, STEPS, BYZANTINE, ATTACK, PRIVACY = 6, 7, 8, 9, 10


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A 63-bit seed mixed from ``values`` (order matters)."""
    h = 0x243F6A8885A308D3
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
