"""The sinusoid regression benchmark of MAML (Finn, Abbeel & Levine, 2017), one client per sine."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_metafed._validation import check_int, check_positive
from lightning_metafed.data.datamodule import FederatedDataModule
from lightning_metafed.data.population import ClientData, LazyPopulation, Population
from lightning_metafed.data.seeding import POPULATION, generator

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

    def client_function(self, k: int) -> tuple[float, float]:
        """Client ``k``'s ``(amplitude, phase)``."""
        g = generator(self.seed, POPULATION, k)
        u = torch.rand(2, generator=g, dtype=torch.float64)
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * float(u[0])
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * float(u[1])
        return amp, phase

    def make_client(self, k: int) -> ClientData:
        amp, phase = self.client_function(k)
        g = generator(self.seed, POPULATION, k, 1)
        low, high = self.x_range
        x = low + (high - low) * torch.rand(self.examples_per_client, 1, generator=g)
        y = amp * torch.sin(x + phase)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=g)
        return ClientData(x, y)

    def build_population(self) -> Population:
        return LazyPopulation(self.num_clients, self.make_client, self.examples_per_client)
