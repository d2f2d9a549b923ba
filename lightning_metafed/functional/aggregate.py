"""Aggregation of stacked client updates ``{name: [m, *shape]}`` into one server pseudo-gradient.

All of the server's aggregation math is importable from here, as pure functions (no state, no
randomness). The means, the finiteness check and the DP sums are defined here, the robust rules in
:mod:`~lightning_metafed.functional.robust`, and each client's norm and its clipping in
:mod:`~lightning_metafed.functional.stacked`:

- :func:`weighted_mean`: ``Σ_i w_i Δ_i / Σ_i w_i`` (FedAvg; McMahan et al., 2017).
- :func:`clip_to_norm` and :func:`norm_bounded_mean`: each client's whole update scaled down to a
  norm bound (Sun, Kairouz, Suresh & McMahan, 2019, "Can You Really Backdoor Federated Learning?").
- :func:`noisy_clipped_mean` and :func:`noised_sum_mean`: the DP-FedAvg aggregate
  ``(Σ_i clip(Δ_i) + noise) / m`` (McMahan, Ramage, Talwar & Zhang, 2018, "Learning Differentially
  Private Recurrent Language Models"), from the uploads or from their clipped sum (what a secure
  aggregation reveals); the noise is drawn by the caller (:class:`lightning_metafed.privacy.ClientDP`),
  which owns the seeds. :func:`adaptive_clip_update` and :func:`adaptive_noise_multiplier`: adaptive
  clipping (Andrew, Thakkar, McMahan & Ramaswamy, 2021, "Differentially Private Learning with
  Adaptive Clipping").
- the Byzantine-robust rules (:func:`coordinate_median`, :func:`trimmed_mean`, :func:`bucket_means`,
  :func:`krum`, :func:`multi_krum`, :func:`bulyan`, :func:`centered_clip`), with their papers, are
  described in :mod:`~lightning_metafed.functional.robust`.

The norm of a client's update is taken over all of its parameters together. The functions keep the
operation order of the aggregator classes they replaced, so results are bit-identical to them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_metafed.functional.client_task import Params
from lightning_metafed.functional.robust import (  # re-exported: this module is their public path
    bucket_means,
    bulyan,
    centered_clip,
    coordinate_median,
    krum,
    krum_scores,
    multi_krum,
    trim_count,
    trimmed_mean,
)
from lightning_metafed.functional.stacked import check_positive, clip_to_norm, per_client, update_norms

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


def normalize_weights(weights: Tensor | None, m: int, *, like: Tensor) -> Tensor:
    """Weights ``[m]`` summing to 1 (uniform when ``weights`` is ``None``).

    Args:
        weights: per-client weights ``[m]`` (e.g. sample counts), or ``None`` for uniform weights.
        m: the number of clients.
        like: the tensor whose dtype and device the weights take.
    """
    if weights is None:
        return torch.full((m,), 1.0 / m, dtype=like.dtype, device=like.device)
    w = weights.to(dtype=like.dtype, device=like.device)
    return w / w.sum()


def weighted_mean(updates: Mapping[str, Tensor], weights: Tensor | None = None) -> Params:
    """``Σ_i w_i u_i / Σ_i w_i`` per parameter (plain mean when ``weights`` is ``None``).

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
        weights: per-client weights ``[m]``, or ``None`` for the plain mean.

    Example:
        >>> import torch
        >>> from lightning_metafed.functional import weighted_mean
        >>> updates = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0, 1.0])}
        >>> weighted_mean(updates, torch.tensor([3.0, 1.0]))
        {'w': tensor([1.5000, 2.5000]), 'b': tensor(0.2500)}
    """
    out = {}
    for name, u in updates.items():
        w = normalize_weights(weights, u.shape[0], like=u)
        out[name] = torch.tensordot(w, u, dims=([0], [0]))
    return out


def finite_clients(updates: Mapping[str, Tensor]) -> Tensor:
    """``[m]`` bool: which clients' uploads hold no NaN/inf in any parameter.

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
    """
    return torch.stack([torch.isfinite(per_client(u)).all(1) for u in updates.values()]).all(0)


def norm_bounded_mean(updates: Mapping[str, Tensor], max_norm: float, weights: Tensor | None = None) -> Params:
    """``Σ_i w_i Δ_i · min(1, C / ‖Δ_i‖) / Σ_i w_i`` with ``C = max_norm``: the (weighted) mean of the
    clients' updates after :func:`clip_to_norm` (Sun et al., 2019). Plain mean when ``weights`` is
    ``None``.

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
        max_norm: ``C``, the norm each client's update is scaled down to at most (``> 0``).
        weights: per-client weights ``[m]``, or ``None`` for the plain mean.
    """
    return weighted_mean(clip_to_norm(updates, max_norm)[0], weights)


def noisy_clipped_mean(
    updates: Mapping[str, Tensor], clip_norm: float, noise: Mapping[str, Tensor], denominator: int | float
) -> tuple[Params, Tensor]:
    """The DP-FedAvg aggregate (McMahan et al., 2018) and the clients' norms before clipping:

        aggregate = (Σ_i Δ_i · min(1, C / ‖Δ_i‖) + z) / denominator,   C = clip_norm

    ``noise`` holds ``z`` for each parameter, shaped like one client's update (for Gaussian DP,
    ``z ~ N(0, σ²C²·I)``); it is cast to the clipped sum's dtype and device before it is added.
    ``denominator`` is data-independent: the number of *sampled* clients, not of survivors.

    Args:
        updates: each parameter name mapped to the clients' stacked uploads ``[m, *shape]``.
        clip_norm: ``C``, the norm each client's update is clipped to (``> 0``).
        noise: ``z`` per parameter, shaped like one client's update.
        denominator: what the noised sum is divided by (the number of sampled clients; ``> 0``).
    """
    check_positive("clip_norm", clip_norm)
    clipped, norms = clip_to_norm(updates, clip_norm)
    return noised_sum_mean({k: u.sum(0) for k, u in clipped.items()}, noise, denominator), norms


def noised_sum_mean(total: Mapping[str, Tensor], noise: Mapping[str, Tensor], denominator: int | float) -> Params:
    """``(total + z) / denominator`` per parameter: the DP-FedAvg aggregate from the clients' clipped
    *sum* (all a secure aggregation reveals), ``z`` cast to the sum's dtype and device.

    Args:
        total: the clients' clipped updates summed, per parameter.
        noise: ``z`` per parameter, shaped like ``total``'s tensors.
        denominator: what the noised sum is divided by (the number of sampled clients; ``> 0``).
    """
    check_positive("denominator", denominator)
    return {k: (t + noise[k].to(t.device, t.dtype)) / denominator for k, t in total.items()}


def adaptive_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier ``z_Δ`` of the clipped sum under adaptive clipping (Andrew et al., 2021,
    Theorem 1): releasing the sum with ``z_Δ`` and the unclipped count with noise ``σ_b`` spends the
    privacy of one Gaussian mechanism with multiplier ``z`` when ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)``.
    ``z = 0`` (no privacy) gives 0; ``2σ_b <= z`` leaves no budget for the sum and raises.

    Args:
        noise_multiplier: ``z``, the noise multiplier of the whole round (``0``: no privacy).
        count_stddev: ``σ_b``, the noise standard deviation of the unclipped-client count.
    """
    if noise_multiplier == 0:
        return 0.0
    check_positive("noise_multiplier", noise_multiplier)
    check_positive("count_stddev", count_stddev)
    if 2 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"Expected `count_stddev` > noise_multiplier / 2 = {noise_multiplier / 2:g} (the count's noise must "
            f"spend less privacy than the whole round), got {count_stddev!r}"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


def adaptive_clip_update(clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """The next clip norm ``C · exp(−η (b̃ − γ))`` (Andrew et al., 2021, geometric update): ``b̃`` is
    the (already noised) fraction of clients whose update norm was ``<= C``, ``γ`` the target
    quantile, ``η = lr``. ``C`` shrinks while more than ``γ`` of the clients fit under it.

    Args:
        clip_norm: ``C``, this round's clip norm.
        unclipped_fraction: ``b̃``, the noised fraction of clients whose update norm was ``<= C``.
        target_quantile: ``γ``, the fraction of clients the clip norm should leave unclipped.
        lr: ``η``, the learning rate of the geometric update.
    """
    return float(clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile)))
