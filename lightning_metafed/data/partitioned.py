"""Shared machinery for sources that split one labelled dataset into clients with a partitioner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_metafed.data.packed import Packed
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

    ``tensors=(x, y)``: the dataset is these tensors (``load`` indexes them): the population is then
    in memory and ``batched``, reading a round's examples with one indexing operation through the
    concatenated parts (no example is copied)."""

    def __init__(
        self,
        parts: list[Tensor],
        load: Callable[[Tensor], tuple[Tensor, Tensor]],
        tensors: tuple[Tensor, Tensor] | None = None,
    ):
        self.parts = parts
        self.load = load
        self._sizes = torch.tensor([len(p) for p in parts], dtype=torch.long)
        self.in_memory = self.batched = tensors is not None
        self.packed: Packed | None = None
        if tensors is not None:
            order = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), self._sizes.cumsum(0)])
            self.packed = Packed(*tensors, offsets, torch.full((len(parts),), -1, dtype=torch.long), order.long())

    def __len__(self) -> int:
        return len(self.parts)

    def size(self, i: int) -> int:
        return len(self.parts[i])

    def sizes(self, rows: Tensor) -> Tensor:
        return self._sizes[rows]

    def support_end(self, i: int) -> None:
        return None

    def support_ends(self, rows: Tensor) -> Tensor:
        return torch.full((len(rows),), -1, dtype=torch.long)

    def global_ids(self, rows: Tensor) -> Tensor:
        return rows.clone()

    def gather(self, rows: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        if self.packed is None:
            return super().gather(rows, index)
        return self.packed.gather(rows, index)

    def client(self, i: int) -> ClientData:
        x, y = self.load(self.parts[i])
        return ClientData(x, y)

    def read(self, i: int, index: Tensor) -> ClientData:
        x, y = self.load(self.parts[i][index])
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
