"""Shared machinery for sources that split one labelled dataset into clients with a partitioner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_metafed.data.partition import Dirichlet, Partitioner
from lightning_metafed.data.population import ClientData, Population

__all__ = ["PartitionedPopulation", "as_label", "check_partitioner"]


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
    """Clients holding the example ``parts[i]`` of a dataset; ``load(indices) -> (x, y)``.
    ``in_memory``: ``load`` indexes tensors already in memory (rather than reading items on demand)."""

    def __init__(self, parts: list[Tensor], load: Callable[[Tensor], tuple[Tensor, Tensor]], in_memory: bool = False):
        self.parts = parts
        self.load = load
        self.in_memory = bool(in_memory)

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


def as_label(value: Any, index: int) -> Tensor:
    """Item ``index``'s class label as a 0-d tensor: int64 for an integer label; a float label keeps
    its dtype, so the checks reject it instead of it being truncated to an integer."""
    label = torch.as_tensor(value)
    if label.numel() != 1:
        raise ValueError(f"Expected `dataset` item {index} to have one class label, got a label of shape {tuple(label.shape)}")
    label = label.reshape(())
    return label if label.is_floating_point() or label.is_complex() else label.long()


def dataset_loader(dataset):
    """``load(indices)`` for a map-style dataset of ``(x, y)`` items."""

    def load(indices: Tensor) -> tuple[Tensor, Tensor]:
        indices = indices.tolist()
        items = [dataset[j] for j in indices]
        xs = torch.stack([torch.as_tensor(item[0]) for item in items])
        ys = torch.stack([as_label(item[1], j) for j, item in zip(indices, items)])
        return xs, ys

    return load
