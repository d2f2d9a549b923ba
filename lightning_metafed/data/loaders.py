"""The datasets behind the data module's loaders: one TaskBatch per round; held-out clients in batches."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_metafed.data.task_batch import TaskBatch

if TYPE_CHECKING:  # pragma: no cover
    from lightning_metafed.data.datamodule import FederatedDataModule

__all__ = ["EvalBatches", "Rounds", "RoundsLoader"]


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


class RoundsLoader(DataLoader):
    """The loader of :class:`Rounds`. It is resumable by construction: the next round is the
    trainer's ``global_step``, restored with the checkpoint, so it has no state of its own to save
    (Lightning checks for ``state_dict``/``load_state_dict`` to know a loader resumes mid-epoch)."""

    def __init__(self, rounds: Rounds):
        super().__init__(rounds, batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


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
