"""The ``local`` evaluation protocol: every client's data split into local train/val/test parts."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_metafed.data.draws import order
from lightning_metafed.data.population import ClientData, Population
from lightning_metafed.data.seeding import LOCAL, hash_state

__all__ = ["LocalPartPopulation", "local_part_sizes", "local_part_table"]

PARTS = ("train", "val", "test")


def local_part_sizes(n: int, fractions: tuple[float, float, float], support_end: int | None) -> tuple[int, int, int]:
    """Sizes of a client's local (train, val, test) parts.

    Without a fixed split the ``n`` examples are divided by ``fractions`` (each part with a positive
    fraction gets at least one example when possible). With a fixed split, test is the query part
    and val is carved from the support part in proportion ``fractions[1] : fractions[0]``.
    """
    sizes = local_part_table(torch.tensor([n]), torch.tensor([-1 if support_end is None else support_end]), fractions)
    return tuple(int(t) for t in sizes)  # type: ignore[return-value]


def local_part_table(n: Tensor, end: Tensor, fractions: tuple[float, float, float]) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`local_part_sizes` of many clients at once (``end`` is ``-1`` where there is no fixed
    split): ``[m]`` tensors of train, val and test sizes (rounding half to even, like ``round``)."""
    f_train, f_val, f_test = fractions
    fixed = end >= 0
    n_val_free = torch.round(n.double() * f_val).long()
    n_test_free = torch.round(n.double() * f_test).long()
    if f_val > 0:
        n_val_free = n_val_free.clamp(min=1)
    if f_test > 0:
        n_test_free = n_test_free.clamp(min=1)
    e = end.clamp(min=0)
    if f_val > 0:
        n_val_fixed = torch.round(e.double() * f_val / (f_train + f_val)).long()
        n_val_fixed = torch.minimum(n_val_fixed.clamp(min=1), e - 1)
    else:
        n_val_fixed = torch.zeros_like(e)
    n_val = torch.where(fixed, n_val_fixed, n_val_free)
    n_test = torch.where(fixed, n - e, n_test_free)
    n_train = torch.where(fixed, e - n_val, n - n_val - n_test)
    return n_train, n_val, n_test


class LocalPartPopulation(Population):
    """Every client of ``base`` restricted to its local ``part`` (``local`` evaluation protocol).

    ``part="train"``: the client's local train part (no fixed split; rounds draw support and query
    from it). ``part="val"``/``"test"``: the local train part as support, followed by that part as
    query (``support_end`` = train size). The split of each client is a pure function of
    ``(seed, client id)`` (see :mod:`lightning_metafed.data.draws`), computed for many clients at
    once when a batch is built.
    """

    PARTS = PARTS

    def __init__(self, base: Population, part: str, fractions: tuple[float, float, float], seed: int):
        if part not in PARTS:
            raise ValueError(f"Expected `part` in {PARTS}, got {part!r}")
        self.base = base
        self.part = part
        self.fractions = fractions
        self.seed = seed
        self.in_memory = base.in_memory
        self.batched = base.batched
        if base.uniform is not None:
            sizes = local_part_sizes(base.uniform[0], fractions, base.uniform[1])
            self.uniform = (sizes[0], None) if part == "train" else (sizes[0] + sizes[PARTS.index(part)], sizes[0])

    def __len__(self) -> int:
        return len(self.base)

    def global_id(self, i: int) -> int:
        return self.base.global_id(i)

    def global_ids(self, rows: Tensor) -> Tensor:
        return self.base.global_ids(rows)

    def name(self, i: int) -> str:
        return self.base.name(i)

    def _table(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return local_part_table(self.base.sizes(rows), self.base.support_ends(rows), self.fractions)

    def sizes(self, rows: Tensor) -> Tensor:
        a, b, c = self._table(rows)
        return a if self.part == "train" else a + (b if self.part == "val" else c)

    def support_ends(self, rows: Tensor) -> Tensor:
        return torch.full((len(rows),), -1, dtype=torch.long) if self.part == "train" else self._table(rows)[0]

    def size(self, i: int) -> int:
        return int(self.sizes(torch.tensor([i]))[0])

    def support_end(self, i: int) -> int | None:
        return None if self.part == "train" else int(self.support_ends(torch.tensor([i]))[0])

    def base_positions(self, rows: Tensor, index: Tensor) -> Tensor:
        """Positions in the base clients of examples ``index[i]`` of this part's clients ``rows[i]``."""
        n, end = self.base.sizes(rows), self.base.support_ends(rows)
        a, b, _ = local_part_table(n, end, self.fractions)
        fixed = end >= 0
        o = order(hash_state(self.seed, LOCAL, self.base.global_ids(rows)), torch.where(fixed, end, n))
        if self.part != "test":  # train, or val: the val part follows the train part in the order
            return o.gather(1, index.clamp(max=o.shape[1] - 1))
        shifted = index + (index >= a[:, None]) * b[:, None]  # skip the val part
        from_order = o.gather(1, shifted.clamp(max=o.shape[1] - 1))
        from_query = end[:, None] + index - a[:, None]  # fixed split: test is the query part e..n-1
        return torch.where(fixed[:, None] & (index >= a[:, None]), from_query, from_order)

    def gather(self, rows: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.gather(rows, self.base_positions(rows, index))

    def read(self, i: int, index: Tensor) -> ClientData:
        return self.base.read(i, self.base_positions(torch.tensor([i]), index[None])[0])

    def indices(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Example indices of client ``i``'s local (train, val, test) parts."""
        rows = torch.tensor([i])
        n, end = self.base.sizes(rows), self.base.support_ends(rows)
        a, b, _ = (int(t) for t in local_part_table(n, end, self.fractions))
        e = int(end[0])
        o = order(hash_state(self.seed, LOCAL, self.base.global_ids(rows)), end if e >= 0 else n)[0]
        if e >= 0:
            return o[:a], o[a:], torch.arange(e, int(n[0]))
        return o[:a], o[a : a + b], o[a + b :]

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
