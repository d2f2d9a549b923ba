"""FederatedDataModule: seeded rounds, disjoint support/query, evaluation coverage, resuming, errors."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from conftest import client_rows, quiet_trainer
from torch import nn

import lightning_metafed as lm
from lightning_metafed.data import SinusoidClients, TaskBatch, TensorClients

OFFSET = 10_000  # client c's example ids are c * OFFSET + 0..n-1


def id_client(c: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A client whose every x is a unique example id and y = 2x + 1 (to check x/y stay paired)."""
    x = (c * OFFSET + torch.arange(n)).float().unsqueeze(-1)
    return x, 2 * x + 1


def id_clients(sizes: list[int], first: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [id_client(first + c, n) for c, n in enumerate(sizes)]


def example_ids(batch: TaskBatch, j: int) -> tuple[list[int], list[int]]:
    """The example ids of client ``j``'s support and query sets, padding removed."""
    return tuple(
        [int(v) for v in client_rows(x, mask, j)[:, 0]]
        for x, mask in ((batch.support_x, batch.support_mask), (batch.query_x, batch.query_mask))
    )


def owner(example_id: int) -> int:
    return example_id // OFFSET


def check_pairs(batch: TaskBatch) -> None:
    """Targets stay attached to their inputs (padding is zero in both)."""
    for x, y, mask in ((batch.support_x, batch.support_y, batch.support_mask), (batch.query_x, batch.query_y, batch.query_mask)):
        expected = 2 * x + 1
        if mask is not None:
            expected = expected * mask.unsqueeze(-1)
        torch.testing.assert_close(y, expected)


def training_parts(batch: TaskBatch):
    """``(client id, support ids, query ids)`` of each client of a training batch, after checking
    that targets stay paired and that support and query are disjoint examples of that client."""
    check_pairs(batch)
    for j, c in enumerate(batch.client_id.tolist()):
        support, query = example_ids(batch, j)
        assert not set(support) & set(query)
        assert {owner(i) for i in support + query} == {c}
        yield c, support, query


def eval_batches(dm, split: str) -> list[TaskBatch]:
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    return list(loader)


def materialize(dm, rounds: int = 5) -> None:
    """Everything that loads clients: setup, a few rounds, every val/test batch."""
    dm.setup()
    for r in range(rounds):
        dm.round_batch(r)
    for split in ("val", "test"):
        eval_batches(dm, split)


SIZES = [12, 20, 35, 50, 16, 27, 44, 13, 19, 30, 22, 41, 18, 25, 33, 48, 14, 29, 38, 21]


def unseen_dm(**kwargs) -> TensorClients:
    args = dict(clients_per_round=4, support_size=4, query_size=5, client_split=(0.6, 0.2, 0.2),
                eval_clients_per_batch=3, seed=7)
    args.update(kwargs)
    return TensorClients(id_clients(SIZES), **args)


def local_dm(**kwargs) -> TensorClients:
    args = dict(protocol="local", clients_per_round=5, support_size=3, query_size=4, local_split=(0.6, 0.2, 0.2),
                eval_clients_per_batch=3, seed=7)
    args.update(kwargs)
    return TensorClients(id_clients(SIZES[:10]), **args)


# ---------------------------------------------------------------------------------- determinism


def sinusoid(seed: int = 0, **kwargs) -> SinusoidClients:
    return SinusoidClients(num_clients=200, clients_per_round=5, support_size=5, query_size=7, seed=seed, **kwargs)


def assert_same_batch(a: TaskBatch, b: TaskBatch) -> None:
    torch.testing.assert_close(a.client_id, b.client_id)
    for name in ("support_x", "support_y", "query_x", "query_y", "weight"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))


def test_rounds_are_a_pure_function_of_seed_and_round():
    a, b = sinusoid(seed=3), sinusoid(seed=3)
    rounds = [0, 1, 2, 7, 123, 10**6]
    first = {r: a.round_batch(r) for r in rounds}
    for r in reversed(rounds):  # visiting order does not matter
        assert_same_batch(first[r], b.round_batch(r))
    assert_same_batch(first[7], a.round_batch(7))
    batch = first[0]
    assert batch.support_x.shape == (5, 5, 1) and batch.query_x.shape == (5, 7, 1)
    assert batch.client_id.unique().numel() == 5


