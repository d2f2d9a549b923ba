"""Simulated federation faults: client dropout, heterogeneous compute and Byzantine clients.

Pass a :class:`ClientFaults` as a module's ``faults`` argument (YAML)::

    model:
      faults:
        dropout: 0.1               # each sampled client vanishes with this probability per round
        step_choices: [1, 2, 5]    # per-client local step budget, drawn every round
        step_probs: [0.2, 0.3, 0.5]
        byzantine_fraction: 0.2    # these clients upload an attack instead of their update
        byzantine_attack: sign_flip

Every draw is a pure function of ``(seed, round, client)`` (see
``lightning_metafed.data.seeding``), so a run and its resumed copy see the same faults, and
every DDP process draws the same ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_metafed._validation import (
    ConfigObject,
    check_int,
    check_positive,
    check_range,
)
from lightning_metafed.data.seeding import (
    ATTACK,
    BYZANTINE,
    DROPOUT,
    STEPS,
    generator,
    uniform,
)

__all__ = ["ClientFaults", "ATTACKS", "alie_z"]

#: The Byzantine behaviours, what a bad client uploads instead of its honest update ``Δ``.
ATTACKS = ("sign_flip", "scaled", "random", "alie", "ipm")


class ClientFaults(ConfigObject):
    """What goes wrong in a simulated federation, drawn reproducibly from ``seed``.

    Args:
        dropout: probability that a sampled client drops out of a round (after receiving the model,
            before uploading). Dropped clients cost no compute and contribute nothing; a round with
            no survivors skips the server step.
        step_choices: heterogeneous compute. Each round every client draws its local step budget
            from these integers (stragglers do partial work): MAML/ANIL/Meta-SGD/Reptile cap their
            inner steps, Per-FedAvg its local steps, FedAvg its local mini-batch steps. Values may not
            exceed the algorithm's configured count. Under ``vmap`` the budget is applied by masking
            the extra steps, with the same result as stopping early.
        step_probs: probabilities of ``step_choices`` (default uniform).
        byzantine_fraction: each client is Byzantine with this probability, fixed for the whole run
            (decided from its integer ``client_id``; batches without ids draw per round).
        byzantine_attack: what a Byzantine client uploads instead of its update ``Δ``:
            ``"sign_flip"``: ``−scale·Δ``; ``"scaled"``: ``scale·Δ``; ``"random"``: Gaussian noise
            with ``scale`` times the RMS of ``Δ`` (per parameter tensor) as standard deviation;
            ``"alie"`` ("a little is enough", Baruch, Baruch & Goldberg, 2019): every bad client
            uploads ``μ − z·σ``, with ``μ``, ``σ`` the per-coordinate mean and standard deviation of
            the round's honest updates and ``z`` = :func:`~lightning_metafed.faults.alie_z` of the
            round (``scale`` unused): a shift small enough to pass coordinate-wise and distance-based
            rules;
            ``"ipm"`` (inner-product manipulation, Xie, Koyejo & Gupta, 2020): every bad client
            uploads ``−scale·μ``. Both attackers see every honest update of the round (omniscient).
        byzantine_scale: the ``scale`` above (> 0).
        seed: seed of every draw above.

    Example:
        >>> import torch
        >>> from lightning_metafed import ClientFaults
        >>> faults = ClientFaults(dropout=0.5, step_choices=[1, 2, 5], seed=0)
        >>> faults.dropped(round_idx=0, m=6)  # which of round 0's six clients vanish
        tensor([False,  True,  True,  True, False, False])
        >>> faults.num_steps(round_idx=0, m=6)  # their local step budgets
        tensor([5, 5, 5, 2, 1, 1])
        >>> faults.dropped(round_idx=0, m=6).equal(faults.dropped(round_idx=0, m=6))  # reproducible
        True
        >>> attacker = ClientFaults(byzantine_attack="sign_flip", byzantine_scale=10.0)
        >>> attacker.attack({"w": torch.ones(3, 2)}, bad=torch.tensor([False, True, False]), round_idx=0)["w"]
        tensor([[  1.,   1.],
                [-10., -10.],
                [  1.,   1.]])
    """

    def __init__(
        self,
        dropout: float = 0.0,
        step_choices: Sequence[int] | None = None,
        step_probs: Sequence[float] | None = None,
        byzantine_fraction: float = 0.0,
        byzantine_attack: Literal["sign_flip", "scaled", "random", "alie", "ipm"] = "sign_flip",
        byzantine_scale: float = 10.0,
        seed: int = 0,
    ):
        self.dropout = check_range("dropout", dropout, 0, 1)
        if step_choices is not None:
            step_choices = list(step_choices)
            if not step_choices:
                raise ValueError("Expected `step_choices` to hold at least one step count, got []")
            for value in step_choices:
                check_int("step_choices", value, minimum=0)
        if step_probs is not None:
            if step_choices is None:
                raise ValueError("`step_probs` needs `step_choices`")
            step_probs = [float(p) for p in step_probs]
            if len(step_probs) != len(step_choices) or any(not p >= 0 for p in step_probs) or not sum(step_probs) > 0:
                raise ValueError(
                    f"Expected `step_probs` to hold {len(step_choices)} non-negative numbers with a positive sum "
                    f"(one per step choice), got {step_probs!r}"
                )
        self.step_choices = step_choices
        self.step_probs = step_probs
        self.byzantine_fraction = check_range("byzantine_fraction", byzantine_fraction, 0, 1)
        if byzantine_attack not in ATTACKS:
            raise ValueError(f"Expected `byzantine_attack` to be one of {ATTACKS}, got {byzantine_attack!r}")
        self.byzantine_attack = byzantine_attack
        self.byzantine_scale = check_positive("byzantine_scale", byzantine_scale)
        self.seed = check_int("seed", seed)

    @property
    def max_steps(self) -> int | None:
        return None if self.step_choices is None else max(self.step_choices)

    def dropped(self, round_idx: int, m: int) -> Tensor:
        """``[m]`` bool: which of the round's sampled clients drop out."""
        if self.dropout == 0:
            return torch.zeros(m, dtype=torch.bool)
        return torch.rand(m, generator=generator(self.seed, DROPOUT, round_idx)) < self.dropout

    def num_steps(self, round_idx: int, m: int) -> Tensor | None:
        """``[m]`` int64 step budgets of the round's clients (``None`` without ``step_choices``)."""
        if self.step_choices is None:
            return None
        probs = torch.tensor(self.step_probs or [1.0] * len(self.step_choices), dtype=torch.float64)
        picks = torch.multinomial(probs, m, replacement=True, generator=generator(self.seed, STEPS, round_idx))
        return torch.tensor(self.step_choices, dtype=torch.long)[picks]

    def byzantine(self, round_idx: int, client_id: Any, m: int) -> Tensor:
        """``[m]`` bool: which of the round's clients are Byzantine."""
        if self.byzantine_fraction == 0:
            return torch.zeros(m, dtype=torch.bool)
        if isinstance(client_id, Tensor) and not client_id.is_floating_point():
            return torch.tensor([uniform(self.seed, BYZANTINE, int(c)) < self.byzantine_fraction for c in client_id.tolist()])
        return torch.rand(m, generator=generator(self.seed, BYZANTINE, -1, round_idx)) < self.byzantine_fraction

    def attack(self, updates: Mapping[str, Tensor], bad: Tensor, round_idx: int) -> dict[str, Tensor]:
        """The uploads with the rows of ``bad`` clients replaced by the configured attack."""
        s = self.byzantine_scale
        out = {}
        gen = generator(self.seed, ATTACK, round_idx)
        for name in sorted(updates):
            u = updates[name]
            flag = bad.to(u.device).view(-1, *([1] * (u.dim() - 1)))
            if self.byzantine_attack in ("alie", "ipm"):
                out[name] = torch.where(flag, _omniscient(self.byzantine_attack, u, bad.to(u.device), s), u)
                continue
            if self.byzantine_attack == "sign_flip":
                evil = -s * u
            elif self.byzantine_attack == "scaled":
                evil = s * u
            else:
                rms = u.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (u.dim() - 1)))
                noise = torch.randn(u.shape, generator=gen, dtype=torch.float32).to(device=u.device, dtype=u.dtype)
                evil = s * rms * noise
            out[name] = torch.where(flag, evil, u)
        return out


