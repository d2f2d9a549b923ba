"""Aggregation of stacked client updates ``{name: [m, *shape]}`` into one server pseudo-gradient.

All of the server's aggregation math lives here as pure functions (no state, no randomness):

- :func:`weighted_mean`: ``Σ_i w_i Δ_i / Σ_i w_i`` (FedAvg; McMahan et al., 2017).
- :func:`coordinate_median` and :func:`trimmed_mean`: coordinate-wise robust rules (Yin, Chen,
  Ramchandran & Bartlett, 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates").
- :func:`clip_to_norm` and :func:`norm_bounded_mean`: each client's whole update scaled down to a
  norm bound (Sun, Kairouz, Suresh & McMahan, 2019, "Can You Really Backdoor Federated Learning?").
- :func:`bucket_means`: means of consecutive groups of clients, the input of a robust rule under
  bucketing (Karimireddy, He & Jaggi, 2022, "Byzantine-Robust Learning on Heterogeneous Datasets
  via Bucketing").
- :func:`noisy_clipped_mean` and :func:`noised_sum_mean`: the DP-FedAvg aggregate
  ``(Σ_i clip(Δ_i) + noise) / m`` (McMahan, Ramage, Talwar & Zhang, 2018, "Learning Differentially
  Private Recurrent Language Models"), from the uploads or from their clipped sum (what a secure
  aggregation reveals); the noise is drawn by the caller (:class:`lightning_metafed.privacy.ClientDP`),
  which owns the seeds. :func:`adaptive_clip_update` and :func:`adaptive_noise_multiplier`: adaptive
  clipping (Andrew, Thakkar, McMahan & Ramaswamy, 2021, "Differentially Private Learning with
  Adaptive Clipping").
- :func:`krum`, :func:`multi_krum` (Blanchard, El Mhamdi, Guerraoui & Stainer, 2017, "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent"), :func:`bulyan` (El Mhamdi,
  Guerraoui & Rouault, 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium") and
  :func:`centered_clip` (Karimireddy, He & Jaggi, 2021, "Learning from History for Byzantine Robust
  Optimization"): rules that pick or clip whole client updates by their distances to each other.

The norm of a client's update is taken over all of its parameters together. The functions keep the
operation order of the aggregator classes they replaced, so results are bit-identical to them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_metafed.functional.client_task import Params

__all__ = [
    "adaptive_clip_update",
    "adaptive_noise_multiplier",
    "bucket_means",
    "bulyan",
    "centered_clip",
    "clip_to_norm",
    "coordinate_median",
    "finite_clients",
    "krum",
    "krum_scores",
    "multi_krum",
    "noised_sum_mean",
    "noisy_clipped_mean",
    "norm_bounded_mean",
    "normalize_weights",
    "trim_count",
    "trimmed_mean",
    "update_norms",
    "weighted_mean",
]


def _check_positive(name: str, value: object) -> None:
    """Raise unless ``value`` is a finite real number ``> 0`` (a Python or NumPy scalar, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be a finite number > 0, got {value!r}")


def _check_count(name: str, value: object, minimum: int) -> None:
    """Raise unless ``value`` is an ``int`` (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}, got {value!r}")


def _first(updates: Mapping[str, Tensor]) -> Tensor:
    """The first parameter's stacked uploads; ``updates`` must hold at least one parameter."""
    if not updates:
        raise ValueError("Expected `updates` to hold at least one parameter, got an empty mapping")
    return next(iter(updates.values()))


def _num_clients(updates: Mapping[str, Tensor]) -> int:
    """``m``, the clients stacked along dim 0 of every upload; at least one parameter and one client."""
    m = _first(updates).shape[0]
    if m < 1:
        raise ValueError(f"Expected `updates` to stack at least one client along dim 0, got {m}")
    return m


def _per_client(u: Tensor) -> Tensor:
    """Stacked uploads ``[m, *shape]`` as ``[m, numel]`` (also for a scalar parameter, ``[m]``)."""
    return u.reshape(u.shape[0], math.prod(u.shape[1:]))


def normalize_weights(weights: Tensor | None, m: int, *, like: Tensor) -> Tensor:
    """Weights ``[m]`` summing to 1 (uniform when ``weights`` is ``None``)."""
    if weights is None:
        return torch.full((m,), 1.0 / m, dtype=like.dtype, device=like.device)
    w = weights.to(dtype=like.dtype, device=like.device)
    return w / w.sum()


def weighted_mean(updates: Mapping[str, Tensor], weights: Tensor | None = None) -> Params:
    """``Σ_i w_i u_i / Σ_i w_i`` per parameter (plain mean when ``weights`` is ``None``)."""
    out = {}
    for name, u in updates.items():
        w = normalize_weights(weights, u.shape[0], like=u)
        out[name] = torch.tensordot(w, u, dims=([0], [0]))
    return out


def update_norms(updates: Mapping[str, Tensor]) -> Tensor:
    """Each client's update norm over all parameters together, ``‖Δ_i‖ = sqrt(Σ_p ‖Δ_i^p‖²)``: ``[m]``.

    The squares are summed in float64 and the norms returned in the first parameter's dtype.
    """
    dtype = _first(updates).dtype
    return torch.sqrt(sum((_per_client(u).double() ** 2).sum(1) for u in updates.values())).to(dtype)


def clip_to_norm(updates: Mapping[str, Tensor], max_norm: float) -> tuple[Params, Tensor]:
    """Each client's update scaled down to norm ``max_norm`` at most, ``Δ_i · min(1, C / ‖Δ_i‖)``
    (all parameters together; Sun et al., 2019), and the norms ``‖Δ_i‖`` before clipping."""
    _check_positive("max_norm", max_norm)
    norms = update_norms(updates)
    factor = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return {k: u * factor.view(-1, *([1] * (u.dim() - 1))) for k, u in updates.items()}, norms


def finite_clients(updates: Mapping[str, Tensor]) -> Tensor:
    """``[m]`` bool: which clients' uploads hold no NaN/inf in any parameter."""
    return torch.stack([torch.isfinite(_per_client(u)).all(1) for u in updates.values()]).all(0)


def coordinate_median(updates: Mapping[str, Tensor]) -> Params:
    """Coordinate-wise median of the clients' updates (unweighted; Yin et al., 2018).

    With an even number ``m`` of clients it is the mean of the two middle values,
    ``(s_{⌊(m-1)/2⌋} + s_{⌊m/2⌋}) / 2`` of the sorted values ``s`` (so two clients give their mean,
    not the lower one as ``torch.median`` would).
    """
    m = _num_clients(updates)
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

    ``k`` is :func:`trim_count` (``int(trim·m + 1e-9)``, so that an inexact product such as
    ``0.29 · 100 = 28.999…`` still trims ``⌊trim·m⌋``). When ``m - 2k < 1`` (tiny rounds) the
    :func:`coordinate_median` is returned instead. ``trim`` is in ``[0, 0.5)``; ``0`` is the mean.
    """
    if isinstance(trim, bool) or not isinstance(trim, numbers.Real) or not 0 <= trim < 0.5:
        raise ValueError(f"Expected `trim` in [0, 0.5), got {trim!r}")
    m = _num_clients(updates)
    k = trim_count(m, trim)
    if m - 2 * k < 1:
        return coordinate_median(updates)
    return {name: torch.sort(u, dim=0).values[k : m - k].mean(0) for name, u in updates.items()}


def norm_bounded_mean(updates: Mapping[str, Tensor], max_norm: float, weights: Tensor | None = None) -> Params:
    """``Σ_i w_i Δ_i · min(1, C / ‖Δ_i‖) / Σ_i w_i`` with ``C = max_norm``: the (weighted) mean of the
    clients' updates after :func:`clip_to_norm` (Sun et al., 2019). Plain mean when ``weights`` is
    ``None``."""
    return weighted_mean(clip_to_norm(updates, max_norm)[0], weights)


def bucket_means(updates: Mapping[str, Tensor], bucket_size: int) -> Params:
    """Means of consecutive groups of ``bucket_size`` clients, ``[⌈m / bucket_size⌉, *shape]`` per
    parameter (Karimireddy et al., 2022); the last group holds the remaining ``m mod bucket_size``
    clients when that is not zero. A robust rule is then applied to these means."""
    _check_count("bucket_size", bucket_size, 1)
    return {
        name: torch.stack([b.mean(0) for b in torch.split(u, bucket_size, dim=0)]) for name, u in updates.items()
    }


def noisy_clipped_mean(
    updates: Mapping[str, Tensor], clip_norm: float, noise: Mapping[str, Tensor], denominator: int | float
) -> tuple[Params, Tensor]:
    """The DP-FedAvg aggregate (McMahan et al., 2018) and the clients' norms before clipping:

        aggregate = (Σ_i Δ_i · min(1, C / ‖Δ_i‖) + z) / denominator,   C = clip_norm

    ``noise`` holds ``z`` for each parameter, shaped like one client's update (for Gaussian DP,
    ``z ~ N(0, σ²C²·I)``); it is cast to the clipped sum's dtype and device before it is added.
    ``denominator`` is data-independent: the number of *sampled* clients, not of survivors.
    """
    _check_positive("clip_norm", clip_norm)
    clipped, norms = clip_to_norm(updates, clip_norm)
    return noised_sum_mean({k: u.sum(0) for k, u in clipped.items()}, noise, denominator), norms


def noised_sum_mean(total: Mapping[str, Tensor], noise: Mapping[str, Tensor], denominator: int | float) -> Params:
    """``(total + z) / denominator`` per parameter: the DP-FedAvg aggregate from the clients' clipped
    *sum* (all a secure aggregation reveals), ``z`` cast to the sum's dtype and device."""
    _check_positive("denominator", denominator)
    return {k: (t + noise[k].to(t.device, t.dtype)) / denominator for k, t in total.items()}


