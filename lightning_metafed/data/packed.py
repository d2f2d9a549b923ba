"""Clients stored packed: one flat tensor of examples plus per-client offsets.

A round then reads all of its clients' examples with one indexing operation (``index_select`` on
the flat tensor) instead of one Python call per client. The examples may also be addressed through
an ``order`` of flat positions into shared tensors (a dataset split by a partitioner), so packing
such a population copies no example.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Packed", "pack_clients"]


class Packed:
    """Client ``i`` holds examples ``x[order[offsets[i]:offsets[i + 1]]]`` (``order`` the identity
    when ``None``) and their targets ``y[...]``; ``support_end[i]`` is its fixed split or ``-1``."""

    def __init__(self, x: Tensor, y: Tensor, offsets: Tensor, support_end: Tensor, order: Tensor | None = None):
        self.x, self.y, self.offsets, self.support_end, self.order = x, y, offsets, support_end, order

    def sizes(self, rows: Tensor) -> Tensor:
        return self.offsets[rows + 1] - self.offsets[rows]

    def positions(self, rows: Tensor, index: Tensor) -> Tensor:
        """Rows of ``x``/``y`` holding examples ``index[i]`` of clients ``rows[i]``: ``[m, k]``."""
        pos = self.offsets[rows][:, None] + index
        return pos if self.order is None else self.order[pos]

    def gather(self, rows: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """``x [m, k, ...]`` and ``y [m, k, ...]``: examples ``index[i]`` of clients ``rows[i]``."""
        flat = self.positions(rows, index).reshape(-1)
        m, k = index.shape
        x = self.x.index_select(0, flat).reshape(m, k, *self.x.shape[1:])
        y = self.y.index_select(0, flat).reshape(m, k, *self.y.shape[1:])
        return x, y

    def client(self, i: int) -> tuple[Tensor, Tensor, int | None]:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        end = int(self.support_end[i])
        if self.order is None:
            return self.x[start:stop], self.y[start:stop], None if end < 0 else end
        idx = self.order[start:stop]
        return self.x[idx], self.y[idx], None if end < 0 else end


def offsets_of(sizes: Sequence[int]) -> Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(list(sizes), dtype=torch.long).cumsum(0)])


def pack_clients(xs: Sequence[Tensor], ys: Sequence[Tensor], ends: Sequence[int | None]) -> Packed | None:
    """The clients concatenated, or ``None`` when they cannot share one tensor (not tensors, lengths
    of ``x`` and ``y`` that differ, or per-example shapes, dtypes or devices that differ): such
    clients stay as given, and the data checks name the client at fault."""
    if not xs or not all(isinstance(t, Tensor) and t.dim() > 0 for t in (*xs, *ys)):
        return None
    x0, y0 = xs[0], ys[0]
    for x, y in zip(xs, ys):
        if x.shape[0] != y.shape[0] or x.shape[1:] != x0.shape[1:] or y.shape[1:] != y0.shape[1:]:
            return None
        if (x.dtype, y.dtype, x.device, y.device) != (x0.dtype, y0.dtype, x0.device, y0.device):
            return None
    ends_t = torch.tensor([-1 if e is None else int(e) for e in ends], dtype=torch.long)
    return Packed(torch.cat(list(xs)), torch.cat(list(ys)), offsets_of([len(x) for x in xs]), ends_t)