def alie_z(m: int, f: int) -> float:
    """``z`` of "a little is enough" (Baruch et al., 2019) for ``f`` bad clients among ``m``: with
    ``s = ⌊m/2 + 1⌋ − f`` honest clients the attackers need on their side for a majority,
    ``z = Φ⁻¹((m − s) / m)``, the largest shift that ``s`` honest values still lie beyond. ``s`` is
    taken as at least 1 (enough attackers for a majority need no honest client on their side), and
    a round of one client gets ``z = 0`` (nothing to hide among)."""
    s = max(1, m // 2 + 1 - f)
    if m <= s:
        return 0.0
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((m - s) / m, dtype=torch.float64)))


def _omniscient(attack: str, u: Tensor, bad: Tensor, scale: float) -> Tensor:
    """One parameter's upload ``[*shape]`` of every bad client under ``"alie"`` or ``"ipm"``, from
    the mean and standard deviation of the honest rows of ``u`` (all rows when none is honest)."""
    honest = u[~bad] if bool((~bad).any()) else u
    mu = honest.mean(0)
    if attack == "ipm":
        return -scale * mu
    if honest.shape[0] < 2:  # no spread to hide in: the bad clients upload the mean itself
        return mu
    return mu - alie_z(u.shape[0], int(bad.sum())) * honest.std(0)


torch.serialization.add_safe_globals([ClientFaults])
