"""Stacked client uploads ``{name: [m, *shape]}``, the input of every aggregation rule: the argument
checks and per-client views that :mod:`~lightning_metafed.functional.aggregate` and
:mod:`~lightning_metafed.functional.robust` share, and each client's norm over all of its parameters
together with clipping to a norm bound (Sun, Kairouz, Suresh & McMahan, 2019, "Can You Really
Backdoor Federated Learning?").

:func:`update_norms` and :func:`clip_to_norm` are public through :mod:`lightning_metafed.functional`
(and :mod:`~lightning_metafed.functional.aggregate`); the checks and views are internal to
:mod:`lightning_metafed.functional`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_metafed.functional.client_task import Params

__all__ = ["check_count", "check_positive", "clip_to_norm", "num_clients", "per_client", "update_norms"]


def check_positive(name: str, value: object) -> None:
    """Raise unless ``value`` is a finite real number ``> 0`` (a Python or NumPy scalar, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be a finite number > 0, got {value!r}")


def check_count(name: str, value: object, minimum: int) -> None:
    """Raise unless ``value`` is an ``int`` (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}, got {value!r}")


def _first(updates: Mapping[str, Tensor]) -> Tensor:
    """The first parameter's stacked uploads; ``updates`` must hold at least one parameter."""
    if not updates:
        raise ValueError("Expected `updates` to hold at least one parameter, got an empty mapping")
    return next(iter(updates.values()))


def num_clients(updates: Mapping[str, Tensor]) -> int:
    """``m``, the clients stacked along dim 0 of every upload; at least one parameter and one client."""
    m = _first(updates).shape[0]
    if m < 1:
        raise ValueError(f"Expected `updates` to stack at least one client along dim 0, got {m}")
    return m


def per_client(u: Tensor) -> Tensor:
    """Stacked uploads ``[m, *shape]`` as ``[m, numel]`` (also for a scalar parameter, ``[m]``)."""
    return u.reshape(u.shape[0], math.prod(u.shape[1:]))


def update_norms(updates: Mapping[str, Tensor]) -> Tensor:
    """Each client's update norm over all parameters together, ``‖Δ_i‖ = sqrt(Σ_p ‖Δ_i^p‖²)``: ``[m]``.

    The squares are summed in float64 and the norms returned in the first parameter's dtype.

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
    """
    dtype = _first(updates).dtype
    return torch.sqrt(sum((per_client(u).double() ** 2).sum(1) for u in updates.values())).to(dtype)


def clip_to_norm(updates: Mapping[str, Tensor], max_norm: float) -> tuple[Params, Tensor]:
    """Each client's update scaled down to norm ``max_norm`` at most, ``Δ_i · min(1, C / ‖Δ_i‖)``
    (all parameters together; Sun et al., 2019), and the norms ``‖Δ_i‖`` before clipping.

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
        max_norm: ``C``, the largest norm a client's clipped update may have (``> 0``).

    Example:
        The norm is over all parameters together: client 0's ``(3, 0, 4)`` has norm 5.

        >>> import torch
        >>> from lightning_metafed.functional import clip_to_norm
        >>> updates = {"w": torch.tensor([[3.0, 0.0], [0.0, 0.5]]), "b": torch.tensor([[4.0], [0.0]])}
        >>> clipped, norms = clip_to_norm(updates, max_norm=1.0)
        >>> norms
        tensor([5.0000, 0.5000])
        >>> clipped["w"][0], clipped["b"][0]  # client 0 scaled by 1/5; client 1 is unchanged
        (tensor([0.6000, 0.0000]), tensor([0.8000]))
    """
    check_positive("max_norm", max_norm)
    norms = update_norms(updates)
    factor = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return {k: u * factor.view(-1, *([1] * (u.dim() - 1))) for k, u in updates.items()}, norms
