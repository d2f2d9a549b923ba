"""Any map-style labelled dataset (e.g. a torchvision dataset on disk) split into clients."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_metafed._validation import check_int
from lightning_metafed.data.datamodule import FederatedDataModule
from lightning_metafed.data.partition import Partitioner
from lightning_metafed.data.partitioned import (
    PartitionedPopulation,
    as_label,
    check_partitioner,
    dataset_loader,
)
from lightning_metafed.data.population import Population

__all__ = ["DatasetClients", "dataset_labels"]


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Integer labels of a dataset: its ``targets`` attribute when present, else ``dataset[i][1]``.
    Float labels are rejected (a classification source is given float targets)."""
    targets = getattr(dataset, "targets", None)
    if type(dataset) is TensorDataset and len(dataset.tensors) == 2:  # item j's label is tensors[1][j]
        labels, where = dataset.tensors[1].reshape(len(dataset), -1 if len(dataset) else 1), "the `dataset`'s label tensor"
        if labels.shape[1] != 1:
            shape = tuple(dataset.tensors[1].shape[1:])
            raise ValueError(f"Expected `dataset` item 0 to have one class label, got a label of shape {shape}")
        labels = labels[:, 0]
    elif targets is not None:
        labels, where = torch.as_tensor(targets).reshape(-1), "`dataset.targets`"
    else:
        labels, where = [as_label(dataset[i][1], i) for i in range(len(dataset))], "`dataset` items"
        labels = torch.stack(labels) if labels else torch.empty(0, dtype=torch.long)
    if labels.numel() and (labels.is_floating_point() or labels.is_complex()):
        raise ValueError(
            f"Expected integer class labels in {where}, got a float target of dtype {labels.dtype} "
            f"(first values {labels[:5].tolist()}); pass integer labels"
        )
    return labels.long()


def tensor_backing(dataset: Dataset, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x, labels)`` when ``dataset`` is a plain ``TensorDataset`` of ``(x, y)`` (item ``j`` is
    ``(x[j], y[j])``), so rounds can read it with one indexing operation; else ``None``."""
    if type(dataset) is TensorDataset and len(dataset.tensors) == 2:
        return dataset.tensors[0], labels
    return None


class DatasetClients(FederatedDataModule):
    """A map-style dataset of ``(x, y)`` items (``y`` an integer class) partitioned into clients.

    Items are loaded (and transformed by the dataset) when a client is sampled, so only the
    partition's indices stay in memory. A plain ``TensorDataset`` is read directly: a round's
    examples with one indexing operation. From YAML::

        data:
          class_path: lightning_metafed.data.DatasetClients
          init_args:
            dataset:
              class_path: torchvision.datasets.MNIST
              init_args: {root: /data, train: true, transform: {class_path: torchvision.transforms.ToTensor}}
            num_classes: 10
            partitioner: {class_path: lightning_metafed.data.partition.Shards, init_args: {classes_per_client: 2}}

    Args:
        dataset: the dataset.
        num_clients: number of clients.
        partitioner: how examples are divided (default ``Dirichlet(alpha=0.5)``).
        num_classes: number of classes (labels are checked against it); inferred when ``None``.
    """

    hparams_ignore = ("dataset",)

    def __init__(
        self,
        dataset: Dataset,
        num_clients: int = 100,
        partitioner: Partitioner | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError(f"Expected `dataset` to be a map-style dataset (with __len__ and __getitem__), got {type(dataset).__name__}")
        check_int("num_clients", num_clients, minimum=1)
        self.dataset = dataset
        self.num_clients = num_clients
        self.partitioner = check_partitioner(partitioner)
        self.num_classes = num_classes

    def build_population(self) -> Population:
        labels = dataset_labels(self.dataset)
        if self.num_classes is None:
            self.num_classes = int(labels.max()) + 1
        elif (labels < 0).any() or (labels >= self.num_classes).any():
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            raise ValueError(f"Expected dataset labels in [0, {self.num_classes}) (`num_classes`), got {bad[:5].tolist()}")
        parts = self.partitioner(labels, self.num_clients, self.seed)
        return PartitionedPopulation(parts, dataset_loader(self.dataset), tensors=tensor_backing(self.dataset, labels))