def test_different_rounds_and_seeds_give_different_batches():
    dm = sinusoid(seed=3)
    id_sets = [frozenset(dm.round_batch(r).client_id.tolist()) for r in range(6)]
    assert len(set(id_sets)) > 1
    other = sinusoid(seed=4).round_batch(0)
    batch = dm.round_batch(0)
    assert not torch.equal(batch.support_x, other.support_x)


def test_train_dataloader_without_trainer_walks_consecutive_rounds():
    dm = sinusoid(seed=1, rounds_per_epoch=3)
    loader = dm.train_dataloader()
    assert len(loader) == 3
    seen = [b for _ in range(2) for b in loader]
    assert len(seen) == 6
    for r, batch in enumerate(seen):
        assert_same_batch(batch, dm.round_batch(r))


# ------------------------------------------------------------------------- disjoint support/query


@pytest.mark.parametrize("make", [unseen_dm, local_dm])
def test_train_support_and_query_are_disjoint_examples_of_the_client(make):
    dm = make()
    for r in range(25):
        for _, support, query in training_parts(dm.round_batch(r)):
            assert len(support) == len(set(support)) == dm.support_size
            assert len(query) == len(set(query)) == dm.query_size


@pytest.mark.parametrize("make", [unseen_dm, local_dm])
@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_support_and_query_are_disjoint(make, split):
    dm = make()
    batches = eval_batches(dm, split)
    assert batches
    for batch in batches:
        check_pairs(batch)
        for j, c in enumerate(batch.client_id.tolist()):
            support, query = example_ids(batch, j)
            assert support and query
            assert len(set(support)) == len(support) and len(set(query)) == len(query)
            assert not set(support) & set(query)
            assert {owner(i) for i in support + query} == {c}


def test_local_protocol_never_trains_on_the_local_val_or_test_parts():
    dm = local_dm(clients_per_round=10)
    parts = {}
    for split in ("val", "test"):
        for batch in eval_batches(dm, split):
            for j, c in enumerate(batch.client_id.tolist()):
                support, query = map(set, example_ids(batch, j))
                parts.setdefault(c, {})[split] = (support, query)
    assert sorted(parts) == list(range(10))
    trained: dict[int, set[int]] = {c: set() for c in parts}
    for r in range(60):
        batch = dm.round_batch(r)
        for j, c in enumerate(batch.client_id.tolist()):
            support, query = example_ids(batch, j)
            trained[c] |= set(support) | set(query)
    for c, p in parts.items():
        val_support, val_query = p["val"]
        test_support, test_query = p["test"]
        everything = set(range(c * OFFSET, c * OFFSET + SIZES[c]))
        # both evaluations adapt on the same local train part
        assert val_support == test_support
        assert not val_support & val_query and not val_support & test_query and not val_query & test_query
        assert val_support | val_query | test_query == everything
        # rounds only ever draw from the local train part, and over 60 rounds they visit all of it
        assert trained[c] <= val_support
        assert trained[c] == val_support
        assert not trained[c] & test_query and not trained[c] & val_query


# --------------------------------------------------------------------------------- eval coverage


@pytest.mark.parametrize("split", ["val", "test"])
def test_unseen_eval_covers_every_held_out_client_and_example_once(split):
    dm = unseen_dm()
    batches = eval_batches(dm, split)
    population = dm.population(split)
    assert len(population) == 4 and len(batches) == 2  # 4 clients, 3 per batch
    assert [b.num_clients for b in batches] == [3, 1]
    padded = False
    seen_clients: list[int] = []
    seen_query: list[int] = []
    for batch in batches:
        padded |= batch.query_mask is not None
        for j, c in enumerate(batch.client_id.tolist()):
            seen_clients.append(c)
            support, query = example_ids(batch, j)
            assert len(support) == dm.eval_support_size
            seen_query += query
            # support + query is the client's whole data
            assert sorted(support + query) == list(range(c * OFFSET, c * OFFSET + SIZES[c]))
    assert padded, "clients of different sizes must be padded"
    assert sorted(seen_clients) == sorted(population.global_id(i) for i in range(len(population)))
    assert len(seen_clients) == len(set(seen_clients))
    assert len(seen_query) == len(set(seen_query))
    assert len(seen_query) == sum(SIZES[c] - dm.eval_support_size for c in seen_clients)


