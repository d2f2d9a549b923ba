"""The datasets behind the data module's loaders: one TaskBatch per round; held-out clients in batches.

Round batches can be built ahead of the round by a background thread, ``FederatedDataModule.prefetch``
rounds ahead (by default one on an accelerator, none on a CPU), so drawing and stacking the next
round's clients overlaps the current round's compute. Prefetching never changes what a run sees:
the thread builds exactly the rounds the loop would have built, in the same order, and each one
is a pure function of ``(seed, round)``.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_metafed.data.task_batch import TaskBatch

if TYPE_CHECKING:  # pragma: no cover
    from lightning_metafed.data.datamodule import FederatedDataModule

__all__ = ["PREFETCH_THREAD_NAME", "EvalBatches", "Rounds", "RoundsLoader"]

#: The name of the thread that builds upcoming round batches.
PREFETCH_THREAD_NAME = "metafed-prefetch"
#: Seconds between the thread's checks of the stop request while the queue is full.
_POLL_S = 0.05
#: Seconds the consumer waits for the thread to finish its current round once told to stop.
_JOIN_S = 5.0


class _End:
    """Queued after the last round of the epoch."""


class _Failure:
    """Queued instead of the batch whose construction raised ``error``."""

    def __init__(self, error: BaseException):
        self.error = error


def _root_device(trainer: Any) -> torch.device | None:
    return getattr(getattr(trainer, "strategy", None), "root_device", None)


def _depth(prefetch: int | None, trainer: Any) -> int:
    """Rounds to build ahead: ``prefetch``, or when it is ``None`` one on an accelerator and none on
    a CPU (or without a trainer), where the thread would compete with the round for the cores."""
    if prefetch is not None:
        return prefetch
    device = _root_device(trainer)
    return 1 if device is not None and getattr(device, "type", "cpu") != "cpu" else 0


def _pin_device(trainer: Any) -> torch.device | None:
    """The trainer's root device when it is a CUDA device (batches are then pinned), else ``None``."""
    device = _root_device(trainer)
    return device if getattr(device, "type", None) == "cuda" else None


class _Prefetcher:
    """Builds ``build(r)`` for ``rounds`` in order in a daemon thread, at most ``depth`` ahead.

    The thread only ever calls ``build`` on the rounds given, one after the other, and the
    consumer receives them through a FIFO queue, so the sequence it yields is the sequence
    ``build(r) for r in rounds`` — the same as without prefetching as long as ``build`` is a pure
    function of the round (it is: every draw is a hash of ``(seed, round, client, ...)`` or comes
    from a generator seeded by one, never from a global RNG, so neither thread perturbs the other's
    random state).
    """

    def __init__(self, build: Callable[[int], TaskBatch], rounds: Iterable[int], depth: int, pin: torch.device | None):
        self.build, self.rounds, self.pin = build, rounds, pin
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=PREFETCH_THREAD_NAME, daemon=True)

    def _put(self, item: Any) -> bool:
        """Queue ``item``, waiting for room unless told to stop; whether it was queued."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            if self.pin is not None and self.pin.index is not None:
                torch.cuda.set_device(self.pin)  # pin on the trainer's device, as torch's pin-memory thread does
            for r in self.rounds:
                if self.stop.is_set():
                    return
                batch = self.build(r)
                if self.pin is not None:
                    batch = batch.pin_memory()
                if not self._put(batch):
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised by the consumer where this batch was due
            self._put(_Failure(error))
            return
        self._put(_End())

    def __iter__(self) -> Iterator[TaskBatch]:
        """The batches in round order; a failure is raised where its batch was due. Closing the
        generator early (or its collection) stops the thread after the round it is building."""
        self.thread.start()
        try:
            while True:
                item = self.queue.get()
                if isinstance(item, _End):
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            self.stop.set()
            self.thread.join(_JOIN_S)


class Rounds(IterableDataset):
    """One TaskBatch per round, from the trainer's next round to the end of the current epoch.

    With ``prefetch > 0`` on the data module (``None``: one on an accelerator, none on a CPU), a
    background thread builds up to ``prefetch`` upcoming rounds ahead of the loop (pinned when the
    trainer runs on CUDA); the rounds and their order are the same as with ``prefetch=0``, which
    builds each round when it is requested.
    """

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
        rounds = range(start, (start // R + 1) * R)
        depth = _depth(getattr(self.dm, "prefetch", None), trainer)
        if depth <= 0:
            for r in rounds:
                yield self.dm.round_batch(r)
            return
        yield from _Prefetcher(self.dm.round_batch, rounds, depth, _pin_device(trainer))


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
