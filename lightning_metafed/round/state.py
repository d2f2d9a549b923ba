"""Per-client state: rows of named tensors looked up by client id, carried between the rounds a
client joins.

The round gathers the sampled clients' rows (a client never seen gets its initial row), passes them
to the client function beside the task, and the caller writes the returned rows back for the
clients whose upload was accepted (dropped or rejected clients keep their old state). Only
clients actually visited take memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_metafed.functional.client_task import Params

__all__ = ["ClientStateStore", "InMemoryClientState", "client_keys"]


def client_keys(client_id: Any) -> list[Any]:
    """The ids of a round's clients as hashable Python values (``[m]`` tensor or sequence)."""
    if client_id is None:
        raise ValueError("Per-client state needs the clients' ids: expected `client_id` in the TaskBatch, got None")
    return client_id.tolist() if isinstance(client_id, Tensor) else list(client_id)


@runtime_checkable
class ClientStateStore(Protocol):
    """What the round needs of a per-client state store."""

    def gather(self, client_id: Any) -> Params:
        """The clients' rows stacked: ``{name: [m, ...]}`` (initial rows for unseen clients)."""
        ...

    def write(self, client_id: Any, rows: Mapping[str, Tensor]) -> None:
        """Store ``rows`` (``{name: [m, ...]}``) as the state of these clients."""
        ...


class InMemoryClientState:
    """A dict of per-client rows in memory.

    Args:
        initial: ``initial(client_key) -> {name: tensor}``, the state of a client never seen.
    """

    def __init__(self, initial: Callable[[Any], Mapping[str, Tensor]]):
        self.initial = initial
        self.rows: dict[Any, Params] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, client_id: Any) -> Params:
        keys = client_keys(client_id)
        rows = [self.rows.get(k) or dict(self.initial(k)) for k in keys]
        return {name: torch.stack([r[name] for r in rows]) for name in rows[0]}

    def write(self, client_id: Any, rows: Mapping[str, Tensor]) -> None:
        for i, key in enumerate(client_keys(client_id)):
            self.rows[key] = {name: value[i].detach().clone() for name, value in rows.items()}

    def state_dict(self) -> dict[str, Any]:
        """Every stored client's row, ``{"rows": {client key: {name: tensor}}}`` (for a checkpoint)."""
        return {"rows": {k: dict(v) for k, v in self.rows.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: ``{"rows": {client key: {name: tensor}}}``.

        Raises:
            ValueError: naming the entry that is malformed (``state`` or its ``rows`` not a mapping,
                a client's row not ``{name: tensor}``, or with other entries or shapes than a new
                client's initial row) and what was expected; the store is left unchanged.
        """
        self.rows = _checked_rows(state, self.initial)


def _checked_rows(state: Any, initial: Callable[[Any], Mapping[str, Tensor]]) -> dict[Any, Params]:
    """The rows of a per-client state dict, each checked to hold the entries and shapes of a new
    client's initial row (what :meth:`InMemoryClientState.gather` stacks them with)."""
    rows = state.get("rows") if isinstance(state, Mapping) else None
    if not isinstance(rows, Mapping):
        found = f"a {type(state).__name__}" if not isinstance(state, Mapping) else (
            f"'rows' holding a {type(rows).__name__}" if "rows" in state else f"keys {sorted(map(str, state))}"
        )
        raise ValueError(f"Expected the per-client state to be a mapping {{'rows': {{client id: {{name: tensor}}}}}}, got {found}")
    checked: dict[Any, Params] = {}
    expected: dict[str, tuple[int, ...]] | None = None
    for key, row in rows.items():
        if not isinstance(row, Mapping):
            raise ValueError(f"Per-client state of client {key!r}: expected a mapping {{name: tensor}}, got a {type(row).__name__}")
        for name, value in row.items():
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"Per-client state of client {key!r}: expected entry {name!r} to be a tensor, got a {type(value).__name__}"
                )
        if expected is None:
            expected = {name: tuple(value.shape) for name, value in initial(key).items()}
        shapes = {name: tuple(value.shape) for name, value in row.items()}
        if shapes != expected:
            raise ValueError(
                f"Per-client state of client {key!r}: expected the entries and shapes of a new client's row "
                f"{_describe(expected)}, got {_describe(shapes)}"
            )
        checked[key] = dict(row)
    return checked


def _describe(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``{'name': [shape], ...}`` sorted by name."""
    return "{" + ", ".join(f"{name!r}: {list(shape)}" for name, shape in sorted(shapes.items(), key=lambda item: str(item[0]))) + "}"
