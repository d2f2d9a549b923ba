"""An independent, per-client reference of the data module's round and evaluation batches.

Plain Python loops over clients and scalar hashing with Python ints (:func:`mix` / :func:`unit`):
nothing here calls the library's batched draws (``lightning_metafed.data.draws``) or its sampling
methods, so a test comparing ``FederatedDataModule.round_batch`` / ``eval_batch`` with
:meth:`Reference.round_batch` / :meth:`Reference.eval_batch` checks the batched implementation
against the specification, value by value.

The rules (one client at a time):

- ``order(prefix, n)``: ``0..n-1`` sorted by ``mix(*prefix, j)`` (ties by ``j``).
- ``ints(prefix, n, k)``: ``int(unit(mix(*prefix, t)) * n)`` for ``t = 0..k-1``.
- ``draw(prefix, tag, n, k)``: ``order(prefix + (tag,), n)[:k]`` if ``k <= n`` else
  ``ints(prefix + (tag + 1,), n, k)``.
- train round ``r``, client ``g`` (``P = (seed, TRAIN, r, g)``), held-out client ``g``
  (``(seed, EVAL, g)``) and local parts (``(seed, LOCAL, g)``): see :func:`train_positions`,
  :func:`eval_positions` and :func:`local_parts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_metafed.data.seeding import (
    CLIENTS,
    EVAL,
    LOCAL,
    POPULATION,
    TRAIN,
    generator,
    mix,
    unit,
)

#: A client's raw data: ``(x, y, support_end)``.
Raw = tuple[Tensor, Tensor, "int | None"]
#: A client of a split: its global id and a function building its raw data (clients are built lazily).
Client = tuple[int, Callable[[], Raw]]

# ------------------------------------------------------------------------------------ primitives


def order(prefix: tuple[int, ...], n: int) -> list[int]:
    """The positions ``0..n-1`` sorted ascending by ``mix(*prefix, j)`` (ties by ``j``)."""
    keys = [(mix(*prefix, j), j) for j in range(n)]
    keys.sort()
    return [j for _, j in keys]


def ints(prefix: tuple[int, ...], n: int, k: int) -> list[int]:
    """``k`` draws with replacement from ``0..n-1``."""
    return [int(unit(mix(*prefix, t)) * n) for t in range(k)]


def draw(prefix: tuple[int, ...], tag: int, n: int, k: int) -> list[int]:
    """``k`` of ``n`` positions: without replacement when ``k <= n``, else with replacement."""
    if k <= n:
        return order(prefix + (tag,), n)[:k]
    return ints(prefix + (tag + 1,), n, k)


def resolve(value: int | float, n: int) -> int:
    return value if isinstance(value, int) else max(1, int(round(value * n)))


def train_sizes(support_size: int | float, query_size: int | float, n: int, end: int | None) -> tuple[int, int]:
    if end is None:
        return resolve(support_size, n), resolve(query_size, n)
    return resolve(support_size, end), resolve(query_size, n - end)


def train_positions(
    seed: int, r: int, g: int, n: int, end: int | None, S: int, Q: int
) -> tuple[list[int], list[int]]:
    """Support and query example positions of client ``g`` (``n`` examples) in round ``r``."""
    P = (seed, TRAIN, r, g)
    if end is not None:
        return draw(P, 0, end, S), [end + p for p in draw(P, 2, n - end, Q)]
    if S + Q <= n:
        o = draw(P, 0, n, S + Q)
        return o[:S], o[S : S + Q]
    o = order(P + (0,), n)
    c = min(max(1, int(round(n * S / (S + Q)))), n - 1)
    return [o[i] for i in ints(P + (1,), c, S)], [o[c + i] for i in ints(P + (3,), n - c, Q)]


def eval_positions(seed: int, g: int, n: int, end: int | None, eval_support_size: int | float) -> tuple[list[int], list[int]]:
    """Support and query positions of held-out client ``g``."""
    if end is not None:
        return list(range(end)), list(range(end, n))
    S = resolve(eval_support_size, n)
    o = order((seed, EVAL, g), n)
    return o[:S], o[S:]


def local_part_sizes(n: int, fractions, support_end: int | None) -> tuple[int, int, int]:
    """Sizes of a client's local (train, val, test) parts (the rule of ``population.local_part_sizes``)."""
    f_train, f_val, f_test = fractions
    if support_end is not None:
        n_val = int(round(support_end * f_val / (f_train + f_val))) if f_val > 0 else 0
        if f_val > 0:
            n_val = min(max(n_val, 1), support_end - 1)
        return support_end - n_val, n_val, n - support_end
    n_val, n_test = int(round(n * f_val)), int(round(n * f_test))
    if f_val > 0:
        n_val = max(n_val, 1)
    if f_test > 0:
        n_test = max(n_test, 1)
    return n - n_val - n_test, n_val, n_test


