"""A TaskBatch from the example positions of many clients, in one read and a few tensor operations."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_metafed.data.draws import order, take_columns
from lightning_metafed.data.population import ClientData, Population
from lightning_metafed.data.sizes import Size
from lightning_metafed.data.task_batch import TaskBatch
from lightning_metafed.data.validation import ClientChecks

__all__ = ["assemble", "eval_positions", "make_fetch", "resolve_sizes"]

#: ``fetch(rows, index, valid) -> (x, y)``: examples ``index[i]`` of clients ``rows[i]`` as
#: ``[m, k, ...]`` tensors; ``valid`` marks the real (non-padding) columns.
Fetch = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def make_fetch(population: Population, checks: Callable[[], ClientChecks] | None) -> Fetch:
    """How a batch reads ``population``: one batched gather (:meth:`Population.gather`), or client
    by client (:meth:`Population.read`). With ``checks``, what is read is checked (a batched read
    all at once, naming the client at fault)."""
    if population.batched:

        def fetch(rows: Tensor, index: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
            x, y = population.gather(rows, index)
            if checks is not None:
                checks().check_batch(x, y, valid, lambda k: population.name(int(rows[k])))
            return x, y

        return fetch

    def read(i: int, k: Tensor) -> ClientData:
        try:
            return population.read(i, k)
        except (TypeError, IndexError, RuntimeError):
            if checks is not None:  # a client that cannot be read: name what is wrong with it
                checks().check(population.name(i), population.client(i))
            raise

    def fetch_each(rows: Tensor, index: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        read_ = [read(i, k) for i, k in zip(rows.tolist(), index)]
        if checks is not None:
            for i, data, ok in zip(rows.tolist(), read_, valid):
                checks().check(population.name(i), ClientData(data.x[ok], data.y[ok]))
        return torch.stack([d.x for d in read_]), torch.stack([d.y for d in read_])

    return fetch_each


def resolve_sizes(value: Size, n: Tensor) -> Tensor:
    """:func:`~lightning_metafed.data.sizes.resolve_size` of every entry of ``n``: ``value`` when it
    is an int, else ``max(1, round(value * n))`` (half to even, like Python's ``round``)."""
    if isinstance(value, int):
        return torch.full_like(n, value)
    return torch.round(n.double() * value).long().clamp(min=1)


def eval_positions(state: Tensor, n: Tensor, end: Tensor, S: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Support and query positions of held-out clients: ``(support, S, query, Q)``.

    A client with a fixed split (``end >= 0``) keeps it; another one's ``S`` support examples are the
    first of its random order ``order(state, n)`` and its query set all the rest."""
    fixed = end >= 0
    width = int(n.max())
    source = torch.arange(width, device=n.device).expand(len(n), width).clone()
    free = (~fixed).nonzero().flatten()
    if free.numel():
        o = order(state[free], n[free])
        source[free, : o.shape[1]] = o
    S = torch.where(fixed, end, S)
    return take_columns(source, 0, S), S, take_columns(source, S, n - S), n - S


def _mask(lengths: Tensor, width: int) -> Tensor | None:
    """The float 0/1 padding mask of rows of ``lengths``; ``None`` when every row is full."""
    if bool((lengths == width).all()):
        return None
    return (torch.arange(width, device=lengths.device) < lengths[:, None]).float()


def _zero_padding(t: Tensor, valid: Tensor) -> Tensor:
    if bool(valid.all()):
        return t
    return t.masked_fill(~valid.reshape(*valid.shape, *([1] * (t.dim() - 2))), 0)


def assemble(
    fetch: Fetch,
    rows: Tensor,
    support: tuple[Tensor, Tensor],
    query: tuple[Tensor, Tensor],
    weight: Tensor,
    client_id: Tensor,
) -> TaskBatch:
    """The TaskBatch of clients ``rows``: ``support``/``query`` are ``(positions [m, k], counts [m])``.
    Both parts are read with one ``fetch``; padding is zero-filled and masked (a mask only where the
    counts differ), as :func:`~lightning_metafed.data.task_batch.stack_tasks` pads."""
    (s_idx, s_len), (q_idx, q_len) = support, query
    S, Q = s_idx.shape[1], q_idx.shape[1]
    valid = torch.cat([torch.arange(S) < s_len[:, None], torch.arange(Q) < q_len[:, None]], dim=1)
    x, y = fetch(rows, torch.cat([s_idx, q_idx], dim=1), valid)
    x, y = _zero_padding(x, valid), _zero_padding(y, valid)
    return TaskBatch(
        x[:, :S], y[:, :S], x[:, S:], y[:, S:], weight.float(), client_id.long(), _mask(s_len, S), _mask(q_len, Q)
    )
