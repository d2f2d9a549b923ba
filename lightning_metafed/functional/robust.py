"""Robust aggregation rules: what a minority of bad (Byzantine) clients can do to a round is bounded
by order statistics of the clients' values or by the distances between their whole updates.

- :func:`coordinate_median` and :func:`trimmed_mean`: coordinate-wise robust rules (Yin, Chen,
  Ramchandran & Bartlett, 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates").
- :func:`bucket_means`: means of consecutive groups of clients, the input of a robust rule under
  bucketing (Karimireddy, He & Jaggi, 2022, "Byzantine-Robust Learning on Heterogeneous Datasets
  via Bucketing").
- :func:`krum`, :func:`multi_krum` (Blanchard, El Mhamdi, Guerraoui & Stainer, 2017, "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent"), :func:`bulyan` (El Mhamdi,
  Guerraoui & Rouault, 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium") and
  :func:`centered_clip` (Karimireddy, He & Jaggi, 2021, "Learning from History for Byzantine Robust
  Optimization"): rules that pick or clip whole client updates by their distances to each other.

Pure functions on stacked uploads ``{name: [m, *shape]}`` (no state, no randomness), the norm and
distance of a client's update taken over all of its parameters together. Every name here is also
importable from :mod:`lightning_metafed.functional` and :mod:`lightning_metafed.functional.aggregate`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_metafed.functional.client_task import Params
from lightning_metafed.functional.stacked import check_count, check_positive, clip_to_norm, num_clients, per_client

__all__ = [
    "bucket_means",
    "bulyan",
    "centered_clip",
    "coordinate_median",
    "krum",
    "krum_scores",
    "multi_krum",
    "trim_count",
    "trimmed_mean",
]


def coordinate_median(updates: Mapping[str, Tensor]) -> Params:
    """Coordinate-wise median of the clients' updates (unweighted; Yin et al., 2018).

    With an even number ``m`` of clients it is the mean of the two middle values,
    ``(s_{⌊(m-1)/2⌋} + s_{⌊m/2⌋}) / 2`` of the sorted values ``s`` (so two clients give their mean,
    not the lower one as ``torch.median`` would).

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.

    Example:
        >>> import torch
        >>> from lightning_metafed.functional import coordinate_median
        >>> coordinate_median({"w": torch.tensor([[1.0, 5.0], [2.0, -1.0], [9.0, 0.0]])})
        {'w': tensor([2., 0.])}
        >>> coordinate_median({"w": torch.tensor([[1.0], [2.0]])})  # two clients: their mean
        {'w': tensor([1.5000])}
    """
    m = num_clients(updates)
    out = {}
    for name, u in updates.items():
        s = torch.sort(u, dim=0).values
        out[name] = (s[(m - 1) // 2] + s[m // 2]) / 2
    return out


def trim_count(m: int, trim: float) -> int:
    """``k = ⌊trim·m⌋``, the clients :func:`trimmed_mean` drops from each end of ``m`` values, computed
    as ``int(trim·m + 1e-9)`` so that an inexact product (``0.29 · 100`` is ``28.999…``) still gives
    ``⌊trim·m⌋``."""
    return int(trim * m + 1e-9)


def trimmed_mean(updates: Mapping[str, Tensor], trim: float) -> Params:
    """Coordinate-wise ``trim``-trimmed mean (unweighted; Yin et al., 2018): per coordinate, drop the
    ``k = ⌊trim·m⌋`` largest and ``k`` smallest client values and average the other ``m - 2k``.

    ``k`` is ``trim_count`` (``int(trim·m + 1e-9)``, so that an inexact product such as
    ``0.29 · 100 = 28.999…`` still trims ``⌊trim·m⌋``). When ``m - 2k < 1`` (tiny rounds) the
    :func:`coordinate_median` is returned instead. ``trim`` is in ``[0, 0.5)``; ``0`` is the mean.

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
        trim: the fraction of clients dropped at each end, in ``[0, 0.5)``.
    """
    if isinstance(trim, bool) or not isinstance(trim, numbers.Real) or not 0 <= trim < 0.5:
        raise ValueError(f"Expected `trim` in [0, 0.5), got {trim!r}")
    m = num_clients(updates)
    k = trim_count(m, trim)
    if m - 2 * k < 1:
        return coordinate_median(updates)
    return {name: torch.sort(u, dim=0).values[k : m - k].mean(0) for name, u in updates.items()}


def bucket_means(updates: Mapping[str, Tensor], bucket_size: int) -> Params:
    """Means of consecutive groups of ``bucket_size`` clients, ``[⌈m / bucket_size⌉, *shape]`` per
    parameter (Karimireddy et al., 2022); the last group holds the remaining ``m mod bucket_size``
    clients when that is not zero. A robust rule is then applied to these means.

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
        bucket_size: how many consecutive clients each group averages (``>= 1``).
    """
    check_count("bucket_size", bucket_size, 1)
    return {
        name: torch.stack([b.mean(0) for b in torch.split(u, bucket_size, dim=0)]) for name, u in updates.items()
    }


def _flat(updates: Mapping[str, Tensor]) -> Tensor:
    """``[m, total numel]`` float64: each client's update over all parameters, in the mapping's order."""
    return torch.cat([per_client(u).double() for u in updates.values()], dim=1)


def _check_byzantine(num_byzantine: int) -> None:
    check_count("num_byzantine", num_byzantine, 0)


def krum_scores(updates: Mapping[str, Tensor], num_byzantine: int) -> Tensor:
    """``[m]`` float64 Krum scores (Blanchard et al., 2017): client ``i``'s sum of squared distances
    (over all parameters together) to its ``k = m − f − 2`` nearest other clients, ``f =
    num_byzantine``; ``k`` is clamped to ``[1, m − 1]`` in rounds too small for ``f``.

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
        num_byzantine: ``f``, the Byzantine clients a round is assumed to hold (``>= 0``).
    """
    _check_byzantine(num_byzantine)
    num_clients(updates)
    return _scores(_squared_distances(updates), num_byzantine)


def _squared_distances(updates: Mapping[str, Tensor]) -> Tensor:
    """``[m, m]`` float64 squared distances between clients, exact, one ``[m, numel]`` at a time."""
    flat = _flat(updates)
    return torch.stack([(flat - row).pow(2).sum(1) for row in flat])


def _scores(dist: Tensor, num_byzantine: int) -> Tensor:
    """Krum scores from the squared distances ``[m, m]`` of the clients being scored."""
    m = dist.shape[0]
    if m == 1:
        return torch.zeros(1, dtype=torch.float64)
    k = min(max(m - num_byzantine - 2, 1), m - 1)
    others = dist + torch.diag(torch.full((m,), math.inf, dtype=dist.dtype))
    return torch.sort(others, dim=1).values[:, :k].sum(1)


def _rows(updates: Mapping[str, Tensor], index: Tensor) -> Params:
    return {name: u[index.to(u.device)] for name, u in updates.items()}


def _lowest(scores: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` lowest scores (ties: lower index first)."""
    return torch.sort(scores, stable=True).indices[:count]