def local_parts(seed: int, g: int, n: int, end: int | None, local_split) -> tuple[list[int], list[int], list[int]]:
    """Positions of client ``g``'s local (train, val, test) parts."""
    a, b, _ = local_part_sizes(n, tuple(local_split), end)
    if end is None:
        o = order((seed, LOCAL, g), n)
        return o[:a], o[a : a + b], o[a + b :]
    o = order((seed, LOCAL, g), end)
    return o[:a], o[a:], list(range(end, n))


def sample_clients(seed: int, r: int, m: int, sizes: Sequence[int] | None, num_train: int) -> list[int]:
    """Positions (in the train split) of the clients round ``r`` samples, in draw order.

    Size-weighted (``sizes`` given): ``torch.multinomial`` of the sizes (float64) without
    replacement, seeded by ``generator(seed, CLIENTS, r)``. Uniform (the rule documented in
    ``lightning_metafed.data.draws``): with ``N = num_train``, when ``N <= 4 m`` the first ``m`` of
    ``order((seed, CLIENTS, r), N)``, else the first ``m`` distinct values of the sequence
    ``int(unit(mix(seed, CLIENTS, r, 1, t)) * N)``, ``t = 0, 1, ...``.
    """
    if sizes is not None:
        weights = torch.tensor([float(s) for s in sizes], dtype=torch.float64)
        return torch.multinomial(weights, m, replacement=False, generator=generator(seed, CLIENTS, r)).tolist()
    N = num_train
    if N <= 4 * m:
        return order((seed, CLIENTS, r), N)[:m]
    picked: list[int] = []
    t = 0
    while len(picked) < m:
        c = int(unit(mix(seed, CLIENTS, r, 1, t)) * N)
        if c not in picked:
            picked.append(c)
        t += 1
    return picked


# ------------------------------------------------------------------------------------- assembly


@dataclass
class RefBatch:
    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    weight: Tensor
    client_id: Tensor
    support_mask: Tensor | None
    query_mask: Tensor | None


