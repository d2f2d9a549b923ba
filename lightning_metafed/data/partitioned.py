"""Shared machinery for sources that split one labelled dataset into clients with a partitioner."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_metafed.data.partition import Dirichlet, Partitioner
from lightning_metafed.data.population import ClientData, Population

__all__ = ["PartitionedPopulation", "check_partitioner"]


def check_partitioner(partitioner: Partitioner | None) -> Partitioner:
    """``partitioner`` or the default ``Dirichlet(alpha=0.5)``; a clear error for anything else."""
    partitioner = Dirichlet(alpha=0.5) if partitioner is None else partitioner
    if not isinstance(partitioner, Partitioner):
        raise ValueError(
            "Expected `partitioner` to be a lightning_metafed.data.partition.Partitioner (IID, Dirichlet, Shards, "
            f"QuantitySkew), got {type(partitioner).__name__}"
        )
    return partitioner


class PartitionedPopulation(Population):
    """Clients holding the example ``parts[i]`` of a dataset; ``load(indices) -> (x, y)``."""

    def __init__(self, parts: list[Tensor], load: Callable[[Tensor], tuple[Tensor, Tensor]]):
        self.parts = parts
        self.load = load

    def __len__(self) -> int:
        return len(self.parts)

    def size(self, i: int) -> int:
        return len(self.parts[i])

    def support_end(self, i: int) -> None:
        return None

    def client(self, i: int) -> ClientData:
        x, y = self.load(self.parts[i])
        return ClientData(x, y)


def tensor_loader(x: Tensor, y: Tensor):
    """``load(indices)`` for in-memory tensors."""

    def load(indices: Tensor) -> tuple[Tensor, Tensor]:
        return x[indices], y[indices]

    return load


def dataset_loader(dataset):
    """``load(indices)`` for a map-style dataset of ``(x, y)`` items."""

    def load(indices: Tensor) -> tuple[Tensor, Tensor]:
        items = [dataset[int(j)] for j in indices]
        xs = torch.stack([torch.as_tensor(item[0]) for item in items])
        ys = torch.as_tensor([int(item[1]) for item in items])
        return xs, ys

    return load