def adaptive_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier ``z_Δ`` of the clipped sum under adaptive clipping (Andrew et al., 2021,
    Theorem 1): releasing the sum with ``z_Δ`` and the unclipped count with noise ``σ_b`` spends the
    privacy of one Gaussian mechanism with multiplier ``z`` when ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)``.
    ``z = 0`` (no privacy) gives 0; ``2σ_b <= z`` leaves no budget for the sum and raises."""
    if noise_multiplier == 0:
        return 0.0
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("count_stddev", count_stddev)
    if 2 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"Expected `count_stddev` > noise_multiplier / 2 = {noise_multiplier / 2:g} (the count's noise must "
            f"spend less privacy than the whole round), got {count_stddev!r}"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


def adaptive_clip_update(clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """The next clip norm ``C · exp(−η (b̃ − γ))`` (Andrew et al., 2021, geometric update): ``b̃`` is
    the (already noised) fraction of clients whose update norm was ``<= C``, ``γ`` the target
    quantile, ``η = lr``. ``C`` shrinks while more than ``γ`` of the clients fit under it."""
    return float(clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile)))


def _flat(updates: Mapping[str, Tensor]) -> Tensor:
    """``[m, total numel]`` float64: each client's update over all parameters, in the mapping's order."""
    return torch.cat([_per_client(u).double() for u in updates.values()], dim=1)


def _check_byzantine(num_byzantine: int) -> None:
    _check_count("num_byzantine", num_byzantine, 0)


def krum_scores(updates: Mapping[str, Tensor], num_byzantine: int) -> Tensor:
    """``[m]`` float64 Krum scores (Blanchard et al., 2017): client ``i``'s sum of squared distances
    (over all parameters together) to its ``k = m − f − 2`` nearest other clients, ``f =
    num_byzantine``; ``k`` is clamped to ``[1, m − 1]`` in rounds too small for ``f``."""
    _check_byzantine(num_byzantine)
    _num_clients(updates)
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
    """The one client update with the lowest :func:`krum_scores` (ties: the lowest index)."""
    best = _lowest(krum_scores(updates, num_byzantine), 1)
    return {name: u[0] for name, u in _rows(updates, best).items()}


def multi_krum(updates: Mapping[str, Tensor], num_byzantine: int, keep: int) -> Params:
    """Mean of the ``keep`` client updates with the lowest :func:`krum_scores`, the scores computed
    once over all ``m`` clients (Blanchard et al., 2017); ``keep >= m`` is the plain mean."""
    _check_count("keep", keep, 1)
    chosen = _lowest(krum_scores(updates, num_byzantine), keep)
    return {name: u.mean(0) for name, u in _rows(updates, chosen).items()}


def bulyan(updates: Mapping[str, Tensor], num_byzantine: int) -> Params:
    """Bulyan (El Mhamdi et al., 2018) with ``f = num_byzantine``:

    1. select ``θ = m − 2f`` clients by Krum repeatedly: score the remaining clients, move the
       lowest-scoring one (lowest index on ties) to the selection, score the rest again;
    2. per coordinate, average the ``β = θ − 2f`` selected values closest to their median (the mean
       of the two middle values for an even ``θ``).

    ``θ`` and ``β`` are at least 1 (rounds smaller than ``4f + 3`` do not meet the paper's bound).
    """
    m = _num_clients(updates)
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
    """
    _check_positive("tau", tau)
    _check_count("iterations", iterations, 1)
    _num_clients(updates)
    v = {name: center[name].to(u.device, u.dtype) for name, u in updates.items()}
    for _ in range(iterations):
        diff = {name: u - v[name] for name, u in updates.items()}
        clipped, _ = clip_to_norm(diff, tau)
        v = {name: v[name] + d.mean(0) for name, d in clipped.items()}
    return v
