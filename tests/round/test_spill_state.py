"""The spilling per-client state store: exact rows through disk, bounded resident memory, space only
for visited clients, checkpoints interchangeable with the in-memory store."""

from __future__ import annotations

import copy
import gc
import io
import os
import pickle
import random
import tracemalloc
from dataclasses import replace

import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, loader, mlp, quiet_trainer, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.inner import SGD
from lightning_metafed.round import ClientStateStore, InMemoryClientState
from lightning_metafed.round.spill import SpillingClientState

ROW_BYTES = 3 * 8 + 8 + 2 * 2 * 2  # "h": float64 [3], "n": int64 [], "b": bfloat16 [2, 2]


def initial(key):
    return {
        "h": torch.full((3,), float(key), dtype=torch.float64),
        "n": torch.zeros((), dtype=torch.int64),
        "b": torch.ones(2, 2, dtype=torch.bfloat16),
    }


def random_rows(m, g):
    return {
        "h": torch.randn(m, 3, generator=g, dtype=torch.float64),
        "n": torch.randint(-(2**62), 2**62, (m,), generator=g),
        "b": torch.randn(m, 2, 2, generator=g).to(torch.bfloat16),
    }


def assert_rows_equal(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def scratch_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("metafed-client-state-"))


def test_unseen_clients_gather_their_initial_rows_and_take_no_space(tmp_path):
    store = SpillingClientState(initial, tmp_path, max_resident_rows=2)
    assert isinstance(store, ClientStateStore)
    rows = store.gather(torch.tensor([10**6, 3]))
    assert_rows_equal(rows, {k: torch.stack([initial(10**6)[k], initial(3)[k]]) for k in rows})
    assert len(store) == 0 and store.num_resident == 0 and store.path is None and scratch_files(tmp_path) == []
    rows["h"] += 1  # a gathered row is a copy
    assert store.gather([3])["h"].tolist() == [[3.0] * 3]
    with pytest.raises(ValueError, match="`client_id`"):
        store.gather(None)
    with pytest.raises(ValueError, match="`max_resident_rows` to be an int >= 0, got -1"):
        SpillingClientState(initial, tmp_path, max_resident_rows=-1)
    with pytest.raises(ValueError, match="`directory` to be an existing directory"):
        SpillingClientState(initial, tmp_path / "missing", max_resident_rows=1)


@pytest.mark.parametrize("max_resident_rows", [0, 4])
def test_written_rows_come_back_exactly_through_memory_and_disk(tmp_path, max_resident_rows):
    g, rng = torch.Generator().manual_seed(0), random.Random(1)
    store = SpillingClientState(initial, tmp_path, max_resident_rows=max_resident_rows)
    reference = InMemoryClientState(initial)
    population = list(range(50))
    for _ in range(12):
        ids = rng.sample(population, 8)
        rows = random_rows(8, g)
        store.write(ids, rows)
        reference.write(ids, rows)
        assert store.num_resident <= max_resident_rows
        rows["h"] += 1  # the store kept copies
        ids = rng.sample(population, 20)  # visited and unseen, resident and spilled, in random order
        assert_rows_equal(store.gather(ids), reference.gather(ids))
        assert store.num_resident <= max_resident_rows
    assert len(store) == len(reference) > max_resident_rows and store.path is not None
    assert_rows_equal(store.gather(population), reference.gather(population))


