"""Client-level differential privacy for the server aggregate (DP-FedAvg style).

Each round, every surviving client's upload ``Δ_i`` (all parameters together) is clipped to norm
``C``, the clipped uploads are summed, Gaussian noise ``N(0, σ²C²·I)`` is added to the sum, and the
result is divided by the number of *sampled* clients ``m`` (a data-independent denominator):

    aggregate = (Σ_i Δ_i · min(1, C / ‖Δ_i‖) + N(0, σ²C²)) / m

(McMahan, Ramage, Talwar & Zhang, 2018, "Learning Differentially Private Recurrent Language
Models"; the formula is :func:`lightning_metafed.functional.aggregate.noisy_clipped_mean`, this
module draws the noise and accounts for it). Adding or removing one client changes the clipped sum
by at most ``C``, so each round is the sampled Gaussian mechanism with noise multiplier ``σ`` and
sampling rate ``q = m / N`` (``N`` train clients). The privacy loss ``(ε, δ)`` over the rounds so
far comes from Opacus's accountants (RDP or PRV), not from code of ours.

Adaptive clipping (``target_quantile``; Andrew, Thakkar, McMahan & Ramaswamy, 2021, "Differentially
Private Learning with Adaptive Clipping") replaces the fixed ``C`` by one that follows a quantile
``γ`` of the clients' update norms: each round releases the centred count ``Σ_i (b_i − ½)`` of the
clients whose norm is ``<= C_t`` (``b_i = 1``) plus ``N(0, σ_b²)``, takes ``b̃ = noisy count / m + ½``
(clamped to ``[0, 1]``), and sets ``C_{t+1} = C_t · exp(−η (b̃ − γ))``. Adding or removing a client
moves the centred count by ½, so it is a second Gaussian release with noise multiplier ``2σ_b``; the
sum's noise multiplier is raised to ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`` so that the two together spend
exactly the privacy of one round with noise multiplier ``z = noise_multiplier`` (the paper's Theorem
1), which is what the accountant is told.

What this does **not** give: record-level privacy inside a client (the unit is the whole client);
protection against a server that skips the noise; a cryptographically secure noise source (noise
comes from torch's generator; with a fixed ``seed`` it is reproducible, hence predictable). The
accountant analyses Poisson client sampling; the datamodule samples exactly ``m`` clients without
replacement per round, the common approximation that Opacus also makes for fixed-size batches.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_metafed._validation import (
    ConfigObject,
    check_int,
    check_positive,
    check_range,
)
from lightning_metafed.data.seeding import CLIP_COUNT, PRIVACY, generator
from lightning_metafed.functional.aggregate import (
    adaptive_clip_update,
    adaptive_noise_multiplier,
    clip_to_norm,
    noised_sum_mean,
    noisy_clipped_mean,
)

__all__ = ["ClientDP", "require_opacus"]

ACCOUNTANTS = ("rdp", "prv")


def require_opacus() -> Any:
    try:
        import opacus.accountants as accountants
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Client-level differential privacy reports (ε, δ) with Opacus's accountants: "
            "pip install 'lightning-metafed[privacy]' (or pip install opacus)"
        ) from err
    return accountants


class ClientDP(ConfigObject):
    """Client-level DP for the round aggregate: clip to ``clip_norm``, add noise ``σ·clip_norm``.

    Args:
        clip_norm: ``C``, the bound on each client's update norm (all parameters together); under
            adaptive clipping, the first round's bound.
        noise_multiplier: ``σ``; the noise on the sum has standard deviation ``σ·C`` per coordinate.
        delta: the ``δ`` at which ``ε`` is reported (in ``(0, 1)``; choose it below ``1/N``).
        accountant: ``"rdp"`` or ``"prv"`` (Opacus's ``RDPAccountant`` / ``PRVAccountant``).
        sample_rate: the client sampling rate ``q``. Default: ``clients_per_round / train clients``
            of the Trainer's :class:`~lightning_metafed.data.FederatedDataModule`.
        seed: seed of the noise. ``None`` (default) draws a fresh one at every fit, as privacy
            requires; a fixed seed makes runs (and resumes) reproducible, for experiments only.
        target_quantile: ``γ`` in ``(0, 1)``: adapt the clip norm each round towards the ``γ``
            quantile of the clients' update norms (adaptive clipping). ``None``: fixed ``clip_norm``.
        clip_lr: ``η``, the step of the geometric clip-norm update (the paper's default 0.2).
        count_stddev: ``σ_b``, the noise on the centred count of unclipped clients; default: sampled
            clients / 20 (the paper's choice). Must exceed ``noise_multiplier / 2``.

    Example:
        Clipping and the noisy mean of one round (what the module does when ``privacy=`` is set):

        >>> import torch
        >>> from lightning_metafed import ClientDP
        >>> updates = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}  # 2 clients, norms 5 and 0.5
        >>> clipped, norms = ClientDP(clip_norm=1.0).clip(updates)
        >>> clipped["w"], norms
        (tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]]), tensor([5.0000, 0.5000]))
        >>> dp = ClientDP(clip_norm=1.0, noise_multiplier=0.0)
        >>> dp.aggregate(updates, sampled=2, seed=0, round_idx=0)[0]["w"]  # (clipped sum + noise) / 2
        tensor([0.4500, 0.6000])
        >>> dp = ClientDP(clip_norm=1.0, noise_multiplier=1.0)
        >>> noisy = [dp.aggregate(updates, sampled=2, seed=7, round_idx=r)[0]["w"] for r in (0, 0, 1)]
        >>> noisy[0].equal(noisy[1]), noisy[0].equal(noisy[2])  # the noise is a function of (seed, round)
        (True, False)
    """

    # Class-level defaults: a ClientDP pickled before adaptive clipping existed reads back as fixed clipping.
    target_quantile: float | None = None
    clip_lr: float = 0.2
    count_stddev: float | None = None

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        accountant: Literal["rdp", "prv"] = "rdp",
        sample_rate: float | None = None,
        seed: int | None = None,
        target_quantile: float | None = None,
        clip_lr: float = 0.2,
        count_stddev: float | None = None,
    ):
        self.clip_norm = check_positive("clip_norm", clip_norm)
        self.noise_multiplier = check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
        self.delta = check_range("delta", delta, 0, 1, low_open=True)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"Expected `accountant` to be one of {ACCOUNTANTS}, got {accountant!r}")
        self.accountant = accountant
        self.sample_rate = None if sample_rate is None else check_range(
            "sample_rate", sample_rate, 0, 1, low_open=True, high_open=False
        )
        self.seed = None if seed is None else check_int("seed", seed)
        self.target_quantile = None if target_quantile is None else check_range(
            "target_quantile", target_quantile, 0, 1, low_open=True, high_open=True
        )
        self.clip_lr = check_positive("clip_lr", clip_lr)
        self.count_stddev = None if count_stddev is None else check_positive("count_stddev", count_stddev)

    @property
    def adaptive(self) -> bool:
        """Whether the clip norm adapts (``target_quantile`` is set)."""
        return self.target_quantile is not None

    def count_noise_std(self, sampled: int) -> float:
        """``σ_b``: ``count_stddev``, or ``sampled / 20``; 0 without noise (``noise_multiplier = 0``)."""
        if self.noise_multiplier == 0:
            return 0.0
        return self.count_stddev if self.count_stddev is not None else sampled / 20

    def sum_noise_multiplier(self, sampled: int) -> float:
        """The noise multiplier of the clipped sum: ``noise_multiplier``, or under adaptive clipping
        ``z_Δ`` (:func:`~lightning_metafed.functional.aggregate.adaptive_noise_multiplier`), which
        raises when ``σ_b`` is too small for the rounds of ``sampled`` clients."""
        if not self.adaptive or self.noise_multiplier == 0:
            return self.noise_multiplier
        try:
            return adaptive_noise_multiplier(self.noise_multiplier, self.count_noise_std(sampled))
        except ValueError as error:
            if self.count_stddev is not None:
                raise
            raise ValueError(
                f"{error} (`count_stddev` defaults to clients per round / 20 = {sampled} / 20): set `count_stddev` "
                f"above {self.noise_multiplier / 2:g} or sample more than {10 * self.noise_multiplier:g} clients per round"
            ) from None

    def make_accountant(self) -> Any:
        """A fresh Opacus accountant of the configured kind."""
        return require_opacus().create_accountant(self.accountant)

    def resolve_seed(self) -> int:
        """The noise seed of a fit: ``seed``, or a fresh one from the OS's entropy."""
        return self.seed if self.seed is not None else secrets.randbits(62)

    def clip(self, updates: Mapping[str, Tensor], clip_norm: float | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """Each client's update scaled to norm ``clip_norm`` (default: the configured one) at most,
        and the norms before clipping (what a client does itself under secure aggregation)."""
        return clip_to_norm(updates, self.clip_norm if clip_norm is None else clip_norm)

    def _draw_noise(
        self, shapes: Mapping[str, torch.Size], seed: int, round_idx: int, std: float | None = None
    ) -> dict[str, Tensor]:
        """Float64 CPU draws of ``N(0, std²)`` (default ``std = σC``) per parameter of the given shapes,
        in sorted-name order from the generator of ``(seed, PRIVACY, round_idx)``."""
        gen = generator(seed, PRIVACY, round_idx)
        std = self.noise_multiplier * self.clip_norm if std is None else std
        return {k: std * torch.randn(shapes[k], generator=gen, dtype=torch.float64) for k in sorted(shapes)}

    def noise(self, like: Mapping[str, Tensor], seed: int, round_idx: int) -> dict[str, Tensor]:
        """The round's noise ``N(0, (σC)²)`` for each parameter (a pure function of seed and round)."""
        drawn = self._draw_noise({k: v.shape for k, v in like.items()}, seed, round_idx)
        return {k: z.to(like[k].device, like[k].dtype) for k, z in drawn.items()}

    def _sum_noise(
        self, shapes: Mapping[str, torch.Size], sampled: int, seed: int, round_idx: int, clip_norm: float
    ) -> dict[str, Tensor]:
        return self._draw_noise(shapes, seed, round_idx, self.sum_noise_multiplier(sampled) * clip_norm)

    def aggregate(
        self, updates: Mapping[str, Tensor], sampled: int, seed: int, round_idx: int, clip_norm: float | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``(Σ clip(Δ_i) + noise) / sampled`` and the clients' pre-clipping norms; ``clip_norm``:
        this round's bound (default: the configured one; the adaptive one is the ledger's)."""
        c = self.clip_norm if clip_norm is None else clip_norm
        noise = self._sum_noise({k: u.shape[1:] for k, u in updates.items()}, sampled, seed, round_idx, c)
        return noisy_clipped_mean(updates, c, noise, sampled)

    def aggregate_sum(
        self, total: Mapping[str, Tensor], sampled: int, seed: int, round_idx: int, clip_norm: float | None = None
    ) -> dict[str, Tensor]:
        """``(total + noise) / sampled`` from the sum of the clients' clipped updates (what secure
        aggregation reveals; each client clipped to ``clip_norm`` itself). The noise is the one
        :meth:`aggregate` adds for the same seed, round and clip norm."""
        c = self.clip_norm if clip_norm is None else clip_norm
        return noised_sum_mean(total, self._sum_noise({k: t.shape for k, t in total.items()}, sampled, seed, round_idx, c), sampled)

    def next_clip_norm(
        self, clip_norm: float, unclipped: int | float, survivors: int, sampled: int, seed: int, round_idx: int
    ) -> float:
        """The next round's clip norm from this round's count of the ``survivors`` whose update norm
        was ``<= clip_norm``. As in the paper, the released statistic is the *centred* count
        ``Σ_i (b_i − ½)``, which one client more or less moves by ½ (the sensitivity behind
        ``z_Δ``); it gets ``N(0, σ_b²)`` noise (generator of ``(seed, CLIP_COUNT, round_idx)``), is
        divided by the ``sampled`` clients and shifted back by ½, clamped to ``[0, 1]`` and fed to the
        geometric update. Fixed clipping returns ``clip_norm``."""
        if not self.adaptive:
            return clip_norm
        noise = self.count_noise_std(sampled) * torch.randn((), generator=generator(seed, CLIP_COUNT, round_idx), dtype=torch.float64)
        fraction = (float(unclipped) - survivors / 2 + float(noise)) / sampled + 0.5
        return adaptive_clip_update(clip_norm, min(1.0, max(0.0, fraction)), self.target_quantile, self.clip_lr)


torch.serialization.add_safe_globals([ClientDP])
