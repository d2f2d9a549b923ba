"""scikit-learn's bundled 8×8 handwritten digits (1,797 real images, no download) split into clients."""

from __future__ import annotations

from typing import Any

import torch

from lightning_metafed._validation import check_int
from lightning_metafed.data.datamodule import FederatedDataModule
from lightning_metafed.data.partition import Dirichlet, Partitioner
from lightning_metafed.data.partitioned import (
    PartitionedPopulation,
    check_partitioner,
    tensor_loader,
)
from lightning_metafed.data.population import Population

__all__ = ["DigitsClients", "load_digits_tensors"]


def load_digits_tensors(images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as float features in [0, 1] (``[N, 64]``, or ``[N, 1, 8, 8]``) and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("DigitsClients needs scikit-learn: pip install 'lightning-metafed[digits]'") from err
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return x, torch.tensor(digits.target, dtype=torch.long)


class DigitsClients(FederatedDataModule):
    """The 8×8 digits (10 classes) partitioned into ``num_clients`` clients by ``partitioner``
    (default ``Dirichlet(alpha=0.5, min_size=15)`` label skew, so every client can give 5 support
    and 10 query examples).

    Args:
        num_clients: how many clients the digits are split into.
        partitioner: how the examples are split into clients (``None``: the Dirichlet label skew above).
        images: yield ``[1, 8, 8]`` images (for conv nets) instead of 64 flat features.
        support_size: support examples per sampled client (int, or a fraction of its data).
        query_size: query examples per sampled client (int, or a fraction).
    """

    num_classes = 10

    def __init__(
        self,
        num_clients: int = 20,
        partitioner: Partitioner | None = None,
        images: bool = False,
        support_size: int | float = 5,
        query_size: int | float = 10,
        **kwargs: Any,
    ):
        super().__init__(support_size=support_size, query_size=query_size, **kwargs)
        self.partitioner = check_partitioner(Dirichlet(alpha=0.5, min_size=15) if partitioner is None else partitioner)
        check_int("num_clients", num_clients, minimum=1)
        self.num_clients = num_clients
        self.images = bool(images)

    def build_population(self) -> Population:
        x, y = load_digits_tensors(self.images)
        parts = self.partitioner(y, self.num_clients, self.seed)
        return PartitionedPopulation(parts, tensor_loader(x, y), tensors=(x, y))