def _pad(rows: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    longest = max(t.shape[0] for t in rows)
    out = rows[0].new_zeros((len(rows), longest, *rows[0].shape[1:]))
    mask = torch.zeros(len(rows), longest, dtype=torch.float32)
    for i, t in enumerate(rows):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = 1.0
    return out, (None if all(t.shape[0] == longest for t in rows) else mask)


def assemble(tasks: list[tuple[Tensor, Tensor, Tensor, Tensor]], weights: list[int], ids: list[int]) -> RefBatch:
    sx, s_mask = _pad([t[0] for t in tasks])
    sy, _ = _pad([t[1] for t in tasks])
    qx, q_mask = _pad([t[2] for t in tasks])
    qy, _ = _pad([t[3] for t in tasks])
    return RefBatch(
        sx, sy, qx, qy, torch.tensor([float(w) for w in weights], dtype=torch.float32),
        torch.tensor(ids, dtype=torch.long), s_mask, q_mask,
    )


def _take(x: Tensor, y: Tensor, s: list[int], q: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    s_idx, q_idx = torch.tensor(s, dtype=torch.long), torch.tensor(q, dtype=torch.long)
    return x[s_idx], y[s_idx], x[q_idx], y[q_idx]


class Reference:
    """The batches a data module must return, given its splits as lists of lazily built clients."""

    def __init__(
        self,
        splits: dict[str, list[Client]],
        seed: int,
        clients_per_round: int,
        support_size: int | float,
        query_size: int | float,
        eval_support_size: int | float | None = None,
        size_sampling: bool = False,
    ):
        self.splits = splits
        self.seed = seed
        self.m = clients_per_round
        self.support_size, self.query_size = support_size, query_size
        self.eval_support_size = support_size if eval_support_size is None else eval_support_size
        self.size_sampling = size_sampling
        self._cache: dict[tuple[str, int], Raw] = {}

    def raw(self, split: str, i: int) -> Raw:
        key = (split, i)
        if key not in self._cache:
            self._cache[key] = self.splits[split][i][1]()
        return self._cache[key]

    def sampled(self, r: int) -> list[int]:
        train = self.splits["train"]
        sizes = [len(self.raw("train", i)[0]) for i in range(len(train))] if self.size_sampling else None
        return sample_clients(self.seed, r, self.m, sizes, len(train))

    def round_batch(self, r: int, positions: Sequence[int] | None = None) -> RefBatch:
        """Round ``r``'s batch; ``positions``: the sampled clients' positions in the train split
        (default :meth:`sampled`)."""
        tasks, weights, ids = [], [], []
        for i in self.sampled(r) if positions is None else positions:
            g = self.splits["train"][i][0]
            x, y, end = self.raw("train", i)
            n = len(x)
            S, Q = train_sizes(self.support_size, self.query_size, n, end)
            tasks.append(_take(x, y, *train_positions(self.seed, r, g, n, end, S, Q)))
            weights.append(n)
            ids.append(g)
        return assemble(tasks, weights, ids)

    def eval_batch(self, split: str, indices: Sequence[int]) -> RefBatch:
        tasks, weights, ids = [], [], []
        for i in indices:
            g = self.splits[split][i][0]
            x, y, end = self.raw(split, i)
            tasks.append(_take(x, y, *eval_positions(self.seed, g, len(x), end, self.eval_support_size)))
            weights.append(len(x))
            ids.append(g)
        return assemble(tasks, weights, ids)


# ----------------------------------------------------------------------------------- protocols


def unseen_splits(clients: list[Client], seed: int, client_split) -> dict[str, list[Client]]:
    """The unseen protocol: clients split once by ``randperm(N, generator(seed, POPULATION))``."""
    n = len(clients)
    n_val, n_test = int(round(n * client_split[1])), int(round(n * client_split[2]))
    n_train = n - n_val - n_test
    perm = torch.randperm(n, generator=generator(seed, POPULATION)).tolist()
    parts = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    return {split: [clients[p] for p in positions] for split, positions in parts.items()}


def local_splits(clients: list[Client], seed: int, local_split) -> dict[str, list[Client]]:
    """The local protocol: every client's data split into train/val/test parts."""

    def part(make: Callable[[], Raw], g: int, which: int) -> Callable[[], Raw]:
        def build() -> Raw:
            x, y, end = make()
            train, val, test = local_parts(seed, g, len(x), end, local_split)
            if which == 0:
                idx = torch.tensor(train, dtype=torch.long)
                return x[idx], y[idx], None
            idx = torch.tensor(train + (val if which == 1 else test), dtype=torch.long)
            return x[idx], y[idx], len(train)

        return build

    return {
        split: ([(g, part(make, g, which)) for g, make in clients] if local_split[which] > 0 else [])
        for which, split in enumerate(("train", "val", "test"))
    }


def listed(raw: list[Raw], first_id: int = 0) -> list[Client]:
    """Clients already held as raw tuples (global ids ``first_id, first_id + 1, ...``)."""
    return [(first_id + i, (lambda r=r: r)) for i, r in enumerate(raw)]


# ---------------------------------------------------------------------------------- comparison

FIELDS = ("support_x", "support_y", "query_x", "query_y", "weight", "client_id", "support_mask", "query_mask")


def first_difference(actual: Tensor, expected: Tensor) -> str:
    """Where two same-shape tensors first differ, and both values there."""
    differ = (actual != expected) & ~(torch.isnan(actual) & torch.isnan(expected)) if actual.is_floating_point() else actual != expected
    where = differ.nonzero()
    if not len(where):
        return "no element differs"
    index = tuple(where[0].tolist())
    return f"first at index {index}: library {actual[index].item()!r}, reference {expected[index].item()!r} ({int(differ.sum())} elements differ)"


def differences(batch, ref: RefBatch) -> list[str]:
    """Every field in which the library's ``batch`` differs from the reference (empty when equal)."""
    problems = []
    for name in FIELDS:
        actual, expected = getattr(batch, name), getattr(ref, name)
        if expected is None or actual is None:
            if (expected is None) != (actual is None):
                problems.append(f"{name}: library {'None' if actual is None else tuple(actual.shape)}, "
                                f"reference {'None' if expected is None else tuple(expected.shape)}")
            continue
        if not isinstance(actual, Tensor):
            problems.append(f"{name}: library gives {type(actual).__name__}, reference a tensor")
            continue
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            problems.append(f"{name}: library {actual.dtype} {tuple(actual.shape)}, reference {expected.dtype} {tuple(expected.shape)}")
            continue
        if actual.device.type != "cpu":
            actual = actual.cpu()
        if not torch.equal(actual, expected):
            problems.append(f"{name}: {first_difference(actual, expected)}")
    return problems
