"""The batched draw primitives: tensor mixing equals the scalar ``mix``, orders are permutations with
the right statistics, client sampling is uniform and distinct, and the batched data paths read only
what a round needs and still name a client with bad data."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_metafed.data import (
    DatasetClients,
    EpisodicClients,
    SinusoidClients,
    TensorClients,
)
from lightning_metafed.data.draws import ints, order, sample_clients, train_indices
from lightning_metafed.data.seeding import (
    extend,
    finish,
    hash_state,
    mix,
    unit,
    unit_tensor,
)


def test_tensor_mixing_equals_the_scalar_mix_on_extreme_values():
    rng = random.Random(0)
    extremes = [0, 1, -1, 2**63 - 1, -(2**63), 2**62, -(2**62) + 7]
    values = torch.tensor(extremes + [rng.randrange(-(2**63), 2**63) for _ in range(500)])
    for prefix in ((), (3,), (2**63 - 1, -5, 11)):
        got = finish(hash_state(*prefix, values))
        assert torch.equal(got, torch.tensor([mix(*prefix, int(v)) for v in values]))
        two_step = finish(extend(hash_state(*prefix, values[:, None]), torch.arange(3)))
        assert torch.equal(two_step, torch.tensor([[mix(*prefix, int(v), j) for j in range(3)] for v in values]))
    h = finish(hash_state(1, values))
    assert torch.equal(unit_tensor(h), torch.tensor([unit(int(v)) for v in h], dtype=torch.float64))
    assert bool((unit_tensor(h) >= 0).all() and (unit_tensor(h) < 1).all())


def test_orders_are_permutations_whose_first_position_is_uniform():
    state = hash_state(0, torch.arange(20_000))
    n = torch.full((20_000,), 5)
    o = order(state, n)
    assert torch.equal(o.sort(dim=1).values, torch.arange(5).expand(20_000, 5))
    counts = torch.bincount(o[:, 0], minlength=5).double() / 20_000
    assert (counts - 0.2).abs().max() < 0.015, counts
    first2 = order(state, n, 2)
    assert torch.equal(first2, o[:, :2])  # the top-k shortcut is the prefix of the full order


def test_orders_of_rows_of_different_lengths_put_padding_last():
    n = torch.tensor([1, 4, 2])
    o = order(hash_state(7, torch.arange(3)), n)
    for row, length in zip(o, n.tolist()):
        assert sorted(row[:length].tolist()) == list(range(length)) and bool((row[length:] >= length).all())


def test_draws_with_replacement_are_uniform():
    draws = ints(hash_state(1, torch.arange(1)), torch.tensor([3]), 30_000)[0]
    counts = torch.bincount(draws, minlength=3).double() / 30_000
    assert draws.max() < 3 and (counts - 1 / 3).abs().max() < 0.015


@pytest.mark.parametrize("N,m", [(10, 4), (40, 10), (1_000_000, 64)])
def test_sampled_clients_are_distinct_in_range_and_uniform(N, m):
    seen = Counter()
    rounds = 2000 if N <= 40 else 50
    for r in range(rounds):
        ids = sample_clients(hash_state(0, 5, r), N, m)
        assert len(ids) == m == len(set(ids.tolist())) and 0 <= int(ids.min()) and int(ids.max()) < N
        seen.update(ids.tolist())
    if N <= 40:
        freq = torch.tensor([seen[i] for i in range(N)], dtype=torch.float64) / (rounds * m / N)
        assert (freq - 1).abs().max() < 0.2, freq  # at least 5 standard deviations


def test_train_indices_are_disjoint_and_inside_each_part():
    n = torch.tensor([20, 12, 7, 30])
    end = torch.tensor([-1, 5, -1, -1])
    S, Q = torch.tensor([5, 3, 4, 8]), torch.tensor([5, 6, 4, 10])
    support, query = train_indices(hash_state(0, torch.arange(4)), n, end, S, Q)
    for i in range(4):
        s, q = support[i, : S[i]].tolist(), query[i, : Q[i]].tolist()
        if i == 1:  # fixed split: support from [0, 5), query from [5, 12), with replacement where too few
            assert all(0 <= v < 5 for v in s) and all(5 <= v < 12 for v in q)
        elif i == 2:  # 8 > 7 examples: two disjoint pools, each drawn with replacement
            assert not set(s) & set(q) and all(0 <= v < 7 for v in s + q)
        else:
            assert len(set(s + q)) == S[i] + Q[i] and all(0 <= v < n[i] for v in s + q)
        assert bool((support[i, S[i] :] == 0).all() and (query[i, Q[i] :] == 0).all())


class CountingDataset(Dataset):
    """A map-style dataset that counts the items it serves."""

    def __init__(self, x, y):
        self.x, self.targets, self.served = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, j):
        self.served += 1
        return self.x[j], self.targets[j]


def test_item_datasets_load_only_the_examples_a_round_reads():
    x, y = torch.randn(2_000, 3), torch.arange(2_000) % 4
    dataset = CountingDataset(x, y)
    dm = DatasetClients(dataset, num_clients=20, num_classes=4, clients_per_round=3, support_size=2, query_size=3)
    dm.setup()
    before = dataset.served
    batch = dm.round_batch(0)
    assert dataset.served - before == 3 * (2 + 3)
    fast = DatasetClients(TensorDataset(x, y), num_clients=20, num_classes=4, clients_per_round=3, support_size=2, query_size=3)
    assert fast.population("train").batched and not dm.population("train").batched
    other = fast.round_batch(0)
    for name in ("support_x", "support_y", "query_x", "query_y", "client_id", "weight"):
        assert torch.equal(getattr(batch, name), getattr(other, name)), name


def test_a_tensor_dataset_with_bad_values_names_the_client_at_setup():
    x, y = torch.randn(400, 3), torch.arange(400) % 4
    x[123, 1] = float("nan")
    dm = DatasetClients(TensorDataset(x, y), num_clients=10, num_classes=4, clients_per_round=2)
    with pytest.raises(ValueError, match=r"Client '\d+': expected finite features `x` \(no NaN or inf\), got nan"):
        dm.setup()


def test_episodes_read_in_a_batch_are_checked_and_the_episode_named():
    x, y = torch.randn(400, 4), torch.arange(400) % 40
    x[y == 3] = float("inf")  # every example of class 3
    dm = EpisodicClients(TensorDataset(x, y), ways=5, shots=1, queries=2, clients_per_round=8, num_train_clients=500)
    dm.setup()
    with pytest.raises(ValueError, match=r"Client '\d+': expected finite features `x` \(no NaN or inf\), got inf"):
        for r in range(50):
            dm.round_batch(r)


def test_packed_clients_check_every_client_at_setup_and_name_the_bad_one():
    clients = [(torch.randn(6, 2), torch.randint(0, 3, (6,))) for _ in range(50)]
    clients[37][1][4] = 3
    dm = TensorClients(clients, num_classes=3, support_size=2, query_size=2)
    with pytest.raises(ValueError, match=r"Client '37': expected integer labels `y` in \[0, 3\).*got 3 in example 4"):
        dm.setup()


def test_sinusoid_single_clients_equal_their_rows_of_a_batch():
    dm = SinusoidClients(num_clients=50, noise_std=0.3, seed=4)
    ids, index = torch.tensor([3, 17, 42]), torch.tensor([[0, 5, 99], [1, 1, 2], [98, 50, 7]])
    x, y = dm.examples(ids, index)
    for row, k in enumerate(ids.tolist()):
        client = dm.make_client(k)
        assert torch.equal(x[row], client.x[index[row]]) and torch.equal(y[row], client.y[index[row]])


@pytest.mark.parametrize("support,query", [(0, 4), (4, 0)])
def test_a_fixed_split_with_an_empty_part_is_refused_even_with_replacement(support, query):
    client = ((torch.randn(support, 2), torch.randn(support, 1)), (torch.randn(query, 2), torch.randn(query, 1)))
    fine = ((torch.randn(3, 2), torch.randn(3, 1)), (torch.randn(3, 2), torch.randn(3, 1)))
    dm = TensorClients([fine, client, fine], protocol="unseen", client_split=(1.0, 0.0, 0.0), clients_per_round=2,
                       support_size=2, query_size=2, replacement=True)
    with pytest.raises(ValueError, match=rf"Client '1' has a fixed split with {support} support and {query} query examples"):
        dm.setup()


def test_a_client_that_cannot_be_read_is_named_with_what_is_wrong():
    from lightning_metafed.data import FederatedDataModule
    from lightning_metafed.data.population import ClientData, LazyPopulation

    class Broken(FederatedDataModule):
        def build_population(self):
            def make(k):
                n_y = 3 if k == 4 else 8  # client 4's targets are shorter than its features
                return ClientData(torch.randn(8, 2), torch.randn(n_y, 1))

            return LazyPopulation(10, make, size=8)

    dm = Broken(clients_per_round=10, support_size=3, query_size=3, client_split=(1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="Client '4': x has 8 examples but y has 3"):
        dm.round_batch(0)
