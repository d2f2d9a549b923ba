"""Few-shot N-way K-shot episodes as clients (Omniglot / mini-ImageNet style meta-learning)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_metafed._validation import check_int
from lightning_metafed.data.datamodule import FederatedDataModule
from lightning_metafed.data.dataset import dataset_labels
from lightning_metafed.data.draws import order
from lightning_metafed.data.population import ClientData, LazyPopulation, Population
from lightning_metafed.data.seeding import POPULATION, extend, generator, hash_state
from lightning_metafed.data.sizes import check_fractions

__all__ = ["EpisodicClients"]


class EpisodicClients(FederatedDataModule):
    """Each client is an episode: ``ways`` classes with ``shots`` support and ``queries`` query
    examples each, labels relabelled to ``0..ways−1`` in a random order.

    The dataset's classes are split into disjoint train/val/test class sets (``class_split``), so
    validation and test episodes use classes never seen in training. Episode ``k`` of a split is a
    pure function of ``(seed, split, k)``; train episodes are generated lazily (``num_train_clients``
    can be huge). ``support_size``/``query_size`` are fixed to ``ways·shots``/``ways·queries``.

    Args:
        dataset: a map-style dataset of ``(x, y)`` items with integer classes.
        num_eval_clients: episodes in each of the val and test sets.
    """

    hparams_ignore = ("dataset",)

    def __init__(
        self,
        dataset: Dataset,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        class_split: tuple[float, float, float] = (0.64, 0.16, 0.2),
        num_train_clients: int = 100_000,
        num_eval_clients: int = 100,
        **kwargs: Any,
    ):
        defaults = inspect.signature(FederatedDataModule.__init__).parameters
        for name in ("support_size", "query_size", "eval_support_size", "protocol", "client_split", "local_split"):
            # LightningCLI passes every base argument, at its default when not set: only reject real choices.
            if name in kwargs and kwargs[name] != defaults[name].default and not (
                isinstance(kwargs[name], (list, tuple)) and tuple(kwargs[name]) == tuple(defaults[name].default)
            ):
                raise ValueError(
                    f"EpisodicClients sets `{name}` itself (from ways, shots and queries and class_split); "
                    f"got {name}={kwargs[name]!r}"
                )
            kwargs.pop(name, None)
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries), ("num_train_clients", num_train_clients), ("num_eval_clients", num_eval_clients)):
            check_int(name, value, minimum=1)
        super().__init__(support_size=ways * shots, query_size=ways * queries, **kwargs)
        self.dataset = dataset
        self.ways, self.shots, self.queries = ways, shots, queries
        self.class_split = check_fractions("class_split", class_split)
        self.num_train_clients, self.num_eval_clients = num_train_clients, num_eval_clients
        self.num_classes = ways

    def populations(self) -> dict[str, Population]:
        labels = dataset_labels(self.dataset)
        classes = torch.unique(labels)
        per_class = {int(c): (labels == c).nonzero().reshape(-1) for c in classes}
        need = self.shots + self.queries
        for c, idx in per_class.items():
            if len(idx) < need:
                raise ValueError(
                    f"Class {c} has {len(idx)} examples; an episode needs `shots` + `queries` = {need} per class"
                )
        order = classes[torch.randperm(len(classes), generator=generator(self.seed, POPULATION))].tolist()
        n_val = int(round(len(order) * self.class_split[1]))
        n_test = int(round(len(order) * self.class_split[2]))
        pools = {
            "train": order[: len(order) - n_val - n_test],
            "val": order[len(order) - n_val - n_test : len(order) - n_test],
            "test": order[len(order) - n_test :],
        }
        for split, fraction in zip(pools, self.class_split):
            if fraction > 0 and len(pools[split]) < self.ways:
                raise ValueError(
                    f"`class_split` {self.class_split} of {len(order)} classes gives the {split} split "
                    f"{len(pools[split])} classes, fewer than `ways`={self.ways}"
                )
        size, end = self.ways * need, self.ways * self.shots
        counts = {"train": self.num_train_clients, "val": self.num_eval_clients, "test": self.num_eval_clients}
        table, sizes = _class_table(per_class, int(classes.max()) + 1)
        x_tensor = dataset_tensor(self.dataset)
        populations = {}
        for split_id, split in enumerate(pools):
            episodes = Episodes(self, split_id, torch.tensor(pools[split], dtype=torch.long), table, sizes, x_tensor)
            populations[split] = LazyPopulation(
                counts[split] if len(pools[split]) >= self.ways else 0,
                episodes.client,
                size,
                end,
                gather=episodes.gather if x_tensor is not None else None,
            )
        return populations


def _class_table(per_class: dict[int, torch.Tensor], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[classes, most]`` dataset indices of each class's examples (padded with 0) and their counts."""
    sizes = torch.zeros(num_classes, dtype=torch.long)
    table = torch.zeros(num_classes, max(len(v) for v in per_class.values()), dtype=torch.long)
    for c, idx in per_class.items():
        sizes[c] = len(idx)
        table[c, : len(idx)] = idx
    return table, sizes


def dataset_tensor(dataset: Dataset) -> torch.Tensor | None:
    """The features of a plain ``TensorDataset`` of ``(x, y)`` (item ``j`` is ``x[j]``), else ``None``."""
    if type(dataset) is TensorDataset and len(dataset.tensors) == 2:
        return dataset.tensors[0]
    return None


class Episodes:
    """The episodes of one split, many at once: episode ``k`` (``h = hash_state(seed, POPULATION,
    split, k)``) takes the classes at the first ``ways`` positions of ``order(extend(h, 0), |pool|)``
    and, from its ``w``-th class, the examples at the first ``shots + queries`` positions of
    ``order(extend(h, 1 + w), |class|)`` (see :mod:`lightning_metafed.data.draws`)."""

    def __init__(self, source: EpisodicClients, split_id: int, pool: torch.Tensor, table: torch.Tensor,
                 sizes: torch.Tensor, x: torch.Tensor | None):
        self.source, self.split_id, self.pool, self.table, self.sizes, self.x = source, split_id, pool, table, sizes, x
        ways, shots, queries = source.ways, source.shots, source.queries
        self.labels = torch.cat([torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat_interleave(queries)])

    def indices(self, ids: torch.Tensor) -> torch.Tensor:
        """``[m, ways·(shots + queries)]`` dataset indices: every class's support, then every class's query."""
        src = self.source
        m, ways, k = len(ids), src.ways, src.shots + src.queries
        h = hash_state(src.seed, POPULATION, self.split_id, ids)
        classes = self.pool[order(extend(h, 0), torch.full((m,), len(self.pool)), ways)]
        per_class = extend(h[:, None], 1 + torch.arange(ways)).reshape(-1)
        picked = order(per_class, self.sizes[classes].reshape(-1), k)
        picked = self.table[classes.reshape(-1, 1), picked].reshape(m, ways, k)
        return torch.cat([picked[:, :, : src.shots].reshape(m, -1), picked[:, :, src.shots :].reshape(m, -1)], dim=1)

    def client(self, k: int) -> ClientData:
        order_ = self.indices(torch.tensor([k]))[0]
        if self.x is not None:
            x = self.x[order_]
        else:
            x = torch.stack([torch.as_tensor(self.source.dataset[int(j)][0]) for j in order_])
        return ClientData(x, self.labels.clone(), self.source.ways * self.source.shots)

    def gather(self, rows: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.indices(rows).gather(1, index)
        x = self.x.index_select(0, flat.reshape(-1)).reshape(*flat.shape, *self.x.shape[1:])
        return x, self.labels[index]