def test_eval_padding_masks_match_real_sizes():
    dm = unseen_dm(eval_support_size=0.25)  # support sizes differ too
    for split in ("val", "test"):
        batches = eval_batches(dm, split)
        assert batches[0].num_clients == 3
        assert batches[0].support_mask is not None and batches[0].query_mask is not None
        for batch in batches:
            for j, c in enumerate(batch.client_id.tolist()):
                n = SIZES[c]
                s = max(1, round(0.25 * n))
                support, query = example_ids(batch, j)
                assert len(support) == s
                assert len(query) == n - s
                if batch.query_mask is not None:
                    # mask is a prefix and padding is zero
                    assert batch.query_mask[j, : n - s].all() and not batch.query_mask[j, n - s :].any()
                    assert (batch.query_x[j, n - s :] == 0).all()


@pytest.mark.parametrize("split", ["val", "test"])
def test_local_eval_covers_every_client_and_query_example_once(split):
    dm = local_dm()
    batches = eval_batches(dm, split)
    assert len(batches) == 4  # 10 clients, 3 per batch
    seen = Counter()
    seen_query = Counter()
    assert batches[0].query_mask is not None and batches[0].support_mask is not None
    for batch in batches:
        for j, c in enumerate(batch.client_id.tolist()):
            seen[c] += 1
            _, query = example_ids(batch, j)
            seen_query.update(query)
            assert len(query) == max(1, round(0.2 * SIZES[c]))
    assert sorted(seen) == list(range(10)) and set(seen.values()) == {1}
    assert set(seen_query.values()) == {1}


def test_unseen_client_splits_are_disjoint_and_complete():
    dm = unseen_dm()
    dm.setup()
    ids = {s: {dm.population(s).global_id(i) for i in range(len(dm.population(s)))} for s in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert ids["train"] | ids["val"] | ids["test"] == set(range(20))
    for r in range(30):
        assert set(dm.round_batch(r).client_id.tolist()) <= ids["train"]
    # the split depends on the seed
    other = unseen_dm(seed=8)
    other.setup()
    other_train = {other.population("train").global_id(i) for i in range(12)}
    assert other_train != ids["train"]


# --------------------------------------------------------------------------------------- weights


def test_weights_are_client_sample_counts():
    dm = unseen_dm()
    for r in range(10):
        batch = dm.round_batch(r)
        expected = torch.tensor([float(SIZES[c]) for c in batch.client_id.tolist()])
        torch.testing.assert_close(batch.weight, expected)
    for split in ("val", "test"):
        for batch in eval_batches(dm, split):
            expected = torch.tensor([float(SIZES[c]) for c in batch.client_id.tolist()])
            torch.testing.assert_close(batch.weight, expected)


def test_local_train_weights_are_local_train_part_sizes():
    dm = local_dm()
    val_support = {}
    for batch in eval_batches(dm, "val"):
        for j, c in enumerate(batch.client_id.tolist()):
            val_support[c] = len(example_ids(batch, j)[0])
    for r in range(5):
        batch = dm.round_batch(r)
        expected = torch.tensor([float(val_support[c]) for c in batch.client_id.tolist()])
        torch.testing.assert_close(batch.weight, expected)


def test_fractional_sizes_pad_training_batches():
    dm = unseen_dm(support_size=0.25, query_size=0.5, clients_per_round=6)
    batch = dm.round_batch(0)
    assert batch.support_mask is not None and batch.query_mask is not None
    for j, c in enumerate(batch.client_id.tolist()):
        assert int(batch.support_mask[j].sum()) == max(1, round(0.25 * SIZES[c]))
        assert int(batch.query_mask[j].sum()) == max(1, round(0.5 * SIZES[c]))
    check_pairs(batch)


# ---------------------------------------------------------------------------------------- resume


class RecordingMAML(lm.MAML):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, batch.client_id.clone(), batch.support_x.clone()))
        return super().training_step(batch, batch_idx)


def recording_model(seed: int) -> RecordingMAML:
    torch.manual_seed(seed)
    return RecordingMAML(nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)))


def resume_dm() -> SinusoidClients:
    return SinusoidClients(num_clients=200, clients_per_round=4, support_size=5, query_size=5, rounds_per_epoch=5, seed=3)


