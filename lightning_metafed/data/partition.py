"""Partitioners: split a labelled dataset's example indices into federated clients.

Each partitioner is a small config object (usable from YAML with ``class_path``) whose
``__call__(labels, num_clients, seed)`` returns one ``LongTensor`` of example indices per client.
All are deterministic given the seed, always terminate, and never return an empty client: when the
data cannot give every client ``min_size`` examples they raise ``ValueError`` instead.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_metafed._validation import ConfigObject, check_int, check_positive
from lightning_metafed.data.seeding import generator, mix

__all__ = ["Partitioner", "IID", "Dirichlet", "Shards", "QuantitySkew", "fill_empty_clients"]


def _check_common(labels: Tensor, num_clients: int, min_size: int) -> Tensor:
    labels = torch.as_tensor(labels).long().reshape(-1)
    check_int("num_clients", num_clients, minimum=1)
    if labels.numel() < num_clients * min_size:
        raise ValueError(
            f"Cannot give each of `num_clients`={num_clients} clients at least {min_size} example(s): "
            f"the dataset has {labels.numel()} examples"
        )
    return labels


def fill_empty_clients(parts: list[list[int]], min_size: int) -> list[list[int]]:
    """Move examples from the largest clients to those below ``min_size`` (deterministic, terminates).

    Each move takes one example from a client with more than ``min_size`` examples, so the loop ends
    after at most ``num_clients * min_size`` moves; callers check that enough examples exist.
    """
    for i, part in enumerate(parts):
        while len(part) < min_size:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            if len(parts[donor]) <= min_size:
                raise ValueError(f"Not enough examples to give every client {min_size}")
            part.append(parts[donor].pop())
    return parts


class Partitioner(ConfigObject):
    """Base class: ``partitioner(labels, num_clients, seed) -> list[LongTensor]``.

    Args:
        min_size: the fewest examples a client may hold (``>= 1``); clients below it receive
            examples from the largest clients.
    """

    def __init__(self, min_size: int = 1):
        self.min_size = check_int("min_size", min_size, minimum=1)

    def __call__(self, labels: Tensor, num_clients: int, seed: int = 0) -> list[Tensor]:
        labels = _check_common(labels, num_clients, self.min_size)
        parts = self.split(labels, num_clients, seed)
        parts = fill_empty_clients([list(map(int, p)) for p in parts], self.min_size)
        return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]

    def split(self, labels: Tensor, num_clients: int, seed: int) -> list[Tensor]:
        raise NotImplementedError


class IID(Partitioner):
    """A uniformly random split into clients of (almost) equal size.

    Args:
        min_size: the fewest examples a client may hold (``>= 1``); clients below it receive
            examples from the largest clients.
    """

    def split(self, labels: Tensor, num_clients: int, seed: int) -> list[Tensor]:
        perm = torch.randperm(labels.numel(), generator=generator(seed, 101))
        return list(perm.tensor_split(num_clients))


class Dirichlet(Partitioner):
    """Label skew: for every class, its examples are divided among clients in proportions drawn
    from ``Dirichlet(alpha · 1)`` (Hsu, Qi & Brown, 2019). Small ``alpha`` → few classes per client.

    One pass, no rejection loop (so it terminates for any ``alpha`` and client count); clients left
    below ``min_size`` receive examples from the largest clients.

    Args:
        alpha: the Dirichlet concentration (``> 0``); small values give few classes per client.
        min_size: the fewest examples a client may hold (``>= 1``); clients below it receive
            examples from the largest clients.
    """

    def __init__(self, alpha: float = 0.5, min_size: int = 1):
        super().__init__(min_size)
        self.alpha = check_positive("alpha", alpha)

    def split(self, labels: Tensor, num_clients: int, seed: int) -> list[Tensor]:
        g = generator(seed, 102)
        parts: list[list[Tensor]] = [[] for _ in range(num_clients)]
        for c in torch.unique(labels).tolist():
            idx = (labels == c).nonzero().reshape(-1)
            idx = idx[torch.randperm(idx.numel(), generator=g)]
            props = _dirichlet(self.alpha, num_clients, seed, 1000 + int(c))
            counts = _proportional_counts(props, idx.numel())
            for i, chunk in enumerate(idx.split(counts.tolist())):
                parts[i].append(chunk)
        return [torch.cat(p) if p else torch.empty(0, dtype=torch.long) for p in parts]


def _dirichlet(alpha: float, k: int, seed: int, tag: int) -> Tensor:
    """A ``Dirichlet(alpha · 1_k)`` draw, reproducible from ``(seed, tag)`` (NumPy's PCG64)."""
    rng = np.random.default_rng(mix(seed, tag))
    props = torch.from_numpy(rng.dirichlet(np.full(k, alpha)))
    if not (torch.isfinite(props).all() and props.sum() > 0):  # underflow for tiny alpha: one client takes all
        props = torch.zeros(k, dtype=torch.float64)
        props[int(rng.integers(k))] = 1.0
    return props


def _proportional_counts(props: Tensor, n: int) -> Tensor:
    """Integer counts summing to ``n`` proportional to ``props`` (largest remainders)."""
    raw = props * n
    counts = raw.floor().long()
    remainder = n - int(counts.sum())
    if remainder > 0:
        order = torch.argsort(raw - counts, descending=True, stable=True)
        counts[order[:remainder]] += 1
    return counts


class Shards(Partitioner):
    """Pathological non-IID: every client holds exactly ``classes_per_client`` distinct classes
    (in the spirit of McMahan et al., 2017's shards). Classes are dealt round-robin over a random
    class order so every class is shared by about the same number of clients; each class's examples
    are split evenly among its clients.

    Args:
        classes_per_client: how many distinct classes each client holds (``>= 1``).
        min_size: the fewest examples a client may hold (``>= 1``); a class too small for its clients raises.
    """

    def __init__(self, classes_per_client: int = 2, min_size: int = 1):
        super().__init__(min_size)
        self.classes_per_client = check_int("classes_per_client", classes_per_client, minimum=1)

    def __call__(self, labels: Tensor, num_clients: int, seed: int = 0) -> list[Tensor]:
        labels = _check_common(labels, num_clients, self.min_size)
        classes = torch.unique(labels)
        k = self.classes_per_client
        if k > classes.numel():
            raise ValueError(
                f"Expected `classes_per_client` <= the number of classes ({classes.numel()}), got {k}"
            )
        g = generator(seed, 103)
        order = classes[torch.randperm(classes.numel(), generator=g)].tolist()
        holders: dict[int, list[int]] = {c: [] for c in order}
        for i in range(num_clients):
            for j in range(k):
                holders[order[(i * k + j) % len(order)]].append(i)
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        unheld = [c for c, clients in holders.items() if not clients]
        if unheld:
            rank_zero_warn(
                f"Shards: {num_clients} clients x {k} classes cannot hold all {len(order)} classes; the examples of "
                f"classes {sorted(unheld)} are left out of the partition"
            )
        for c, clients in holders.items():
            if not clients:
                continue
            idx = (labels == c).nonzero().reshape(-1)
            idx = idx[torch.randperm(idx.numel(), generator=g)]
            if idx.numel() < len(clients) * self.min_size:
                raise ValueError(
                    f"Class {c} has {idx.numel()} examples, too few for the {len(clients)} clients that hold it "
                    f"with at least {self.min_size} each; use fewer clients or a smaller `classes_per_client`"
                )
            for client, chunk in zip(clients, idx.tensor_split(len(clients))):
                parts[client].extend(chunk.tolist())
        return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


class QuantitySkew(Partitioner):
    """Quantity skew with IID labels: client sizes proportional to a ``Dirichlet(alpha)`` draw
    (at least ``min_size`` each), examples assigned uniformly at random.

    Args:
        alpha: the Dirichlet concentration of the client sizes (``> 0``); small values give very unequal sizes.
        min_size: the fewest examples a client holds (``>= 1``).
    """

    def __init__(self, alpha: float = 0.5, min_size: int = 1):
        super().__init__(min_size)
        self.alpha = check_positive("alpha", alpha)

    def split(self, labels: Tensor, num_clients: int, seed: int) -> list[Tensor]:
        g = generator(seed, 104)
        n = labels.numel()
        spare = n - num_clients * self.min_size
        props = _dirichlet(self.alpha, num_clients, seed, 104)
        counts = _proportional_counts(props, spare) + self.min_size
        perm = torch.randperm(n, generator=g)
        return list(perm.split(counts.tolist()))


torch.serialization.add_safe_globals([IID, Dirichlet, Shards, QuantitySkew])
