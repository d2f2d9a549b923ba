"""Client populations: indexable collections of clients, each owning a local dataset.

A client's data is a :class:`ClientData` ``(x, y, support_end)``. ``support_end=None`` means the
data has no fixed split (the data module draws support and query from it); an integer means the
first ``support_end`` examples are the support part and the rest the query part (a user-fixed
split, LEAF's train/test files, a few-shot episode, or a client's local train/test parts).

Populations are lazy: ``client(i)`` builds or loads client ``i`` on demand, so a population of
10^6 generated clients costs no memory.

A population is ``batched`` when :meth:`Population.gather` reads many clients' examples with tensor
operations (packed storage, or a generator evaluated for all sampled clients at once); the data
module then builds a round without a Python call per client. Other populations are read client by
client through :meth:`Population.client`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_metafed.data.packed import Packed, pack_clients

__all__ = ["ClientData", "Population", "ListPopulation", "LazyPopulation", "SubsetPopulation"]


class ClientData(NamedTuple):
    """One client's local dataset, as a population returns it.

    Attributes:
        x: the client's inputs ``[N, ...]``.
        y: the client's labels or targets ``[N, ...]``.
        support_end: ``None`` (no fixed split: the data module draws support and query), or the
            number of leading examples that form the support part (the rest is the query part).
    """

    x: Tensor
    y: Tensor
    support_end: int | None = None


class Population:
    """Base class: ``len(pop)`` clients; ``pop.client(i)`` is client ``i``'s :class:`ClientData`."""

    def __len__(self) -> int:
        raise NotImplementedError

    def client(self, i: int) -> ClientData:
        raise NotImplementedError

    def global_id(self, i: int) -> int:
        """The client's id in the full population (stable across train/val/test splits)."""
        return i

    def name(self, i: int) -> str:
        """A human-readable client name for messages."""
        return str(self.global_id(i))

    def size(self, i: int) -> int:
        """Number of examples client ``i`` holds (override when it is cheaper than loading)."""
        return len(self.client(i).x)

    def support_end(self, i: int) -> int | None:
        return self.client(i).support_end

    #: When every client has the same size and split, the common ``(size, support_end)``; lets the
    #: data module validate and weight a huge lazy population without visiting every client.
    uniform: tuple[int, int | None] | None = None

    #: Whether every client is already held in memory as tensors, so visiting them all is cheap (the
    #: data module then checks every client once at setup instead of each one as it is loaded).
    in_memory: bool = False

    #: Whether :meth:`gather` reads many clients at once with tensor operations.
    batched: bool = False

    def sizes(self, rows: Tensor) -> Tensor:
        """``[m]`` example counts of clients ``rows`` (a LongTensor of positions)."""
        if self.uniform is not None:
            return torch.full((len(rows),), self.uniform[0], dtype=torch.long)
        return torch.tensor([self.size(i) for i in rows.tolist()], dtype=torch.long)

    def support_ends(self, rows: Tensor) -> Tensor:
        """``[m]`` fixed splits of clients ``rows``; ``-1`` for a client without one."""
        if self.uniform is not None:
            end = self.uniform[1]
            return torch.full((len(rows),), -1 if end is None else end, dtype=torch.long)
        ends = (self.support_end(i) for i in rows.tolist())
        return torch.tensor([-1 if e is None else e for e in ends], dtype=torch.long)

    def global_ids(self, rows: Tensor) -> Tensor:
        """``[m]`` ids of clients ``rows`` in the full population."""
        return torch.tensor([self.global_id(i) for i in rows.tolist()], dtype=torch.long)

    def gather(self, rows: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """``x [m, k, ...]`` and ``y [m, k, ...]``: examples ``index[i]`` (valid positions) of clients
        ``rows[i]``, read with tensor operations. Only for a ``batched`` population."""
        raise NotImplementedError(f"{type(self).__name__} reads clients one by one (it is not batched)")

    def read(self, i: int, index: Tensor) -> ClientData:
        """Examples ``index`` of client ``i`` (override to load only those, e.g. items on disk)."""
        data = self.client(i)
        return ClientData(data.x[index], data.y[index])


class ListPopulation(Population):
    """Clients given as a list of :class:`ClientData` (optionally named)."""

    in_memory = True

    def __init__(self, clients: Sequence[ClientData], names: Sequence[str] | None = None, first_id: int = 0):
        clients = list(clients)
        self.names = None if names is None else list(names)
        self.first_id = first_id
        self.num_clients = len(clients)
        #: The clients packed into one tensor (``None`` when they cannot be: then kept as given).
        fields = [[getattr(c, name, None) for c in clients] for name in ("x", "y", "support_end")]
        self.packed: Packed | None = pack_clients(*fields)
        self.clients = None if self.packed is not None else clients
        self.batched = self.packed is not None

    def __len__(self) -> int:
        return self.num_clients

    def client(self, i: int) -> ClientData:
        if self.packed is None:
            return self.clients[i]
        if not 0 <= i < self.num_clients:
            raise IndexError(i)
        return ClientData(*self.packed.client(i))

    def size(self, i: int) -> int:
        return int(self.packed.sizes(torch.tensor(i))) if self.packed is not None else len(self.clients[i].x)

    def support_end(self, i: int) -> int | None:
        return self.client(i).support_end

    def sizes(self, rows: Tensor) -> Tensor:
        return self.packed.sizes(rows) if self.packed is not None else super().sizes(rows)

    def support_ends(self, rows: Tensor) -> Tensor:
        return self.packed.support_end[rows] if self.packed is not None else super().support_ends(rows)

    def global_ids(self, rows: Tensor) -> Tensor:
        return rows + self.first_id

    def gather(self, rows: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.packed.gather(rows, index)

    def global_id(self, i: int) -> int:
        return self.first_id + i

    def name(self, i: int) -> str:
        return self.names[i] if self.names is not None else str(self.global_id(i))


class LazyPopulation(Population):
    """``num_clients`` clients built on demand by ``make(i) -> ClientData``, all of one size.

    ``gather(rows, index)``, when given, builds the examples ``index[i]`` of clients ``rows[i]`` for
    many clients at once (it must equal ``make(rows[i])`` at those positions); the population is then
    ``batched``."""

    def __init__(
        self,
        num_clients: int,
        make: Callable[[int], ClientData],
        size: int,
        support_end: int | None = None,
        gather: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    ):
        self.num_clients = num_clients
        self.make = make
        self.uniform = (size, support_end)
        self._gather = gather
        self.batched = gather is not None

    def global_ids(self, rows: Tensor) -> Tensor:
        return rows.clone()

    def gather(self, rows: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        if self._gather is None:
            return super().gather(rows, index)
        return self._gather(rows, index)

    def __len__(self) -> int:
        return self.num_clients

    def client(self, i: int) -> ClientData:
        if not 0 <= i < self.num_clients:
            raise IndexError(i)
        return self.make(i)

    def size(self, i: int) -> int:
        return self.uniform[0]

    def support_end(self, i: int) -> int | None:
        return self.uniform[1]


class SubsetPopulation(Population):
    """The clients ``ids`` (a LongTensor of indices) of ``base``."""

    def __init__(self, base: Population, ids: Tensor):
        self.base = base
        self.ids = ids
        self.uniform = base.uniform
        self.in_memory = base.in_memory
        self.batched = base.batched

    def sizes(self, rows: Tensor) -> Tensor:
        return self.base.sizes(self.ids[rows])

    def support_ends(self, rows: Tensor) -> Tensor:
        return self.base.support_ends(self.ids[rows])

    def global_ids(self, rows: Tensor) -> Tensor:
        return self.base.global_ids(self.ids[rows])

    def gather(self, rows: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.gather(self.ids[rows], index)

    def read(self, i: int, index: Tensor) -> ClientData:
        return self.base.read(int(self.ids[i]), index)

    def __len__(self) -> int:
        return len(self.ids)

    def client(self, i: int) -> ClientData:
        return self.base.client(int(self.ids[i]))

    def global_id(self, i: int) -> int:
        return self.base.global_id(int(self.ids[i]))

    def name(self, i: int) -> str:
        return self.base.name(int(self.ids[i]))

    def size(self, i: int) -> int:
        return self.base.size(int(self.ids[i]))

    def support_end(self, i: int) -> int | None:
        return self.base.support_end(int(self.ids[i]))
