"""Partitioners: IID, Dirichlet, Shards, QuantitySkew split example indices into clients."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_metafed.data import partition
from lightning_metafed.data.partition import IID, Dirichlet, QuantitySkew, Shards


def balanced_labels(classes: int = 10, per_class: int = 100, seed: int = 0) -> torch.Tensor:
    """``classes`` × ``per_class`` labels in a shuffled order."""
    labels = torch.arange(classes).repeat_interleave(per_class)
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def assert_partition(parts: list[torch.Tensor], n: int, num_clients: int, min_size: int = 1) -> None:
    """Disjoint, complete, integer indices, no client below ``min_size``."""
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == torch.long
        assert p.numel() >= min_size
    everything = torch.cat(parts)
    assert everything.numel() == n, "parts overlap or miss examples"
    torch.testing.assert_close(everything.sort().values, torch.arange(n))


def classes_per_client(parts, labels) -> list[int]:
    return [int(torch.unique(labels[p]).numel()) for p in parts]


def max_class_share(parts, labels) -> float:
    shares = [float(torch.bincount(labels[p]).max()) / p.numel() for p in parts]
    return sum(shares) / len(shares)


# ----------------------------------------------------------------------------------------- IID


def test_iid_is_a_partition_with_nearly_equal_sizes():
    labels = balanced_labels(10, 101)  # 1010 examples, not divisible by 23
    parts = IID()(labels, 23, seed=3)
    assert_partition(parts, labels.numel(), 23)
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 1010


def test_iid_is_seeded():
    labels = balanced_labels()
    a, b, c = IID()(labels, 7, seed=1), IID()(labels, 7, seed=1), IID()(labels, 7, seed=2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


# ----------------------------------------------------------------------------------- Dirichlet


def test_dirichlet_is_a_partition():
    labels = balanced_labels()
    parts = Dirichlet(alpha=0.5)(labels, 20, seed=0)
    assert_partition(parts, labels.numel(), 20)


def test_dirichlet_is_deterministic_per_seed_and_differs_across_seeds():
    labels = balanced_labels()
    a = Dirichlet(alpha=0.5)(labels, 20, seed=11)
    b = Dirichlet(alpha=0.5)(labels, 20, seed=11)
    c = Dirichlet(alpha=0.5)(labels, 20, seed=12)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert any(x.numel() != y.numel() or not torch.equal(x, y) for x, y in zip(a, c))


def test_dirichlet_smaller_alpha_gives_more_label_skew():
    labels = balanced_labels(10, 100)
    skewed = Dirichlet(alpha=0.05)(labels, 20, seed=0)
    uniform = Dirichlet(alpha=100.0)(labels, 20, seed=0)
    assert_partition(skewed, 1000, 20)
    assert_partition(uniform, 1000, 20)
    n_skewed = sum(classes_per_client(skewed, labels)) / 20
    n_uniform = sum(classes_per_client(uniform, labels)) / 20
    assert n_skewed < 4.0, n_skewed
    assert n_uniform > 9.0, n_uniform
    assert max_class_share(skewed, labels) > 0.6
    assert max_class_share(uniform, labels) < 0.3


def test_dirichlet_tiny_alpha_terminates_and_leaves_no_empty_client(monkeypatch):
    # Terminating is counted, not timed (benchmarks/data_speed.py times it): one Dirichlet draw per
    # class (no rejection loop that redraws until every client is large enough), then at most
    # num_clients * min_size single-example moves to fill the clients left empty.
    draws, moved = [], []
    real_draw, real_fill = partition._dirichlet, partition.fill_empty_clients

    def counting_draw(alpha, k, seed, tag):
        draws.append(tag)
        return real_draw(alpha, k, seed, tag)

    def counting_fill(parts, min_size):
        moved.append(sum(max(0, min_size - len(p)) for p in parts))
        return real_fill(parts, min_size)

    monkeypatch.setattr(partition, "_dirichlet", counting_draw)
    monkeypatch.setattr(partition, "fill_empty_clients", counting_fill)
    labels = balanced_labels(10, 100)
    parts = Dirichlet(alpha=1e-3)(labels, 200, seed=0)
    assert_partition(parts, 1000, 200, min_size=1)
    assert len(draws) == len(set(draws)) == 10  # exactly one draw per class, each its own
    assert len(moved) == 1 and 0 < moved[0] <= 200  # tiny alpha leaves clients empty; each is filled once


def test_dirichlet_respects_min_size():
    labels = balanced_labels(10, 100)
    parts = Dirichlet(alpha=1e-3, min_size=4)(labels, 200, seed=1)
    assert_partition(parts, 1000, 200, min_size=4)
    # exactly enough examples: every client gets exactly min_size
    parts = Dirichlet(alpha=0.1, min_size=5)(labels, 200, seed=1)
    assert_partition(parts, 1000, 200, min_size=5)
    assert all(p.numel() == 5 for p in parts)


# -------------------------------------------------------------------------------------- Shards


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_exactly_k_classes_per_client(k):
    labels = balanced_labels(10, 100)
    parts = Shards(classes_per_client=k)(labels, 20, seed=5)
    assert_partition(parts, 1000, 20)
    assert classes_per_client(parts, labels) == [k] * 20


def test_shards_are_seeded():
    labels = balanced_labels(10, 100)
    a, b = Shards(2)(labels, 20, seed=5), Shards(2)(labels, 20, seed=5)
    c = Shards(2)(labels, 20, seed=6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert any(x.numel() != y.numel() or not torch.equal(x, y) for x, y in zip(a, c))


def test_shards_with_uneven_class_counts_and_all_classes():
    # 7 classes of different sizes, k = 7: every client holds every class
    labels = torch.cat([torch.full((10 + 3 * c,), c) for c in range(7)])
    parts = Shards(classes_per_client=7)(labels, 4, seed=0)
    assert_partition(parts, labels.numel(), 4)
    assert classes_per_client(parts, labels) == [7] * 4


# -------------------------------------------------------------------------------- QuantitySkew


def test_quantity_skew_sizes_vary_labels_stay_iid():
    labels = balanced_labels(10, 200)  # 2000 examples
    parts = QuantitySkew(alpha=0.5, min_size=10)(labels, 10, seed=0)
    assert_partition(parts, 2000, 10, min_size=10)
    sizes = torch.tensor([p.numel() for p in parts], dtype=torch.float)
    assert sizes.max() > 3 * sizes.min()
    # labels roughly IID: large clients hold every class with a share close to 1/10
    for p in parts:
        if p.numel() >= 200:
            share = torch.bincount(labels[p], minlength=10).float() / p.numel()
            assert share.max() < 0.2 and share.min() > 0.02, share


def test_quantity_skew_min_size_and_seed():
    labels = balanced_labels(10, 30)  # 300 examples
    a = QuantitySkew(alpha=0.05, min_size=7)(labels, 40, seed=2)
    assert_partition(a, 300, 40, min_size=7)
    b = QuantitySkew(alpha=0.05, min_size=7)(labels, 40, seed=2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    c = QuantitySkew(alpha=0.05, min_size=7)(labels, 40, seed=3)
    assert [p.numel() for p in a] != [p.numel() for p in c]


# -------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", [Dirichlet, QuantitySkew])
@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_alpha(cls, alpha):
    with pytest.raises(ValueError, match=r"`alpha`.*got " + re.escape(repr(alpha))):
        cls(alpha=alpha)


@pytest.mark.parametrize("k", [0, -1, True, 1.5])
def test_bad_classes_per_client(k):
    with pytest.raises(ValueError, match=r"`classes_per_client`.*got " + re.escape(repr(k))):
        Shards(classes_per_client=k)


def test_more_classes_per_client_than_classes():
    labels = balanced_labels(10, 100)
    with pytest.raises(ValueError, match=r"`classes_per_client` <= the number of classes \(10\), got 11"):
        Shards(classes_per_client=11)(labels, 20)


def test_shards_class_too_small_for_its_clients():
    labels = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    # 10 clients with 1 class each: class 1 is shared by 5 clients but has only 3 examples
    with pytest.raises(ValueError, match=r"Class 1 has 3 examples.*5 clients"):
        Shards(classes_per_client=1)(labels, 10, seed=0)


@pytest.mark.parametrize("partitioner", [IID(), Dirichlet(0.5), QuantitySkew(0.5), Shards(1)])
def test_more_clients_than_examples(partitioner):
    labels = balanced_labels(2, 5)  # 10 examples
    with pytest.raises(ValueError, match=r"`num_clients`=11.*10 examples"):
        partitioner(labels, 11)


@pytest.mark.parametrize("partitioner", [IID(min_size=3), Dirichlet(0.5, min_size=3), QuantitySkew(0.5, min_size=3)])
def test_min_size_too_large_for_the_data(partitioner):
    labels = balanced_labels(2, 5)  # 10 examples, 4 clients × 3 needs 12
    with pytest.raises(ValueError, match=r"`num_clients`=4.*at least 3.*10 examples"):
        partitioner(labels, 4)


@pytest.mark.parametrize("min_size", [0, -2, True, 2.0])
def test_bad_min_size(min_size):
    with pytest.raises(ValueError, match=r"`min_size`"):
        Dirichlet(alpha=1.0, min_size=min_size)


@pytest.mark.parametrize("num_clients", [0, -3, True, 2.0])
def test_bad_num_clients(num_clients):
    with pytest.raises(ValueError, match=r"`num_clients`.*got " + re.escape(repr(num_clients))):
        IID()(balanced_labels(2, 5), num_clients)


def test_shards_warns_when_clients_cannot_hold_every_class():
    labels = torch.arange(10).repeat_interleave(5)
    with pytest.warns(UserWarning, match=r"cannot hold all 10 classes"):
        parts = Shards(classes_per_client=2)(labels, 3, seed=0)
    held = torch.unique(labels[torch.cat(parts)])
    assert len(held) == 6
