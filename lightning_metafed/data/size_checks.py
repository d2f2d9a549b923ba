"""Checks of the data module's size arguments against its clients: a train client must hold
``support_size`` and ``query_size`` examples (``replacement`` aside), a held-out client
``eval_support_size`` support examples and at least one query example; an error names the first
client at fault and what would fit it.

:class:`~lightning_metafed.data.FederatedDataModule` runs them at ``setup`` on the clients of each
population that it checks up front (see :func:`size_rows`), and on each round's clients as the round
is built (:func:`round_sizes`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_metafed.data.assemble import resolve_sizes
from lightning_metafed.data.population import Population
from lightning_metafed.data.sizes import Size, resolve_size

__all__ = ["check_eval_sizes", "check_train_sizes", "round_sizes", "size_rows", "train_sizes"]


def train_sizes(
    n: int, end: int | None, name: str, support_size: Size, query_size: Size, replacement: bool
) -> tuple[int, int]:
    """``(S, Q)`` of a train client with ``n`` examples (support part ``[:end]`` if fixed);
    without ``replacement``, a ``ValueError`` naming the client when it is too small."""
    if end is None:
        S, Q = resolve_size(support_size, n), resolve_size(query_size, n)
        if S + Q > n and not replacement:
            raise ValueError(
                f"Expected `support_size` + `query_size` ({S} + {Q}) <= {n} for client {name!r} "
                f"(it has {n} examples), got {S + Q}; use smaller sizes, fractions, or replacement=True"
            )
        if S + Q > n and n < 2:
            raise ValueError(f"Client {name!r} has {n} example(s): support and query need at least 2")
        return S, Q
    if end < 1 or end >= n:
        raise ValueError(
            f"Client {name!r} has a fixed split with {end} support and {n - end} query examples; "
            "a train client needs at least one of each"
        )
    S, Q = resolve_size(support_size, end), resolve_size(query_size, n - end)
    if (S > end or Q > n - end) and not replacement:
        raise ValueError(
            f"Expected `support_size` <= {end} and `query_size` <= {n - end} for client {name!r} "
            f"(its support/query parts have {end}/{n - end} examples), got {S} and {Q}"
        )
    return S, Q


def round_sizes(
    population: Population, rows: Tensor, n: Tensor, end: Tensor, support_size: Size, query_size: Size, replacement: bool
) -> tuple[Tensor, Tensor]:
    """``[m]`` support and query sizes of train clients ``rows`` (``n`` examples each, support part
    ``[:end]`` where ``end >= 0``); the error of the first client that is too small (see
    :func:`train_sizes`)."""
    fixed, e = end >= 0, end.clamp(min=0)
    S = torch.where(fixed, resolve_sizes(support_size, e), resolve_sizes(support_size, n))
    Q = torch.where(fixed, resolve_sizes(query_size, n - e), resolve_sizes(query_size, n))
    short = torch.where(fixed, (S > e) | (Q > n - e), S + Q > n)
    empty_part = fixed & ((end < 1) | (end >= n))
    bad = (n < 1) | empty_part | (short & (not replacement)) | (short & ~fixed & (n < 2))
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        name = population.name(int(rows[k]))
        if int(n[k]) < 1:
            raise ValueError(f"Client {name!r} has no examples")
        train_sizes(int(n[k]), None if int(end[k]) < 0 else int(end[k]), name, support_size, query_size, replacement)
    return S, Q


def size_rows(population: Population, limit: int) -> Tensor:
    """The clients whose sizes setup checks: one of a uniform population, none of a population of
    more than ``limit`` clients (checked as each round draws them), else all."""
    if population.uniform is not None:
        return torch.zeros(min(len(population), 1), dtype=torch.long)
    if len(population) > limit:
        return torch.zeros(0, dtype=torch.long)
    return torch.arange(len(population))


def check_train_sizes(population: Population, limit: int, support_size: Size, query_size: Size, replacement: bool) -> None:
    """Raise for the first train client of :func:`size_rows` too small for the sizes (see :func:`train_sizes`)."""
    rows = size_rows(population, limit)
    if rows.numel():
        round_sizes(population, rows, population.sizes(rows), population.support_ends(rows), support_size, query_size, replacement)


def check_eval_sizes(population: Population, limit: int, eval_support_size: Size) -> None:
    """Raise for the first held-out client of :func:`size_rows` left without a support or a query example."""
    rows = size_rows(population, limit)
    if not rows.numel():
        return
    n, end = population.sizes(rows), population.support_ends(rows)
    S = resolve_sizes(eval_support_size, n)
    bad = torch.where(end >= 0, (end < 1) | (end >= n), S >= n)
    if not bool(bad.any()):
        return
    k = int(bad.nonzero()[0])
    name, n_k, e_k, S_k = population.name(int(rows[k])), int(n[k]), int(end[k]), int(S[k])
    if e_k < 0:
        raise ValueError(
            f"Expected `eval_support_size` < {n_k} for held-out client {name!r} (it has {n_k} examples "
            f"and needs at least one query example), got {S_k}"
        )
    raise ValueError(
        f"Held-out client {name!r} needs at least one support and one query example, got {e_k} and {n_k - e_k}"
    )