def test_the_state_dict_equals_the_in_memory_one_and_loads_into_either_store(tmp_path):
    g = torch.Generator().manual_seed(2)
    store = SpillingClientState(initial, tmp_path, max_resident_rows=3)
    reference = InMemoryClientState(initial)
    for r in range(5):
        ids, rows = [(7 * r + i) % 13 for i in range(6)], random_rows(6, g)
        store.write(ids, rows)
        reference.write(ids, rows)
    state = store.state_dict()
    assert list(state["rows"]) == list(reference.state_dict()["rows"])
    for key, row in reference.state_dict()["rows"].items():
        assert_rows_equal(state["rows"][key], row)
    buffer = io.BytesIO()
    torch.save(pickle.loads(pickle.dumps(state)), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    (tmp_path / "other").mkdir()
    into_memory, into_spill = InMemoryClientState(initial), SpillingClientState(initial, tmp_path / "other", 2)
    into_memory.load_state_dict(saved)
    into_spill.load_state_dict(reference.state_dict())
    assert into_spill.num_resident == 2 and len(into_spill) == len(reference)
    everyone = list(range(15))
    assert_rows_equal(into_memory.gather(everyone), reference.gather(everyone))
    assert_rows_equal(into_spill.gather(everyone), reference.gather(everyone))


def test_a_malformed_state_dict_is_refused_by_name_and_changes_nothing(tmp_path):
    store = SpillingClientState(initial, tmp_path, max_resident_rows=1)
    store.write([1, 2], random_rows(2, torch.Generator().manual_seed(3)))
    before = store.state_dict()
    good = initial(5)
    cases = [
        ([1, 2], "a list"),
        ({"rows": 3}, "'rows' holding a int"),
        ({"rows": {5: "row"}}, "client 5: expected a mapping"),
        ({"rows": {5: {**good, "h": [1.0]}}}, "entry 'h' to be a tensor"),
        ({"rows": {5: {**good, "h": torch.zeros(4, dtype=torch.float64)}}}, r"client 5: expected the entries and shapes"),
        ({"rows": {5: {"h": good["h"]}}}, "client 5"),
        ({"rows": {5: {**good, "n": torch.zeros((), dtype=torch.float64)}}}, "entry 'n' of dtype torch.int64"),
    ]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            store.load_state_dict(state)
    after = store.state_dict()
    for key, row in before["rows"].items():
        assert_rows_equal(after["rows"][key], row)


def test_a_wrong_shape_or_lossy_write_is_refused_naming_client_entry_and_shapes(tmp_path):
    store = SpillingClientState(initial, tmp_path, max_resident_rows=1)
    rows = random_rows(2, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"client 7.*entry 'h' of shape \[3\], got shape \[4\]"):
        store.write([7, 1], {**rows, "h": torch.zeros(2, 4, dtype=torch.float64)})
    assert len(store) == 0  # a refused write stores none of its rows
    with pytest.raises(ValueError, match=r"client 1.*entries \['b', 'h', 'n'\], got \['h'\]"):
        store.write([1], {"h": torch.zeros(1, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"entry 'n' of dtype torch.int64.*got torch.float32"):
        store.write([1], {**random_rows(1, torch.Generator()), "n": torch.zeros(1)})
    widened = {**random_rows(1, torch.Generator().manual_seed(5))}
    widened["h"] = widened["h"].float()
    store.write([1], widened)  # float32 into a float64 entry is exact
    assert store.gather([1])["h"].dtype == torch.float64
    assert torch.equal(store.gather([1])["h"], widened["h"].double())


def test_scratch_files_are_unique_removed_by_close_and_garbage_collection_and_old_ones_ignored(tmp_path):
    stale = tmp_path / "metafed-client-state-old.rows"
    stale.write_bytes(b"\xff" * 10 * ROW_BYTES)
    rows = random_rows(3, torch.Generator().manual_seed(6))
    first, second = (SpillingClientState(initial, tmp_path, max_resident_rows=1) for _ in range(2))
    first.write([0, 1, 2], rows)
    second.write([0, 1, 2], rows)
    assert first.path != second.path and len(scratch_files(tmp_path)) == 3
    assert_rows_equal(first.gather([0, 1, 2]), rows)
    assert_rows_equal(second.gather([0, 1, 2, 3]), {**rows, **{k: torch.cat([rows[k], initial(3)[k][None]]) for k in rows}})
    first.close()
    first.close()
    assert not os.path.exists(first.path or "") and len(scratch_files(tmp_path)) == 2 and len(first) == 0
    with pytest.raises(ValueError, match="closed"):
        first.gather([0])
    path = second.path
    del second
    gc.collect()
    assert not os.path.exists(path) and scratch_files(tmp_path) == [stale.name]


def test_a_copy_or_pickle_holds_the_same_rows_in_a_scratch_file_of_its_own(tmp_path):
    store = SpillingClientState(initial, tmp_path, max_resident_rows=1)
    rows = random_rows(3, torch.Generator().manual_seed(9))
    store.write([0, 1, 2], rows)
    for twin in (copy.deepcopy(store), pickle.loads(pickle.dumps(store))):
        assert_rows_equal(twin.gather([0, 1, 2]), rows)
        assert twin.path is not None and twin.path != store.path and twin.num_resident == 1
        twin.write([0], random_rows(1, torch.Generator()))
        twin.close()
    assert_rows_equal(store.gather([0, 1, 2]), rows)
    assert scratch_files(tmp_path) == [os.path.basename(store.path)]


def test_a_large_population_keeps_python_memory_and_the_file_small(tmp_path):
    g, rng = torch.Generator().manual_seed(7), random.Random(8)
    rounds = [(rng.sample(range(10**6), 10), random_rows(10, g)) for _ in range(100)]
    visited = {key for ids, _ in rounds for key in ids}
    tracemalloc.start()
    try:
        store = SpillingClientState(initial, tmp_path, max_resident_rows=16)
        for ids, rows in rounds:
            store.gather(ids)
            store.write(ids, rows)
            assert store.num_resident <= 16
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = os.path.getsize(store.path)
    assert len(store) == len(visited) and peak < 2 * 2**20
    assert size <= 2 * len(visited) * ROW_BYTES + 4096
    last_ids, last_rows = rounds[-1]
    assert_rows_equal(store.gather(last_ids), last_rows)


def zero_state(key):
    return {"rounds": torch.zeros((), dtype=torch.float64), "last_loss": torch.zeros((), dtype=torch.float64)}


class StatefulMAML(lm.MAML):
    """MAML whose clients count their rounds and keep their last query loss, in a given store."""

    def __init__(self, *args, store=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.client_state = store

    def client_update(self, meta, task, state):
        update, aux = super().client_update(meta, task)
        return update, aux, {"rounds": state["rounds"] + 1, "last_loss": aux["query_loss"]}


@FIT_WITHOUT_VALIDATION
def test_maml_with_a_spilling_store_trains_exactly_like_the_in_memory_store(tmp_path):
    ids = [[0, 1, 2, 3], [4, 2, 5, 0], [1, 6, 4, 3]]
    batches = [replace(sinusoid_batch(4, seed=r), client_id=torch.tensor(c)) for r, c in enumerate(ids)]
    models = []
    for store in (InMemoryClientState(zero_state), SpillingClientState(zero_state, tmp_path, max_resident_rows=2)):
        model = StatefulMAML(mlp(), inner_optimizer=SGD(lr=0.05), server_optimizer=torch.optim.SGD, store=store)
        quiet_trainer(max_steps=3).fit(model, loader(*batches))
        models.append(model)
    memory, spilled = models
    assert spilled.client_state.path is not None and spilled.client_state.num_resident == 2
    for (name, a), (_, b) in zip(memory.named_parameters(), spilled.named_parameters()):
        assert torch.equal(a, b), name
    everyone = list(range(8))
    assert_rows_equal(spilled.client_state.gather(everyone), memory.client_state.gather(everyone))
    assert spilled.client_state.gather(everyone)["rounds"].tolist() == [2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 0.0]
