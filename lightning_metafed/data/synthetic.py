"""Synthetic(α, β): the non-IID classification benchmark of FedProx, also used by pFedMe."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_metafed._validation import check_int, check_positive
from lightning_metafed.data.datamodule import FederatedDataModule
from lightning_metafed.data.population import ClientData, ListPopulation, Population
from lightning_metafed.data.seeding import POPULATION, generator

__all__ = ["SyntheticClients"]


class SyntheticClients(FederatedDataModule):
    """Synthetic(α, β) of Li et al., 2020 ("Federated Optimization in Heterogeneous Networks").

    For client ``k``: ``u_k ~ N(0, α)``, ``B_k ~ N(0, β)``; model ``W_k ~ N(u_k, 1)`` (``[d, C]``),
    ``b_k ~ N(u_k, 1)``; features ``x ~ N(v_k, Σ)`` with ``v_k ~ N(B_k, 1)`` and diagonal
    ``Σ_jj = j^{-1.2}``; labels ``y = argmax softmax(x W_k + b_k)``. ``α`` controls how much the
    clients' models differ, ``β`` how much their features differ (both used as standard deviations, as
    in the FedProx generator). With ``iid=True`` all clients share one model and ``v_k = B_k = 0``.
    Client sizes are ``floor(LogNormal(size_mean, size_sigma)) + min_samples``, optionally capped at
    ``max_samples``. Each client is drawn from its own ``(seed, k)`` stream, so a client's data does
    not depend on the population size.

    Args:
        alpha: ``α``, the standard deviation of ``u_k``: how much the clients' models differ.
        beta: ``β``, the standard deviation of ``B_k``: how much the clients' features differ.
        num_clients: how many clients the population holds.
        dimension: ``d``, the number of features.
        num_classes: ``C``, the number of classes.
        iid: every client shares one model and ``v_k = B_k = 0``.
        size_mean: the mean of the log-normal client size.
        size_sigma: the standard deviation of the log-normal client size.
        min_samples: added to every client's size.
        max_samples: the largest client size (``None``: no cap).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.5,
        num_clients: int = 100,
        dimension: int = 60,
        num_classes: int = 10,
        iid: bool = False,
        size_mean: float = 4.0,
        size_sigma: float = 2.0,
        min_samples: int = 50,
        max_samples: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        for name, value in (("alpha", alpha), ("beta", beta), ("size_sigma", size_sigma)):
            check_positive(name, value, allow_zero=True)
        for name, value, low in (("num_clients", num_clients, 1), ("dimension", dimension, 1), ("num_classes", num_classes, 2), ("min_samples", min_samples, 1)):
            check_int(name, value, minimum=low)
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < min_samples):
            raise ValueError(f"Expected `max_samples` to be None or an integer >= `min_samples` ({min_samples}), got {max_samples!r}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.num_clients, self.dimension, self.num_classes = num_clients, dimension, num_classes
        self.iid = bool(iid)
        self.size_mean, self.size_sigma = float(size_mean), float(size_sigma)
        self.min_samples, self.max_samples = min_samples, max_samples

    def make_client(self, k: int) -> ClientData:
        d, C = self.dimension, self.num_classes
        g = generator(self.seed, POPULATION, k)
        size = int(math.floor(math.exp(self.size_mean + self.size_sigma * float(torch.randn((), generator=g, dtype=torch.float64))))) + self.min_samples
        if self.max_samples is not None:
            size = min(size, self.max_samples)
        if self.iid:
            shared = generator(self.seed, POPULATION, -1)
            W = torch.randn(d, C, generator=shared, dtype=torch.float64)
            b = torch.randn(C, generator=shared, dtype=torch.float64)
            v = torch.zeros(d, dtype=torch.float64)
        else:
            u = self.alpha * float(torch.randn((), generator=g, dtype=torch.float64))
            B = self.beta * float(torch.randn((), generator=g, dtype=torch.float64))
            W = u + torch.randn(d, C, generator=g, dtype=torch.float64)
            b = u + torch.randn(C, generator=g, dtype=torch.float64)
            v = B + torch.randn(d, generator=g, dtype=torch.float64)
        std = torch.arange(1, d + 1, dtype=torch.float64).pow(-0.6)  # Σ_jj = j^-1.2
        x = v + std * torch.randn(size, d, generator=g, dtype=torch.float64)
        y = torch.argmax(x @ W + b, dim=1)  # softmax is monotone: argmax of the logits
        return ClientData(x.float(), y)

    def build_population(self) -> Population:
        return ListPopulation([self.make_client(k) for k in range(self.num_clients)])
