"""The sinusoid regression benchmark of MAML (Finn, Abbeel & Levine, 2017), one client per sine."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_metafed._validation import check_int, check_positive
from lightning_metafed.data.datamodule import FederatedDataModule
from lightning_metafed.data.population import ClientData, LazyPopulation, Population
from lightning_metafed.data.seeding import (
    POPULATION,
    extend,
    finish,
    hash_state,
    unit_tensor,
)

__all__ = ["SinusoidClients"]


def _check_range(name: str, value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"Expected `{name}` to be a pair (low, high), got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"Expected `{name}` to be a finite pair with low <= high, got {value!r}")
    return low, high


class SinusoidClients(FederatedDataModule):
    """Client ``k`` regresses ``y = A_k sin(x + φ_k)`` with ``A_k ~ U[0.1, 5]``, ``φ_k ~ U[0, π]``
    and ``examples_per_client`` inputs ``x ~ U[−5, 5]`` (plus optional Gaussian label noise).

    Clients are generated lazily from ``(seed, k)``: a population of 10^6 clients costs no memory.
    Other arguments (``clients_per_round``, ``support_size``, ...) are those of
    :class:`~lightning_metafed.data.FederatedDataModule`.

    Args:
        num_clients: how many clients (sines) the population holds.
        examples_per_client: the inputs each client holds (``>= 2``).
        amplitude: the ``[low, high]`` range ``A_k`` is drawn from, uniformly.
        phase: the ``[low, high]`` range ``φ_k`` is drawn from, uniformly.
        x_range: the ``[low, high]`` range the inputs are drawn from, uniformly.
        noise_std: the standard deviation of the Gaussian noise added to the labels (``0``: none).

    Example:
        >>> from lightning_metafed.data import SinusoidClients
        >>> data = SinusoidClients(num_clients=1000, clients_per_round=8, support_size=5, query_size=10, seed=0)
        >>> data.setup("fit")
        >>> batch = data.round_batch(0)
        >>> tuple(batch.support_x.shape), tuple(batch.query_y.shape)
        ((8, 5, 1), (8, 10, 1))
        >>> batch.client_id.equal(data.round_batch(0).client_id)  # a round is a function of (seed, round)
        True
        >>> amplitude, phase = data.client_function(0)
        >>> 0.1 <= amplitude <= 5.0, 0.0 <= phase <= 3.1416
        (True, True)
    """

    def __init__(
        self,
        num_clients: int = 100_000,
        examples_per_client: int = 100,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise_std: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        check_int("num_clients", num_clients, minimum=1)
        check_int("examples_per_client", examples_per_client, minimum=2)
        check_positive("noise_std", noise_std, allow_zero=True)
        self.num_clients = num_clients
        self.examples_per_client = examples_per_client
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x_range", x_range)
        self.noise_std = float(noise_std)

    def functions(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``[m]`` float64 amplitudes and phases of clients ``ids``: ``A = low + (high - low) u`` with
        ``u = unit(mix(seed, POPULATION, k, 0, 0))`` (the phase from ``..., 0, 1``)."""
        h = extend(hash_state(self.seed, POPULATION, ids), 0)
        u_amp, u_phase = (unit_tensor(finish(extend(h, t))) for t in (0, 1))
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u_amp
        return amp, self.phase[0] + (self.phase[1] - self.phase[0]) * u_phase

    def client_function(self, k: int) -> tuple[float, float]:
        """Client ``k``'s ``(amplitude, phase)``."""
        amp, phase = self.functions(torch.tensor([k]))
        return float(amp[0]), float(phase[0])

    def examples(self, ids: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Examples ``index[i]`` (``[m, k]``) of clients ``ids[i]``, generated for all clients at once:
        ``x_j = low + (high - low) unit(mix(seed, POPULATION, k, 1, j))`` (float32) and
        ``y_j = A sin(x_j + φ) + noise_std · z_j`` computed in float64, with ``z_j`` a Box–Muller normal
        of ``unit(mix(..., 2, j))`` and ``unit(mix(..., 3, j))``. Returns ``[m, k, 1]`` float32 tensors."""
        amp, phase = self.functions(ids)
        h = hash_state(self.seed, POPULATION, ids)[:, None]
        low, high = self.x_range
        x = (low + (high - low) * unit_tensor(finish(extend(extend(h, 1), index)))).float()
        y = amp[:, None] * torch.sin(x.double() + phase[:, None])
        if self.noise_std > 0:
            u1, u2 = (unit_tensor(finish(extend(extend(h, t), index))) for t in (2, 3))
            y = y + self.noise_std * torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)
        return x[..., None], y.float()[..., None]

    def make_client(self, k: int) -> ClientData:
        x, y = self.examples(torch.tensor([k]), torch.arange(self.examples_per_client)[None])
        return ClientData(x[0], y[0])

    def build_population(self) -> Population:
        return LazyPopulation(self.num_clients, self.make_client, self.examples_per_client, gather=self.examples)
