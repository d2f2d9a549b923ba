"""Aggregation of stacked client updates ``{name: [m, *shape]}`` into one server pseudo-gradient."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["weighted_mean", "normalize_weights"]


def normalize_weights(weights: Tensor | None, m: int, *, like: Tensor) -> Tensor:
    """Weights ``[m]`` summing to 1 (uniform when ``weights`` is ``None``)."""
    if weights is None:
        return torch.full((m,), 1.0 / m, dtype=like.dtype, device=like.device)
    w = weights.to(dtype=like.dtype, device=like.device)
    return w / w.sum()


def weighted_mean(updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
    """``Σ_i w_i u_i / Σ_i w_i`` per parameter (plain mean when ``weights`` is ``None``)."""
    out = {}
    for name, u in updates.items():
        w = normalize_weights(weights, u.shape[0], like=u)
        out[name] = torch.tensordot(w, u, dims=([0], [0]))
    return out
