"""Client populations: indexable collections of clients, each owning a local dataset.

A client's data is a :class:`ClientData` ``(x, y, support_end)``. ``support_end=None`` means the
data has no fixed split (the data module draws support and query from it); an integer means the
first ``support_end`` examples are the support part and the rest the query part (a user-fixed
split, LEAF's train/test files, a few-shot episode, or a client's local train/test parts).

Populations are lazy: ``client(i)`` builds or loads client ``i`` on demand, so a population of
10^6 generated clients costs no memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_metafed.data.seeding import LOCAL, generator

__all__ = ["ClientData", "Population", "ListPopulation", "LazyPopulation", "SubsetPopulation", "LocalPartPopulation"]


class ClientData(NamedTuple):
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

    #: Whether every client is already held in memory as tensors, so visiting them all is cheap: the
    #: data module then checks every client once at setup instead of each one as it is loaded.
    in_memory: bool = False


class ListPopulation(Population):
    """Clients given as a list of :class:`ClientData` (optionally named)."""

    in_memory = True

    def __init__(self, clients: Sequence[ClientData], names: Sequence[str] | None = None, first_id: int = 0):
        self.clients = list(clients)
        self.names = None if names is None else list(names)
        self.first_id = first_id

    def __len__(self) -> int:
        return len(self.clients)

    def client(self, i: int) -> ClientData:
        return self.clients[i]

    def global_id(self, i: int) -> int:
        return self.first_id + i

    def name(self, i: int) -> str:
        return self.names[i] if self.names is not None else str(self.global_id(i))


class LazyPopulation(Population):
    """``num_clients`` clients built on demand by ``make(i) -> ClientData``, all of one size."""

    def __init__(self, num_clients: int, make: Callable[[int], ClientData], size: int, support_end: int | None = None):
        self.num_clients = num_clients
        self.make = make
        self.uniform = (size, support_end)

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


def local_part_sizes(n: int, fractions: tuple[float, float, float], support_end: int | None) -> tuple[int, int, int]:
    """Sizes of a client's local (train, val, test) parts.

    Without a fixed split the ``n`` examples are divided by ``fractions`` (each part with a positive
    fraction gets at least one example when possible). With a fixed split, test is the query part
    and val is carved from the support part in proportion ``fractions[1] : fractions[0]``.
    """
    f_train, f_val, f_test = fractions
    if support_end is not None:
        n_test = n - support_end
        n_val = int(round(support_end * f_val / (f_train + f_val))) if f_val > 0 else 0
        if f_val > 0:
            n_val = min(max(n_val, 1), support_end - 1)
        return support_end - n_val, n_val, n_test
    n_val = int(round(n * f_val))
    n_test = int(round(n * f_test))
    if f_val > 0:
        n_val = max(n_val, 1)
    if f_test > 0:
        n_test = max(n_test, 1)
    return n - n_val - n_test, n_val, n_test


class LocalPartPopulation(Population):
    """Every client of ``base`` restricted to its local ``part`` (``local`` evaluation protocol).

    ``part="train"``: the client's local train part (no fixed split; rounds draw support and query
    from it). ``part="val"``/``"test"``: the local train part as support, followed by that part as
    query (``support_end`` = train size). The split of each client is a pure function of
    ``(seed, client id)``.
    """

    PARTS = ("train", "val", "test")

    def __init__(self, base: Population, part: str, fractions: tuple[float, float, float], seed: int):
        if part not in self.PARTS:
            raise ValueError(f"Expected `part` in {self.PARTS}, got {part!r}")
        self.base = base
        self.part = part
        self.fractions = fractions
        self.seed = seed
        self.in_memory = base.in_memory
        if base.uniform is not None:
            sizes = local_part_sizes(base.uniform[0], fractions, base.uniform[1])
            self.uniform = (sizes[0], None) if part == "train" else (sizes[0] + sizes[self.PARTS.index(part)], sizes[0])

    def __len__(self) -> int:
        return len(self.base)

    def global_id(self, i: int) -> int:
        return self.base.global_id(i)

    def name(self, i: int) -> str:
        return self.base.name(i)

    def _sizes(self, i: int) -> tuple[int, int, int]:
        return local_part_sizes(self.base.size(i), self.fractions, self.base.support_end(i))

    def size(self, i: int) -> int:
        sizes = self._sizes(i)
        return sizes[0] if self.part == "train" else sizes[0] + sizes[self.PARTS.index(self.part)]

    def support_end(self, i: int) -> int | None:
        return None if self.part == "train" else self._sizes(i)[0]

    def indices(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Example indices of client ``i``'s local (train, val, test) parts."""
        data_end = self.base.support_end(i)
        n = self.base.size(i)
        n_train, n_val, n_test = self._sizes(i)
        g = generator(self.seed, LOCAL, self.base.global_id(i))
        if data_end is None:
            perm = torch.randperm(n, generator=g)
            return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
        support = torch.randperm(data_end, generator=g)
        return support[:n_train], support[n_train:], torch.arange(data_end, n)

    def client(self, i: int) -> ClientData:
        data = self.base.client(i)
        if len(data.x) != len(data.y):
            raise ValueError(f"Client {self.name(i)!r}: x has {len(data.x)} examples but y has {len(data.y)}")
        train, val, test = self.indices(i)
        if self.part == "train":
            return ClientData(data.x[train], data.y[train], None)
        query = val if self.part == "val" else test
        idx = torch.cat([train, query])
        return ClientData(data.x[idx], data.y[idx], len(train))
