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
from lightning_metafed.data.seeding import PRIVACY, generator
from lightning_metafed.functional.aggregate import clip_to_norm, noisy_clipped_mean

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
        clip_norm: ``C``, the bound on each client's update norm (all parameters together).
        noise_multiplier: ``σ``; the noise on the sum has standard deviation ``σ·C`` per coordinate.
        delta: the ``δ`` at which ``ε`` is reported (in ``(0, 1)``; choose it below ``1/N``).
        accountant: ``"rdp"`` or ``"prv"`` (Opacus's ``RDPAccountant`` / ``PRVAccountant``).
        sample_rate: the client sampling rate ``q``. Default: ``clients_per_round / train clients``
            of the Trainer's :class:`~lightning_metafed.data.FederatedDataModule`.
        seed: seed of the noise. ``None`` (default) draws a fresh one at every fit, as privacy
            requires; a fixed seed makes runs (and resumes) reproducible, for experiments only.
    """

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        accountant: Literal["rdp", "prv"] = "rdp",
        sample_rate: float | None = None,
        seed: int | None = None,
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

    def make_accountant(self) -> Any:
        """A fresh Opacus accountant of the configured kind."""
        return require_opacus().create_accountant(self.accountant)

    def resolve_seed(self) -> int:
        """The noise seed of a fit: ``seed``, or a fresh one from the OS's entropy."""
        return self.seed if self.seed is not None else secrets.randbits(62)

    def clip(self, updates: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """Each client's update scaled to norm ``clip_norm`` at most, and the norms before clipping."""
        return clip_to_norm(updates, self.clip_norm)

    def _draw_noise(self, shapes: Mapping[str, torch.Size], seed: int, round_idx: int) -> dict[str, Tensor]:
        """Float64 CPU draws of ``N(0, (σC)²)`` per parameter of the given shapes, in sorted-name order
        from the generator of ``(seed, PRIVACY, round_idx)``."""
        gen = generator(seed, PRIVACY, round_idx)
        std = self.noise_multiplier * self.clip_norm
        return {k: std * torch.randn(shapes[k], generator=gen, dtype=torch.float64) for k in sorted(shapes)}

    def noise(self, like: Mapping[str, Tensor], seed: int, round_idx: int) -> dict[str, Tensor]:
        """The round's noise ``N(0, (σC)²)`` for each parameter (a pure function of seed and round)."""
        drawn = self._draw_noise({k: v.shape for k, v in like.items()}, seed, round_idx)
        return {k: z.to(like[k].device, like[k].dtype) for k, z in drawn.items()}

    def aggregate(
        self, updates: Mapping[str, Tensor], sampled: int, seed: int, round_idx: int
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``(Σ clip(Δ_i) + noise) / sampled`` and the clients' pre-clipping norms."""
        noise = self._draw_noise({k: u.shape[1:] for k, u in updates.items()}, seed, round_idx)
        return noisy_clipped_mean(updates, self.clip_norm, noise, sampled)


torch.serialization.add_safe_globals([ClientDP])
