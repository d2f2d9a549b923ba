"""Few-shot N-way K-shot episodes as clients (Omniglot / mini-ImageNet style meta-learning)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_metafed._validation import check_int
from lightning_metafed.data.datamodule import FederatedDataModule
from lightning_metafed.data.sizes import check_fractions
from lightning_metafed.data.dataset import dataset_labels
from lightning_metafed.data.population import ClientData, LazyPopulation, Population
from lightning_metafed.data.seeding import POPULATION, generator

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
        return {
            split: LazyPopulation(
                counts[split] if len(pools[split]) >= self.ways else 0,
                self._episode_maker(split_id, pools[split], per_class),
                size,
                end,
            )
            for split_id, split in enumerate(pools)
        }

    def _episode_maker(self, split_id: int, pool: list[int], per_class: dict[int, torch.Tensor]) -> Callable[[int], ClientData]:
        def make(k: int) -> ClientData:
            g = generator(self.seed, POPULATION, split_id, k)
            chosen = [pool[j] for j in torch.randperm(len(pool), generator=g)[: self.ways].tolist()]
            support, query = [], []
            for c in chosen:
                idx = per_class[c]
                picked = idx[torch.randperm(len(idx), generator=g)[: self.shots + self.queries]]
                support.append(picked[: self.shots])
                query.append(picked[self.shots :])
            order = torch.cat(support + query)
            items = [self.dataset[int(j)] for j in order]
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            y = torch.cat(
                [torch.full((self.shots,), w) for w in range(self.ways)] + [torch.full((self.queries,), w) for w in range(self.ways)]
            ).long()
            return ClientData(x, y, self.ways * self.shots)

        return make
