"""``StatefulModule``: the shell of algorithms whose clients keep state between the rounds they join.

A subclass gives the state of a client never seen (:meth:`StatefulModule.initial_state`), its
``client_update(meta, task, state) -> (upload, aux, new_state)`` and, for evaluation, a client's
starting parameters from its state (:meth:`StatefulModule.personal_params`). The store is in memory,
or bounded in memory with the rest spilled to a scratch file (``max_resident_rows``); either way it
is saved in checkpoints and only visited clients take space. Evaluated clients start from their
stored state (the local protocol: the same clients as in training), or from the initial state when
the module never saw them (the unseen protocol).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_metafed._validation import check_int
from lightning_metafed.algorithms.base import MetaFedModule
from lightning_metafed.data.task_batch import TaskBatch
from lightning_metafed.functional.client_task import Params
from lightning_metafed.round import ClientStateStore, InMemoryClientState, SpillingClientState

__all__ = ["StatefulModule", "make_store"]


def make_store(initial: Callable[[Any], Mapping[str, Tensor]], max_resident_rows: int | None) -> ClientStateStore:
    """An in-memory store (``max_resident_rows=None``), or one holding at most that many rows in
    memory and the rest in a scratch file in the system's temporary directory."""
    if max_resident_rows is None:
        return InMemoryClientState(initial)
    check_int("max_resident_rows", max_resident_rows, minimum=0)
    return SpillingClientState(initial, tempfile.gettempdir(), max_resident_rows)


class StatefulModule(MetaFedModule):
    """Base class of the algorithms with per-client state (see the module docstring).

    Args:
        net: the model (``None``: :meth:`~lightning_metafed.MetaFedModule.build_net`).
        max_resident_rows: ``None`` keeps every visited client's state in memory; an integer keeps at
            most that many rows in memory and spills the others to a scratch file.

    Every other argument is :class:`~lightning_metafed.MetaFedModule`'s.
    """

    def __init__(self, net: nn.Module | None = None, max_resident_rows: int | None = None, **kwargs: Any):
        super().__init__(net=net, **kwargs)
        self.max_resident_rows = max_resident_rows
        self.client_state = make_store(self.initial_state, max_resident_rows)

    def initial_state(self, key: Any) -> Params:
        """The state row of a client never seen (may read the current meta-parameters)."""
        raise NotImplementedError

    def personal_params(self, meta: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> Params:
        """One client's starting parameters ``{module param name: tensor}`` for evaluation, from the
        meta-parameters and its state row (pure: it is vmapped over the evaluated clients)."""
        raise NotImplementedError

    def evaluation_params(self, batch: TaskBatch) -> Params:
        rows = self.client_state.gather(batch.client_id)  # reading only: unseen clients get initial rows
        return self.runner.map(self.personal_params, (self.meta_parameters(detach=True),), (rows,))
