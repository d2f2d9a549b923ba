"""Which examples a client contributes, drawn for many clients at once with tensor operations.

Every draw is a pure function of integers through :func:`~lightning_metafed.data.seeding.mix`
(evaluated on int64 tensors), so a round of ``m`` clients costs a few tensor operations instead of
``m`` Python calls, and a client's draw does not depend on which other clients share its batch. The
rules, for one client with mixing state ``h`` (``hash_state(...)`` of the integers named below):

- **Random order** ``order(h, n)``: the positions ``0..n-1`` sorted by their keys
  ``finish(extend(h, j))`` (ascending; a tie, which has probability ~2^-63, by position).
- **With replacement** ``ints(h, n, k)``: the ``t``-th of ``k`` draws is
  ``floor(unit(finish(extend(h, t))) * n)``.
- **k of n** ``draw(h, tag, n, k)``: the first ``k`` of ``order(extend(h, tag), n)`` when
  ``k <= n``, else ``ints(extend(h, tag + 1), n, k)``.
- **Train round** ``r``, client of global id ``g`` with ``n`` examples, sizes ``S``/``Q``,
  ``h = hash_state(seed, TRAIN, r, g)``: with a fixed split at ``e``, support ``draw(h, 0, e, S)``
  and query ``e + draw(h, 2, n - e, Q)``. Without one and ``S + Q <= n``: ``o = draw(h, 0, n, S + Q)``,
  support ``o[:S]``, query ``o[S:]``. Without one and ``S + Q > n`` (``replacement=True``):
  ``o = order(extend(h, 0), n)``, ``c = min(max(1, round(n S / (S + Q))), n - 1)``; support
  ``o[ints(extend(h, 1), c, S)]``, query ``o[c + ints(extend(h, 3), n - c, Q)]`` (disjoint pools).
- **Held-out client** ``g`` (``h = hash_state(seed, EVAL, g)``): a fixed split is used as given;
  otherwise ``o = order(h, n)``, support ``o[:S]``, query ``o[S:]`` (all the rest).
- **Clients of a round** (uniform sampling of ``m`` of ``N``; ``h = hash_state(seed, CLIENTS, r)``):
  when ``N <= 4 m`` the first ``m`` of ``order(h, N)``; else the first ``m`` distinct values of the
  sequence ``ints(extend(h, 1), N, ...)`` (a uniform sample without replacement, in draw order).
- **Local parts** of client ``g`` (``h = hash_state(seed, LOCAL, g)``, part sizes ``a, b, c``):
  without a fixed split ``o = order(h, n)``: train ``o[:a]``, val ``o[a:a+b]``, test ``o[a+b:]``;
  with one at ``e``: ``o = order(h, e)``: train ``o[:a]``, val ``o[a:]``, test ``e..n-1``.

Functions here take one row per client (``[m]`` tensors) and return ``[m, width]`` index tensors
whose columns past a row's own count are padding (valid index 0 after :func:`take_columns`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_metafed.data.seeding import extend, finish, unit_tensor

__all__ = ["draw", "ints", "order", "sample_clients", "take_columns", "train_indices"]

_PAD = torch.iinfo(torch.long).max


def order(state: Tensor, n: Tensor, k: int | None = None) -> Tensor:
    """The first ``k`` (default ``max(n)``) positions of each row's random order of ``0..n_i-1``:
    ``[m, k]``; in a row with ``n_i < k`` the columns from ``n_i`` on hold padding positions ``>= n_i``."""
    width = int(n.max()) if n.numel() else 0
    k = width if k is None else min(k, width)
    j = torch.arange(width, device=state.device)
    keys = finish(extend(state[:, None], j))
    if bool((n < width).any()):
        keys = keys.masked_fill(j >= n[:, None], _PAD)
    if k < width:
        return torch.topk(keys, k, dim=1, largest=False, sorted=True).indices
    return torch.sort(keys, dim=1, stable=True).indices


def ints(state: Tensor, n: Tensor, k: int, start: int = 0) -> Tensor:
    """``k`` draws with replacement from ``0..n_i-1`` per row (draws ``start .. start + k - 1`` of
    the row's sequence): ``[m, k]``."""
    t = torch.arange(start, start + k, device=state.device)
    return (unit_tensor(finish(extend(state[:, None], t))) * n[:, None]).long()


def sample_clients(state: Tensor | int, N: int, m: int) -> Tensor:
    """``m`` distinct clients of ``0..N-1`` for a round whose mixing state is ``state`` (see the
    module docstring): ``[m]``, in draw order."""
    state = torch.as_tensor(state, dtype=torch.long).reshape(1)
    if N <= 4 * m:
        return order(state, torch.tensor([N]), m)[0]
    seq, size = torch.empty(0, dtype=torch.long), 0
    while True:
        seq = torch.cat([seq, ints(extend(state, 1), torch.tensor([N]), 2 * m, start=size)[0]])
        size = len(seq)
        values, inverse = torch.unique(seq, return_inverse=True)
        first = torch.full((len(values),), size, dtype=torch.long).scatter_reduce(0, inverse, torch.arange(size), "amin")
        distinct = seq[first[inverse] == torch.arange(size)]
        if len(distinct) >= m:
            return distinct[:m]


def draw(state: Tensor, tag: int, n: Tensor, k: Tensor) -> Tensor:
    """``k_i`` of ``n_i`` positions per row (see the module docstring): ``[m, max(k)]``."""
    m, width = len(n), int(k.max()) if k.numel() else 0
    exact = k <= n
    if bool(exact.all()):
        return _pad_to(order(extend(state, tag), n, width), width)
    out = torch.zeros(m, width, dtype=torch.long, device=state.device)
    rows = exact.nonzero().flatten()
    if rows.numel():
        out[rows] = _pad_to(order(extend(state[rows], tag), n[rows], width), width)
    rows = (~exact).nonzero().flatten()
    out[rows] = ints(extend(state[rows], tag + 1), n[rows], width)
    return out


def _pad_to(index: Tensor, width: int) -> Tensor:
    if index.shape[1] >= width:
        return index
    return torch.cat([index, index.new_zeros(index.shape[0], width - index.shape[1])], dim=1)


def take_columns(index: Tensor, start: Tensor | int, count: Tensor, width: int | None = None) -> Tensor:
    """Columns ``start_i .. start_i + count_i - 1`` of each row of ``index``, left-aligned into
    ``[m, width]`` (default ``max(count)``); the rest of each row is 0."""
    width = (int(count.max()) if count.numel() else 0) if width is None else width
    t = torch.arange(width, device=index.device)
    cols = (torch.as_tensor(start, device=index.device).reshape(-1, 1) + t).clamp(max=max(index.shape[1] - 1, 0))
    if index.shape[1] == 0:
        return index.new_zeros(index.shape[0], width)
    return index.gather(1, cols.expand(index.shape[0], width)).masked_fill(t >= count[:, None], 0)


def _replacement_rows(state: Tensor, n: Tensor, S: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """Support and query of clients too small for disjoint draws: two disjoint pools of a random
    order, each sampled with replacement."""
    o = order(extend(state, 0), n)
    ratio = torch.round(n.double() * S.double() / (S + Q).double()).long()
    cut = torch.minimum(ratio.clamp(min=1), n - 1)
    s_pos = ints(extend(state, 1), cut, int(S.max()))
    q_pos = cut[:, None] + ints(extend(state, 3), n - cut, int(Q.max()))
    return o.gather(1, s_pos), o.gather(1, q_pos)


def train_indices(state: Tensor, n: Tensor, end: Tensor, S: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """Support ``[m, max S]`` and query ``[m, max Q]`` example positions of a training round
    (``end`` is ``-1`` where a client has no fixed split); padding columns hold 0."""
    m, s_width, q_width = len(n), int(S.max()), int(Q.max())
    support = torch.zeros(m, s_width, dtype=torch.long, device=state.device)
    query = torch.zeros(m, q_width, dtype=torch.long, device=state.device)
    fixed = end >= 0
    free = ~fixed & (S + Q <= n)
    small = ~fixed & ~free
    groups = [(g, g.nonzero().flatten()) for g in (fixed, free, small)]
    for kind, (_, rows) in enumerate(groups):
        if not rows.numel():
            continue
        h, n_r, e_r, S_r, Q_r = state[rows], n[rows], end[rows], S[rows], Q[rows]
        if kind == 0:
            s, q = draw(h, 0, e_r, S_r), e_r[:, None] + draw(h, 2, n_r - e_r, Q_r)
        elif kind == 1:
            o = draw(h, 0, n_r, S_r + Q_r)
            s, q = take_columns(o, 0, S_r), take_columns(o, S_r, Q_r)
        else:
            s, q = _replacement_rows(h, n_r, S_r, Q_r)
        if rows.numel() == m:
            support, query = _fit(s, S_r, s_width), _fit(q, Q_r, q_width)
            break
        support[rows], query[rows] = _fit(s, S_r, s_width), _fit(q, Q_r, q_width)
    return support, query


def _fit(index: Tensor, count: Tensor, width: int) -> Tensor:
    """``index`` padded or cut to ``width`` columns, with 0 past each row's ``count``."""
    index = _pad_to(index, width)[:, :width]
    t = torch.arange(width, device=index.device)
    return index.masked_fill(t >= count[:, None], 0)
