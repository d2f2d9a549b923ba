"""The datasets behind the data module's loaders: one TaskBatch per round; held-out clients in batches."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch.utils.data import Dataset, IterableDataset

from lightning_metafed.data.task_batch import TaskBatch

if TYPE_CHECKING:  # pragma: no cover
    from lightning_metafed.data.datamodule import FederatedDataModule

__all__ = ["EvalBatches", "Rounds"]


class Rounds(IterableDataset):
    """One TaskBatch per round, from the trainer's next round to the end of the current epoch."""

    def __init__(self, datamodule: FederatedDataModule):
        self.dm = datamodule
        self.iterations = 0

    def __len__(self) -> int:
        return self.dm.rounds_per_epoch

    def __iter__(self) -> Iterator[TaskBatch]:
        R = self.dm.rounds_per_epoch
        trainer = self.dm.trainer
        start = trainer.global_step if trainer is not None else self.iterations * R
        self.iterations += 1
        for r in range(start, (start // R + 1) * R):
            yield self.dm.round_batch(r)


class EvalBatches(Dataset):
    def __init__(self, datamodule: FederatedDataModule, split: str):
        self.dm = datamodule
        self.split = split
        self.n = len(datamodule.population(split))

    def __len__(self) -> int:
        return math.ceil(self.n / self.dm.eval_clients_per_batch)

    def __getitem__(self, k: int) -> TaskBatch:
        if not 0 <= k < len(self):
            raise IndexError(k)
        B = self.dm.eval_clients_per_batch
        return self.dm.eval_batch(self.split, range(k * B, min((k + 1) * B, self.n)))