# The test resumes mid-epoch on purpose and checks what Lightning's warning fears: the rounds after the
# checkpoint are the same as without the interruption (they are a function of the step, not of loader state).
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended:UserWarning")
@pytest.mark.parametrize("stop", [3, 5])  # mid-epoch and at an epoch boundary
def test_resumed_run_sees_the_same_rounds_and_reaches_the_same_parameters(tmp_path, stop):
    full = recording_model(0)
    quiet_trainer(max_steps=7).fit(full, datamodule=resume_dm())
    assert [s[0] for s in full.seen] == list(range(7))

    first = recording_model(0)
    trainer = quiet_trainer(max_steps=stop)
    trainer.fit(first, datamodule=resume_dm())
    path = tmp_path / "stop.ckpt"
    trainer.save_checkpoint(path)
    for (_, ids_a, sx_a), (_, ids_b, sx_b) in zip(first.seen, full.seen[:stop]):
        torch.testing.assert_close(ids_a, ids_b)
        torch.testing.assert_close(sx_a, sx_b)

    resumed = recording_model(123)  # different init: everything must come from the checkpoint
    quiet_trainer(max_steps=7).fit(resumed, datamodule=resume_dm(), ckpt_path=path)
    assert [s[0] for s in resumed.seen] == list(range(stop, 7))
    for (_, ids_a, sx_a), (_, ids_b, sx_b) in zip(resumed.seen, full.seen[stop:]):
        torch.testing.assert_close(ids_a, ids_b)
        torch.testing.assert_close(sx_a, sx_b)
    for (name, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(q, p, msg=name)


def test_state_dict_round_trip_and_mismatch_warning():
    dm = sinusoid(seed=3)
    state = dm.state_dict()
    assert state == {"seed": 3, "protocol": "unseen"}
    other = sinusoid(seed=3)
    other.load_state_dict(state)  # no warning needed; and a mismatch warns
    with pytest.warns(UserWarning, match=r"seed=3.*seed=4"):
        sinusoid(seed=4).load_state_dict(state)


# ---------------------------------------------------------------------------------------- errors


def explicit(train_sizes, **kwargs) -> TensorClients:
    """All ``train_sizes`` clients in train (explicit held-out clients), names 'train_<i>'."""
    n = len(train_sizes)
    args = dict(clients_per_round=n, support_size=4, query_size=4, seed=0)
    args.update(kwargs)
    return TensorClients(id_clients(train_sizes), val=id_clients([20], first=n), test=id_clients([20], first=n + 1), **args)


def test_client_too_small_names_client_and_its_size():
    dm = explicit([20] * 9 + [6])
    with pytest.raises(ValueError, match=r"`support_size` \+ `query_size` \(4 \+ 4\).*client 'train_9' \(it has 6 examples\)"):
        materialize(dm)


def test_client_too_small_in_unnamed_population():
    dm = TensorClients(id_clients([20, 20, 6, 20]), protocol="local", local_split=(0.7, 0.1, 0.2), clients_per_round=4,
                       support_size=4, query_size=4)
    # client 2's local train part holds 4 examples
    with pytest.raises(ValueError, match=r"client '2' \(it has 4 examples\)"):
        materialize(dm)


def test_replacement_allows_small_clients_with_disjoint_support_and_query():
    dm = explicit([20] * 9 + [6], replacement=True)
    small_seen = 0
    for r in range(20):
        for c, support, query in training_parts(dm.round_batch(r)):
            assert len(support) == 4 and len(query) == 4
            if c == 9:
                small_seen += 1
                assert len(set(support) | set(query)) <= 6
    assert small_seen == 20


def test_replacement_client_with_a_single_example():
    dm = explicit([20] * 3 + [1], replacement=True)
    with pytest.raises(ValueError, match=r"[Cc]lient 'train_3' has 1 example"):
        materialize(dm)


@pytest.mark.parametrize("where", ["train", "held_out"])
def test_empty_client(where):
    empty = (torch.zeros(0, 1), torch.zeros(0, 1))
    if where == "train":
        dm = TensorClients(id_clients([20, 20]) + [empty], val=id_clients([20], 3), test=id_clients([20], 4),
                           clients_per_round=3, support_size=4, query_size=4)
        pattern = r"[Cc]lient 'train_2'.*(no examples|0 examples)"
    else:
        dm = TensorClients(id_clients([20, 20]), val=[empty], test=id_clients([20], 3), clients_per_round=2,
                           support_size=4, query_size=4)
        pattern = r"[Cc]lient 'val_0'.*(no examples|0 examples)"
    with pytest.raises(ValueError, match=pattern):
        materialize(dm)


@pytest.mark.parametrize("protocol", ["unseen", "local"])
def test_nan_features_name_the_client(protocol):
    clients = id_clients([20] * 5)
    clients[2] = (torch.full((20, 1), float("nan")), torch.zeros(20, 1))
    if protocol == "unseen":
        dm = TensorClients(clients, val=id_clients([20], 5), test=id_clients([20], 6), clients_per_round=5,
                           support_size=4, query_size=4)
        name = "train_2"
    else:
        dm = TensorClients(clients, protocol="local", clients_per_round=5, support_size=4, query_size=4)
        name = "2"
    with pytest.raises(ValueError, match=rf"[Cc]lient '{name}'.*(NaN|nan)"):
        materialize(dm)


@pytest.mark.parametrize("bad", [3, -1])
def test_labels_outside_num_classes(bad):
    clients = [(torch.randn(20, 2), torch.randint(0, 3, (20,))) for _ in range(5)]
    clients[1][1][7] = bad
    dm = TensorClients(clients, protocol="local", clients_per_round=5, support_size=4, query_size=4, num_classes=3)
    # the "local" protocol loads every part of every client: the bad label is met in a round or an evaluation
    with pytest.raises(ValueError, match=rf"[Cc]lient '1'.*\[0, 3\).*{bad}"):
        materialize(dm, rounds=1)


def test_float_labels_rejected_for_classification():
    clients = [(torch.randn(20, 2), torch.randint(0, 3, (20,)).float()) for _ in range(3)]
    dm = TensorClients(clients, protocol="local", clients_per_round=3, support_size=4, query_size=4, num_classes=3)
    with pytest.raises(ValueError, match=r"[Cc]lient '0'.*integer labels"):
        materialize(dm)


@pytest.mark.parametrize("protocol", ["unseen", "local"])
@pytest.mark.parametrize("y_len", [19, 21])
def test_mismatched_x_and_y_lengths(protocol, y_len):
    clients = id_clients([20] * 5)
    clients[3] = (torch.randn(20, 1), torch.randn(y_len, 1))
    pattern = rf"[Cc]lient '?(train_)?3'?.*20.*{y_len}|`train` client 3.*20.*{y_len}"
    with pytest.raises(ValueError, match=pattern):
        if protocol == "unseen":
            dm = TensorClients(clients, val=id_clients([20], 5), test=id_clients([20], 6), clients_per_round=5,
                               support_size=4, query_size=4)
        else:
            dm = TensorClients(clients, protocol="local", clients_per_round=5, support_size=4, query_size=4)
        materialize(dm)


def test_mismatched_lengths_in_a_fixed_split():
    bad = ((torch.randn(5, 1), torch.randn(4, 1)), (torch.randn(6, 1), torch.randn(6, 1)))
    with pytest.raises(ValueError, match=r"`train` client 1: support x has 5 examples but y has 4"):
        TensorClients([id_client(0, 10), bad])


def test_client_split_leaving_no_held_out_clients():
    dm = TensorClients(id_clients([20] * 5), client_split=(0.8, 0.1, 0.1), clients_per_round=2)
    with pytest.raises(ValueError, match=r"`client_split`.*5 clients leaves no val clients"):
        dm.setup()


def test_clients_per_round_larger_than_train_population():
    dm = TensorClients(id_clients([20] * 10), client_split=(0.8, 0.1, 0.1), clients_per_round=9)
    with pytest.raises(ValueError, match=r"`clients_per_round` <= the 8 train clients, got 9"):
        dm.setup()


@pytest.mark.parametrize("name", ["support_size", "query_size", "eval_support_size"])
@pytest.mark.parametrize("value", [0, -3, 1.5, 1.0, 0.0, True, "3"])
def test_bad_sizes(name, value):
    with pytest.raises(ValueError, match=rf"`{name}`.*got {re.escape(repr(value))}"):
        SinusoidClients(num_clients=50, **{name: value})


@pytest.mark.parametrize("name", ["clients_per_round", "rounds_per_epoch", "eval_clients_per_batch"])
@pytest.mark.parametrize("value", [0, 2.0, False])
def test_bad_counts(name, value):
    with pytest.raises(ValueError, match=rf"`{name}`.*got {re.escape(repr(value))}"):
        SinusoidClients(num_clients=50, **{name: value})


@pytest.mark.parametrize("name, value", [("protocol", "federated"), ("protocol", None), ("client_sampling", "weighted")])
def test_bad_choices(name, value):
    with pytest.raises(ValueError, match=rf"`{name}`.*got {re.escape(repr(value))}"):
        SinusoidClients(num_clients=50, **{name: value})


@pytest.mark.parametrize("name", ["client_split", "local_split"])
@pytest.mark.parametrize("value", [(0.5, 0.2, 0.2), (0.8, 0.2), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1), 0.8])
def test_bad_splits(name, value):
    with pytest.raises(ValueError, match=rf"`{name}`.*summing to 1.*got {re.escape(repr(value))}"):
        SinusoidClients(num_clients=50, **{name: value})