def krum(updates: Mapping[str, Tensor], num_byzantine: int) -> Params:
    """The one client update with the lowest :func:`krum_scores` (ties: the lowest index).

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
        num_byzantine: ``f``, the Byzantine clients a round is assumed to hold (``>= 0``).
    """
    best = _lowest(krum_scores(updates, num_byzantine), 1)
    return {name: u[0] for name, u in _rows(updates, best).items()}


def multi_krum(updates: Mapping[str, Tensor], num_byzantine: int, keep: int) -> Params:
    """Mean of the ``keep`` client updates with the lowest :func:`krum_scores`, the scores computed
    once over all ``m`` clients (Blanchard et al., 2017); ``keep >= m`` is the plain mean.

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
        num_byzantine: ``f``, the Byzantine clients a round is assumed to hold (``>= 0``).
        keep: how many of the lowest-scored updates to average (``>= 1``).
    """
    check_count("keep", keep, 1)
    chosen = _lowest(krum_scores(updates, num_byzantine), keep)
    return {name: u.mean(0) for name, u in _rows(updates, chosen).items()}


def bulyan(updates: Mapping[str, Tensor], num_byzantine: int) -> Params:
    """Bulyan (El Mhamdi et al., 2018) with ``f = num_byzantine``:

    1. select ``θ = m − 2f`` clients by Krum repeatedly: score the remaining clients, move the
       lowest-scoring one (lowest index on ties) to the selection, score the rest again;
    2. per coordinate, average the ``β = θ − 2f`` selected values closest to their median (the mean
       of the two middle values for an even ``θ``).

    ``θ`` and ``β`` are at least 1 (rounds smaller than ``4f + 3`` do not meet the paper's bound).

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
        num_byzantine: ``f``, the Byzantine clients a round is assumed to hold (``>= 0``).
    """
    m = num_clients(updates)
    _check_byzantine(num_byzantine)
    theta = max(1, m - 2 * num_byzantine)
    beta = max(1, theta - 2 * num_byzantine)
    dist = _squared_distances(updates)  # once; each selection scores a sub-matrix
    remaining = torch.arange(m)
    selected = []
    for _ in range(theta):
        best = int(_lowest(_scores(dist[remaining][:, remaining], num_byzantine), 1))
        selected.append(int(remaining[best]))
        remaining = torch.cat([remaining[:best], remaining[best + 1 :]])
    chosen = _rows(updates, torch.tensor(selected))
    median = coordinate_median(chosen)
    out = {}
    for name, u in chosen.items():
        closest = torch.sort((u - median[name]).abs(), dim=0, stable=True).indices[:beta]
        out[name] = torch.gather(u, 0, closest).mean(0)
    return out


def centered_clip(updates: Mapping[str, Tensor], tau: float, iterations: int, center: Mapping[str, Tensor]) -> Params:
    """Centered clipping (Karimireddy, He & Jaggi, 2021), ``iterations`` times from ``v = center``:

        v ← v + (1/m) Σ_i (Δ_i − v) · min(1, τ / ‖Δ_i − v‖)

    the norm over all parameters of a client together (a zero difference is not scaled). Each client
    moves ``v`` by at most ``τ / m`` per iteration, however large its update.

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
        tau: ``τ``, the clipping radius around the center (``> 0``).
        iterations: how many clipping iterations to run (``>= 1``).
        center: the starting point ``v`` per parameter, shaped like one client's update.
    """
    check_positive("tau", tau)
    check_count("iterations", iterations, 1)
    num_clients(updates)
    v = {name: center[name].to(u.device, u.dtype) for name, u in updates.items()}
    for _ in range(iterations):
        diff = {name: u - v[name] for name, u in updates.items()}
        clipped, _ = clip_to_norm(diff, tau)
        v = {name: v[name] + d.mean(0) for name, d in clipped.items()}
    return v