def test_bad_seed():
    with pytest.raises(ValueError, match=r"`seed`.*got 1\.5"):
        SinusoidClients(num_clients=50, seed=1.5)


def test_explicit_held_out_clients_need_unseen_protocol():
    with pytest.raises(ValueError, match=r"protocol='unseen'.*'local'"):
        TensorClients(id_clients([20] * 3), val=id_clients([20], 3), protocol="local")


# ------------------------------------------------------------------------------- local protocol


def test_local_without_val_part_has_no_val_loader_and_a_working_test_loader():
    dm = local_dm(local_split=(0.75, 0.0, 0.25))
    assert dm.val_dataloader() == []
    batches = eval_batches(dm, "test")
    assert sum(b.num_clients for b in batches) == 10
    for batch in batches:
        for j, c in enumerate(batch.client_id.tolist()):
            support, query = example_ids(batch, j)
            n = SIZES[c]
            assert len(query) == max(1, round(0.25 * n)) and len(support) == n - len(query)
            assert sorted(support + query) == list(range(c * OFFSET, c * OFFSET + n))
    dm.round_batch(0)


# local_split holds no validation part on purpose: the data module then hands Lightning no validation batches
@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero:UserWarning")
def test_local_with_a_trainer_validates_and_tests():
    dm = local_dm(local_split=(0.75, 0.0, 0.25), rounds_per_epoch=2)
    torch.manual_seed(0)
    model = lm.MAML(nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)))
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1.0)
    trainer.fit(model, datamodule=dm)
    results = trainer.test(model, datamodule=dm, verbose=False)
    assert results and all(torch.isfinite(torch.tensor(v)) for v in results[0].values())


# ------------------------------------------------------------------------------------- sampling


def size_dm(sampling: str, clients_per_round: int = 1) -> TensorClients:
    sizes = [20] * 20
    sizes[5] = sizes[13] = 1000
    return TensorClients(id_clients(sizes), val=id_clients([20], 20), test=id_clients([20], 21),
                         clients_per_round=clients_per_round, client_sampling=sampling, support_size=4, query_size=4,
                         seed=0)


def test_size_sampling_prefers_large_clients():
    counts = {}
    for sampling in ("size", "uniform"):
        dm = size_dm(sampling)
        picks = Counter(int(dm.round_batch(r).client_id[0]) for r in range(300))
        counts[sampling] = picks[5] + picks[13]
    # P(large) = 2000 / 2360 ≈ 0.85 with "size", 0.1 with "uniform"
    assert counts["size"] > 200, counts
    assert counts["uniform"] < 80, counts


@pytest.mark.parametrize("sampling", ["size", "uniform"])
def test_clients_in_a_round_are_distinct(sampling):
    dm = size_dm(sampling, clients_per_round=8)
    for r in range(30):
        ids = dm.round_batch(r).client_id.tolist()
        assert len(set(ids)) == 8


def test_held_out_client_too_small_for_eval_support():
    dm = TensorClients(id_clients([20, 20, 20]), val=id_clients([3], 3), test=id_clients([20], 4), clients_per_round=2,
                       support_size=4, query_size=4)
    with pytest.raises(ValueError, match=r"`eval_support_size` < 3 for held-out client 'val_0' \(it has 3 examples"):
        dm.setup()


def test_a_failed_setup_does_not_leave_a_silently_broken_data_module():
    # The first setup() rejects the held-out client (3 examples, eval_support_size 4). Calling setup() again, as
    # trainer.validate/test do after a failed fit, must not hand out a val batch with an empty query set.
    dm = TensorClients(id_clients([20, 20, 20]), val=id_clients([3], 3), test=id_clients([20], 4), clients_per_round=2,
                       support_size=4, query_size=4)
    with pytest.raises(ValueError, match=r"held-out client 'val_0'"):
        dm.setup()
    with pytest.raises(ValueError, match=r"held-out client 'val_0'"):
        dm.setup("validate")
        for batch in dm.val_dataloader():
            assert batch.query_x.shape[1] > 0, "a held-out client with an empty query set"


def test_unseen_without_val_fraction_has_no_val_loader():
    dm = unseen_dm(client_split=(0.8, 0.0, 0.2))
    assert dm.val_dataloader() == []
    assert sum(b.num_clients for b in dm.test_dataloader()) == 4
    dm.setup()
    assert len(dm.population("train")) == 16
