"""Client sources: Sinusoid, Synthetic, Digits, Tensor, Dataset, LEAF, Episodic, and LightningCLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import client_rows
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import Dataset

import lightning_metafed as lm
from lightning_metafed.data import (
    DatasetClients,
    DigitsClients,
    EpisodicClients,
    FederatedDataModule,
    LEAFClients,
    SinusoidClients,
    SyntheticClients,
    TensorClients,
)
from lightning_metafed.data.leaf import SHAKESPEARE_LETTERS
from lightning_metafed.data.population import LazyPopulation
from lightning_metafed.data.partition import Dirichlet, Shards


def whole(dm: FederatedDataModule):
    """Every client of the source, before the protocol splits them."""
    return dm.build_population()


# ------------------------------------------------------------------------------------- Sinusoid


def test_sinusoid_ranges_and_function():
    dm = SinusoidClients(num_clients=5000, examples_per_client=20, seed=1)
    amps, phases = zip(*(dm.client_function(k) for k in range(5000)))
    amps, phases = torch.tensor(amps), torch.tensor(phases)
    assert amps.min() >= 0.1 and amps.max() <= 5.0
    assert phases.min() >= 0.0 and phases.max() <= math.pi
    # they fill the ranges (not a constant or a narrow band)
    assert amps.min() < 0.2 and amps.max() > 4.9 and phases.min() < 0.05 and phases.max() > math.pi - 0.05
    for k in range(0, 5000, 25):
        data = dm.make_client(k)
        assert data.x.shape == (20, 1) and data.y.shape == (20, 1) and data.support_end is None
        assert data.x.min() >= -5.0 and data.x.max() <= 5.0
        amp, phase = dm.client_function(k)
        torch.testing.assert_close(data.y, amp * torch.sin(data.x + phase))


def test_sinusoid_clients_depend_on_seed_and_id_only():
    a = SinusoidClients(num_clients=10, seed=4)
    b = SinusoidClients(num_clients=1000, seed=4)
    c = SinusoidClients(num_clients=10, seed=5)
    for k in range(10):
        torch.testing.assert_close(a.make_client(k).x, b.make_client(k).x)
        torch.testing.assert_close(a.make_client(k).y, b.make_client(k).y)
    assert not torch.equal(a.make_client(0).x, c.make_client(0).x)
    assert a.client_function(0) != a.client_function(1)


def test_sinusoid_noise():
    clean = SinusoidClients(num_clients=10, seed=0).make_client(3)
    noisy = SinusoidClients(num_clients=10, noise_std=0.5, seed=0).make_client(3)
    torch.testing.assert_close(noisy.x, clean.x)
    residual = noisy.y - clean.y
    assert 0.3 < float(residual.std()) < 0.7


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_clients=0), r"`num_clients`.*got 0"),
        (dict(examples_per_client=1), r"`examples_per_client`.*got 1"),
        (dict(amplitude=(5.0, 0.1)), r"`amplitude`.*\(5\.0, 0\.1\)"),
        (dict(phase=(0.0,)), r"`phase`.*\(0\.0,\)"),
        (dict(x_range=(0.0, float("inf"))), r"`x_range`"),
        (dict(noise_std=-1.0), r"`noise_std`.*-1\.0"),
    ],
)
def test_sinusoid_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinusoidClients(**kwargs)


class CountingPopulation(LazyPopulation):
    """A lazy population that counts its per-client lookups and records which clients it builds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lookups: Counter[str] = Counter()
        self.built: list[int] = []

    def client(self, i: int):
        self.lookups["client"] += 1
        self.built.append(i)
        return super().client(i)

    def size(self, i: int) -> int:
        self.lookups["size"] += 1
        return super().size(i)

    def support_end(self, i: int):
        self.lookups["support_end"] += 1
        return super().support_end(i)

    def name(self, i: int) -> str:
        self.lookups["name"] += 1
        return super().name(i)

    def global_id(self, i: int) -> int:
        self.lookups["global_id"] += 1
        return super().global_id(i)


class CountingSinusoidClients(SinusoidClients):
    def build_population(self) -> CountingPopulation:
        self.counted = CountingPopulation(self.num_clients, self.make_client, self.examples_per_client)
        return self.counted


def _traced_round(num_clients: int):
    """Setup and one round of 10 clients: ``(peak traced Python memory, population, batch)``."""
    dm = CountingSinusoidClients(num_clients=num_clients, clients_per_round=10, seed=0)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        dm.setup()
        batch = dm.round_batch(0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert batch.support_x.shape == (10, 10, 1)
    return peak, dm.counted, batch


def test_a_million_sinusoid_clients_cost_little_python_memory():
    small, small_population, _ = _traced_round(10**3)
    large, large_population, batch = _traced_round(10**6)
    assert large - small < 50 * 2**20, (small, large)
    # Speed is counted, not timed (benchmarks/data_speed.py times it): setup and a round build only the
    # sampled clients, each once, and look clients up as often for 10^6 clients as for 10^3.
    assert sorted(large_population.built) == sorted(batch.client_id.tolist())
    assert large_population.lookups == small_population.lookups
    assert sum(large_population.lookups.values()) <= 10 * 10


def test_a_million_sinusoid_clients_cost_little_resident_memory():
    # tracemalloc does not see tensor storage: check the process's peak resident memory too
    code = textwrap.dedent(
        """
        import resource
        from lightning_metafed.data import SinusoidClients

        def run(n):
            dm = SinusoidClients(num_clients=n, clients_per_round=10, seed=0)
            dm.setup()
            dm.round_batch(0)
            dm.eval_batch("val", range(3))
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        before = run(10**3)
        after = run(10**6)
        print((after - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 50 * 2**20, growth


def test_million_client_population_samples_distinct_clients_across_the_range():
    dm = SinusoidClients(num_clients=10**6, clients_per_round=50, seed=2)
    ids = torch.cat([dm.round_batch(r).client_id for r in range(4)])
    assert ids.unique().numel() > 190
    assert ids.max() > 900_000 and ids.min() < 100_000


# ------------------------------------------------------------------------------------ Synthetic


def label_histograms(population) -> torch.Tensor:
    return torch.stack(
        [torch.bincount(population.client(i).y, minlength=10).float() / population.size(i) for i in range(len(population))]
    )


def test_synthetic_shapes_labels_sizes_and_skew():
    dm = SyntheticClients(alpha=0.5, beta=0.5, num_clients=30, seed=0)
    pop = whole(dm)
    assert len(pop) == 30
    for i in range(30):
        data = pop.client(i)
        assert data.x.shape == (pop.size(i), 60) and data.x.dtype == torch.float32
        assert data.y.dtype == torch.long and data.y.min() >= 0 and data.y.max() < 10
        assert pop.size(i) >= 50
    sizes = [pop.size(i) for i in range(30)]
    assert max(sizes) > 3 * min(sizes)  # log-normal sizes
    hists = label_histograms(pop)
    majority = hists.max(dim=1).values
    assert float(majority.median()) > 0.5  # far above 1/10: each client is dominated by a few classes
    assert torch.unique(hists.argmax(dim=1)).numel() >= 5  # ... and the dominant class differs across clients


def test_synthetic_is_seeded():
    a = whole(SyntheticClients(num_clients=5, seed=3))
    b = whole(SyntheticClients(num_clients=5, seed=3))
    c = whole(SyntheticClients(num_clients=5, seed=4))
    for i in range(5):
        torch.testing.assert_close(a.client(i).x, b.client(i).x)
        torch.testing.assert_close(a.client(i).y, b.client(i).y)
    assert a.size(0) != c.size(0) or not torch.equal(a.client(0).x, c.client(0).x)
    # a client's data does not depend on the population size
    big = whole(SyntheticClients(num_clients=8, seed=3))
    torch.testing.assert_close(big.client(4).x, a.client(4).x)


def test_synthetic_iid_has_similar_label_distributions():
    def spread(iid: bool) -> float:
        hists = label_histograms(whole(SyntheticClients(num_clients=30, iid=iid, seed=0)))
        return float(0.5 * (hists - hists.mean(0)).abs().sum(1).mean())  # mean total variation to the pooled mix

    iid, non_iid = spread(True), spread(False)
    assert iid < 0.2, iid
    assert non_iid > 0.5, non_iid


def test_synthetic_max_samples_and_rounds():
    dm = SyntheticClients(num_clients=20, max_samples=80, clients_per_round=4, support_size=5, query_size=7, seed=1)
    pop = whole(dm)
    assert all(50 <= pop.size(i) <= 80 for i in range(20))
    batch = dm.round_batch(0)
    assert batch.support_x.shape == (4, 5, 60) and batch.query_y.shape == (4, 7)
    assert dm.num_classes == 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=-1.0), r"`alpha`.*-1\.0"),
        (dict(num_classes=1), r"`num_classes`.*got 1"),
        (dict(max_samples=10), r"`max_samples`.*10"),
        (dict(dimension=0), r"`dimension`.*got 0"),
    ],
)
def test_synthetic_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticClients(**kwargs)


# --------------------------------------------------------------------------------------- Digits


def test_digits_cover_every_example_once():
    for partitioner in (None, Shards(classes_per_client=2)):
        dm = DigitsClients(num_clients=20, partitioner=partitioner, seed=0)
        pop = whole(dm)
        assert len(pop) == 20
        assert sum(pop.size(i) for i in range(20)) == 1797
        rows = torch.cat([pop.client(i).x for i in range(20)])
        assert rows.shape == (1797, 64)
        assert rows.min() >= 0.0 and rows.max() <= 1.0 and rows.max() == 1.0
        labels = torch.cat([pop.client(i).y for i in range(20)])
        assert sorted(torch.unique(labels).tolist()) == list(range(10))


def test_digits_images_and_rounds():
    dm = DigitsClients(num_clients=10, images=True, clients_per_round=3, seed=0)
    pop = whole(dm)
    assert pop.client(0).x.shape[1:] == (1, 8, 8)
    batch = dm.round_batch(0)
    assert batch.support_x.shape == (3, 5, 1, 8, 8) and batch.query_x.shape == (3, 10, 1, 8, 8)
    assert batch.support_y.dtype == torch.long


def test_digits_shards_give_two_classes_per_client():
    dm = DigitsClients(num_clients=20, partitioner=Shards(classes_per_client=2), seed=3)
    pop = whole(dm)
    assert [torch.unique(pop.client(i).y).numel() for i in range(20)] == [2] * 20


def test_digits_rejects_a_non_partitioner():
    with pytest.raises(ValueError, match=r"`partitioner`.*str"):
        DigitsClients(partitioner="dirichlet")


# --------------------------------------------------------------------------------- TensorClients


def fixed_client(c: int, s: int, q: int):
    x = (c * 1000 + torch.arange(s + q)).float().unsqueeze(-1)
    y = -x
    return (x[:s], y[:s]), (x[s:], y[s:])


TRAIN_SPEC = [fixed_client(c, 6, 8) for c in range(5)]
VAL_SPEC = [fixed_client(5 + c, 3 + c, 4 + 2 * c) for c in range(3)]
TEST_SPEC = [fixed_client(8 + c, 2 + 2 * c, 9 - c) for c in range(3)]


def fixed_dm(train=TRAIN_SPEC, val=VAL_SPEC, test=TEST_SPEC) -> TensorClients:
    return TensorClients(train, val=val, test=test, clients_per_round=3, support_size=2, query_size=3,
                         eval_clients_per_batch=2, seed=0)


def test_tensor_clients_eval_batches_use_exactly_the_given_split():
    dm = fixed_dm()
    for split, spec, first in (("val", VAL_SPEC, 5), ("test", TEST_SPEC, 8)):
        loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
        batches = list(loader)
        assert len(batches) == 2
        ids = torch.cat([b.client_id for b in batches]).tolist()
        assert ids == [first, first + 1, first + 2]
        for batch in batches:
            for j, c in enumerate(batch.client_id.tolist()):
                (sx, sy), (qx, qy) = spec[c - first]
                torch.testing.assert_close(client_rows(batch.support_x, batch.support_mask, j), sx)
                torch.testing.assert_close(client_rows(batch.support_y, batch.support_mask, j), sy)
                torch.testing.assert_close(client_rows(batch.query_x, batch.query_mask, j), qx)
                torch.testing.assert_close(client_rows(batch.query_y, batch.query_mask, j), qy)


def test_tensor_clients_train_rounds_respect_the_fixed_split():
    dm = fixed_dm()
    for r in range(10):
        batch = dm.round_batch(r)
        for j, c in enumerate(batch.client_id.tolist()):
            assert 0 <= c < 5
            (sx, _), (qx, _) = TRAIN_SPEC[c]
            assert set(batch.support_x[j, :, 0].tolist()) <= set(sx[:, 0].tolist())
            assert set(batch.query_x[j, :, 0].tolist()) <= set(qx[:, 0].tolist())
            torch.testing.assert_close(batch.support_y[j], -batch.support_x[j])


def test_tensor_clients_from_files_give_the_same_batches(tmp_path):
    paths = {}
    for name, spec in (("train", TRAIN_SPEC), ("val", VAL_SPEC), ("test", TEST_SPEC)):
        paths[name] = str(tmp_path / f"{name}.pt")
        torch.save(spec, paths[name])
    a, b = fixed_dm(), fixed_dm(paths["train"], paths["val"], paths["test"])
    for r in range(3):
        ra, rb = a.round_batch(r), b.round_batch(r)
        torch.testing.assert_close(ra.client_id, rb.client_id)
        torch.testing.assert_close(ra.support_x, rb.support_x)
        torch.testing.assert_close(ra.query_y, rb.query_y)
    for la, lb in ((a.val_dataloader(), b.val_dataloader()), (a.test_dataloader(), b.test_dataloader())):
        for ba, bb in zip(la, lb, strict=True):
            torch.testing.assert_close(ba.support_x, bb.support_x)
            torch.testing.assert_close(ba.query_x, bb.query_x)
            torch.testing.assert_close(ba.query_mask, bb.query_mask)


def test_tensor_clients_from_a_file_of_pairs(tmp_path):
    clients = [(torch.randn(12, 3), torch.randint(0, 4, (12,))) for _ in range(10)]
    path = tmp_path / "clients.pt"
    torch.save(clients, path)
    a = TensorClients(clients, num_classes=4, clients_per_round=2, support_size=3, query_size=3, seed=2)
    b = TensorClients(str(path), num_classes=4, clients_per_round=2, support_size=3, query_size=3, seed=2)
    for r in range(3):
        torch.testing.assert_close(a.round_batch(r).support_x, b.round_batch(r).support_x)
    assert len(list(a.test_dataloader())) == len(list(b.test_dataloader())) == 1


def test_tensor_clients_reject_bad_specs(tmp_path):
    with pytest.raises(ValueError, match=r"`train` client 1: expected \(x, y\)"):
        TensorClients([(torch.randn(3, 1), torch.randn(3)), "oops"])
    with pytest.raises(ValueError, match=r"`train` to hold at least one client"):
        TensorClients([])
    path = tmp_path / "tensor.pt"
    torch.save(torch.randn(3, 3), path)
    with pytest.raises(ValueError, match=r"`val` to be a list of clients"):
        TensorClients([(torch.randn(3, 1), torch.randn(3))], val=str(path))


# -------------------------------------------------------------------------------- DatasetClients


class TinyDataset(Dataset):
    """``n`` items ``(tensor([id]), id % classes)``; ``targets`` only when asked for."""

    def __init__(self, n: int = 120, classes: int = 4, with_targets: bool = True, bad_label_at: int | None = None):
        self.x = torch.arange(n).float().unsqueeze(-1)
        self.y = torch.arange(n) % classes
        if bad_label_at is not None:
            self.y[bad_label_at] = classes
        if with_targets:
            self.targets = self.y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("with_targets", [True, False])
@pytest.mark.parametrize("partitioner", [None, Shards(classes_per_client=2)])
def test_dataset_clients_match_the_tensor_partition(with_targets, partitioner):
    dataset = TinyDataset(with_targets=with_targets)
    dm = DatasetClients(dataset, num_clients=6, partitioner=partitioner, clients_per_round=2, support_size=3,
                        query_size=3, seed=4)
    assert hasattr(dataset, "targets") == with_targets
    pop = whole(dm)
    parts = (partitioner or Dirichlet(alpha=0.5))(dataset.y, 6, 4)
    assert len(pop) == 6
    for i, part in enumerate(parts):
        data = pop.client(i)
        torch.testing.assert_close(data.x, dataset.x[part])
        torch.testing.assert_close(data.y, dataset.y[part])
    batch = dm.round_batch(0)
    assert batch.support_x.shape == (2, 3, 1) and batch.support_y.dtype == torch.long
    torch.testing.assert_close(batch.support_y, batch.support_x[..., 0].long() % 4)


def test_dataset_clients_infer_and_check_num_classes():
    dm = DatasetClients(TinyDataset(classes=5), num_clients=10, clients_per_round=2, support_size=2, query_size=2)
    assert dm.num_classes is None
    dm.setup()
    assert dm.num_classes == 5
    dm = DatasetClients(TinyDataset(classes=5), num_clients=10, num_classes=7, clients_per_round=2, support_size=2,
                        query_size=2)
    dm.setup()
    assert dm.num_classes == 7


@pytest.mark.parametrize("with_targets", [True, False])
def test_dataset_label_outside_num_classes(with_targets):
    dm = DatasetClients(TinyDataset(classes=3, with_targets=with_targets, bad_label_at=10), num_clients=4, num_classes=3,
                        clients_per_round=2, support_size=2, query_size=2)
    with pytest.raises(ValueError, match=r"\[0, 3\).*`num_classes`.*got \[3\]"):
        dm.setup()


def test_dataset_clients_bad_arguments():
    with pytest.raises(ValueError, match=r"`dataset`.*int"):
        DatasetClients(5)
    with pytest.raises(ValueError, match=r"`num_clients`.*got 0"):
        DatasetClients(TinyDataset(), num_clients=0)


# ----------------------------------------------------------------------------------------- LEAF


def leaf_blob(users: dict[str, dict[str, list]]) -> dict:
    return {"users": list(users), "num_samples": [len(d["y"]) for d in users.values()], "user_data": users}


def numeric_user(u: int, n: int, start: int = 0) -> dict[str, list]:
    xs = [[u * 100.0 + k, u * 100.0 + k + 0.5, -float(k)] for k in range(start, start + n)]
    ys = [(u + k) % 3 for k in range(start, start + n)]
    return {"x": xs, "y": ys}


def write(path: Path, blob: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blob))


LEAF_USERS = {"f_0001": 8, "f_0002": 10, "f_0003": 7, "f_0004": 9}


def leaf_flat(root: Path) -> Path:
    users = {name: numeric_user(u, n) for u, (name, n) in enumerate(LEAF_USERS.items())}
    names = list(users)
    write(root / "all_data_0.json", leaf_blob({k: users[k] for k in names[:2]}))
    write(root / "all_data_1.json", leaf_blob({k: users[k] for k in names[2:]}))
    return root


def leaf_kwargs(**kwargs):
    args = dict(client_split=(0.5, 0.25, 0.25), clients_per_round=2, support_size=2, query_size=3, seed=0)
    args.update(kwargs)
    return args


def test_leaf_flat_users_become_clients(tmp_path):
    dm = LEAFClients(str(leaf_flat(tmp_path / "flat")), **leaf_kwargs())
    pop = whole(dm)
    assert [pop.name(i) for i in range(len(pop))] == sorted(LEAF_USERS)
    for i, (name, n) in enumerate(sorted(LEAF_USERS.items())):
        u = list(LEAF_USERS).index(name)
        data = pop.client(i)
        expected = numeric_user(u, n)
        assert data.support_end is None
        torch.testing.assert_close(data.x, torch.tensor(expected["x"], dtype=torch.float32))
        torch.testing.assert_close(data.y, torch.tensor(expected["y"], dtype=torch.long))
    dm.setup()
    assert dm.num_classes == 3
    batch = dm.round_batch(0)
    assert batch.support_x.shape == (2, 2, 3) and batch.query_y.shape == (2, 3)
    assert len(list(dm.val_dataloader())) == 1 and len(list(dm.test_dataloader())) == 1


def test_leaf_users_split_across_files_are_merged(tmp_path):
    root = tmp_path / "merged"
    write(root / "a.json", leaf_blob({"alice": numeric_user(0, 4)}))
    write(root / "b.json", leaf_blob({"alice": numeric_user(0, 3, start=4), "bob": numeric_user(1, 6)}))
    pop = whole(LEAFClients(str(root), **leaf_kwargs()))
    assert [pop.name(i) for i in range(len(pop))] == ["alice", "bob"]
    torch.testing.assert_close(pop.client(0).x, torch.tensor(numeric_user(0, 7)["x"]))


def test_leaf_input_shape(tmp_path):
    root = tmp_path / "shaped"
    write(root / "a.json", leaf_blob({"u": {"x": [[float(i) for i in range(6)]] * 5, "y": [0, 1, 0, 1, 1]}}))
    pop = whole(LEAFClients(str(root), input_shape=[1, 2, 3], **leaf_kwargs()))
    assert pop.client(0).x.shape == (5, 1, 2, 3)


def leaf_split(root: Path, extra_train_user: bool = False) -> Path:
    train, test = {}, {}
    for u, (name, n) in enumerate(LEAF_USERS.items()):
        train[name] = numeric_user(u, n)
        test[name] = numeric_user(u, 2 + u, start=n)
    if extra_train_user:
        train["f_9999"] = numeric_user(9, 5)
    write(root / "train" / "train_0.json", leaf_blob(train))
    write(root / "test" / "test_0.json", leaf_blob(test))
    return root


def test_leaf_natural_split_is_support_and_query(tmp_path):
    dm = LEAFClients(str(leaf_split(tmp_path / "split")), **leaf_kwargs(support_size=3, query_size=2))
    pop = whole(dm)
    names = [pop.name(i) for i in range(len(pop))]
    assert names == sorted(LEAF_USERS)
    for i, name in enumerate(names):
        assert pop.client(i).support_end == LEAF_USERS[name]
    seen = []
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        for batch in loader:
            for j, c in enumerate(batch.client_id.tolist()):
                name = names[c]
                u, n = list(LEAF_USERS).index(name), LEAF_USERS[name]
                seen.append(name)
                train, test = numeric_user(u, n), numeric_user(u, 2 + u, start=n)
                torch.testing.assert_close(client_rows(batch.support_x, batch.support_mask, j), torch.tensor(train["x"]))
                torch.testing.assert_close(client_rows(batch.support_y, batch.support_mask, j), torch.tensor(train["y"]))
                torch.testing.assert_close(client_rows(batch.query_x, batch.query_mask, j), torch.tensor(test["x"]))
                torch.testing.assert_close(client_rows(batch.query_y, batch.query_mask, j), torch.tensor(test["y"]))
    assert len(seen) == 2
    # training rounds draw support from the train file and query from the test file
    for r in range(5):
        batch = dm.round_batch(r)
        for j, c in enumerate(batch.client_id.tolist()):
            n = LEAF_USERS[names[c]]
            u = list(LEAF_USERS).index(names[c])
            assert (batch.support_x[j, :, 0] - u * 100 < n).all()
            assert (batch.query_x[j, :, 0] - u * 100 >= n).all()


def test_leaf_drops_users_missing_from_one_side(tmp_path):
    dm = LEAFClients(str(leaf_split(tmp_path / "extra", extra_train_user=True)), **leaf_kwargs())
    with pytest.warns(UserWarning, match=r"1 users appear in only one"):
        pop = whole(dm)
    assert "f_9999" not in [pop.name(i) for i in range(len(pop))] and len(pop) == 4


def text_user(seed: int, n: int) -> dict[str, list]:
    g = torch.Generator().manual_seed(seed)
    letters = SHAKESPEARE_LETTERS
    idx = torch.randint(0, len(letters), (n, 6), generator=g).tolist()
    return {"x": ["".join(letters[i] for i in row[:5]) for row in idx], "y": [letters[row[5]] for row in idx]}


def test_leaf_text_is_encoded_through_the_vocabulary(tmp_path):
    root = tmp_path / "shakespeare"
    users = {"THE_TRAGEDY_HAMLET": text_user(0, 12), "KING_LEAR_EDGAR": text_user(1, 9), "OTHELLO_IAGO": text_user(2, 10),
             "MACBETH_BANQUO": text_user(3, 11)}
    write(root / "data.json", leaf_blob(users))
    dm = LEAFClients(str(root), **leaf_kwargs())
    pop = whole(dm)
    assert dm.num_classes == len(SHAKESPEARE_LETTERS) == 80
    for i in range(len(pop)):
        raw = users[pop.name(i)]
        data = pop.client(i)
        assert data.x.dtype == torch.long and data.x.shape == (len(raw["x"]), 5)
        expected_x = torch.tensor([[SHAKESPEARE_LETTERS.index(ch) for ch in s] for s in raw["x"]])
        expected_y = torch.tensor([SHAKESPEARE_LETTERS.index(ch) for ch in raw["y"]])
        torch.testing.assert_close(data.x, expected_x)
        torch.testing.assert_close(data.y, expected_y)
        decoded = ["".join(SHAKESPEARE_LETTERS[k] for k in row) for row in data.x.tolist()]
        assert decoded == raw["x"]
    batch = dm.round_batch(0)
    assert batch.support_x.dtype == torch.long and batch.support_x.shape == (2, 2, 5)


def test_leaf_custom_vocabulary(tmp_path):
    root = tmp_path / "abc"
    write(root / "d.json", leaf_blob({"u": {"x": ["abc", "cab", "bca"], "y": ["a", "b", "c"]}}))
    pop = whole(LEAFClients(str(root), vocabulary="cba", **leaf_kwargs()))
    torch.testing.assert_close(pop.client(0).x, torch.tensor([[2, 1, 0], [0, 2, 1], [1, 0, 2]]))
    torch.testing.assert_close(pop.client(0).y, torch.tensor([2, 1, 0]))


@pytest.mark.parametrize("field", ["x", "y"])
def test_leaf_unknown_character_names_the_user(tmp_path, field):
    root = tmp_path / f"bad_{field}"
    users = {"good": text_user(0, 6), "bad_user": text_user(1, 6)}
    if field == "x":
        users["bad_user"]["x"][3] = "ab#cd"
    else:
        users["bad_user"]["y"][2] = "#"
    write(root / "data.json", leaf_blob(users))
    dm = LEAFClients(str(root), **leaf_kwargs())
    with pytest.raises(ValueError, match=r"User 'bad_user'.*\['#'\].*`vocabulary`"):
        dm.setup()


def test_leaf_folder_without_json(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no data here")
    dm = LEAFClients(str(empty), **leaf_kwargs())
    with pytest.raises(ValueError, match=r"LEAF \*\.json files.*empty.*none"):
        dm.setup()
    with pytest.raises(ValueError, match=r"`root`.*missing"):
        LEAFClients(str(tmp_path / "missing"))


def test_leaf_json_that_is_not_leaf(tmp_path):
    root = tmp_path / "notleaf"
    write(root / "x.json", {"hello": 1})
    with pytest.raises(ValueError, match=r"x\.json.*not a LEAF file.*'user_data'"):
        LEAFClients(str(root), **leaf_kwargs()).setup()


# ------------------------------------------------------------------------------------- Episodic


class ClassDataset(Dataset):
    """``per_class[c]`` items of class ``c``; item ``x`` is a unique id (original class = id // 100)."""

    def __init__(self, per_class: list[int]):
        self.x = torch.cat([c * 100 + torch.arange(n) for c, n in enumerate(per_class)]).float().unsqueeze(-1)
        self.targets = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], int(self.targets[i])


WAYS, SHOTS, QUERIES = 3, 2, 3


def episodic(seed: int = 0, dataset=None, **kwargs) -> EpisodicClients:
    args = dict(ways=WAYS, shots=SHOTS, queries=QUERIES, num_train_clients=1000, num_eval_clients=4,
                clients_per_round=4, eval_clients_per_batch=3, seed=seed)
    args.update(kwargs)
    return EpisodicClients(dataset if dataset is not None else ClassDataset([10] * 20), **args)


def check_episode(sx, sy, qx, qy) -> set[int]:
    """Labels 0..ways-1 with shots/queries each, one original class per label, disjoint examples."""
    assert Counter(sy.tolist()) == {w: SHOTS for w in range(WAYS)}
    assert Counter(qy.tolist()) == {w: QUERIES for w in range(WAYS)}
    support_ids, query_ids = sx[:, 0].long().tolist(), qx[:, 0].long().tolist()
    assert not set(support_ids) & set(query_ids)
    assert len(set(support_ids)) == len(support_ids) and len(set(query_ids)) == len(query_ids)
    classes = {}
    for ids, labels in ((support_ids, sy.tolist()), (query_ids, qy.tolist())):
        for i, w in zip(ids, labels):
            classes.setdefault(w, set()).add(i // 100)
    assert all(len(v) == 1 for v in classes.values()), classes  # every label is one original class
    originals = {next(iter(v)) for v in classes.values()}
    assert len(originals) == WAYS
    return originals


def test_episodes_relabel_classes_and_split_class_sets():
    dm = episodic()
    train_classes, eval_classes = set(), {"val": set(), "test": set()}
    for r in range(20):
        batch = dm.round_batch(r)
        assert batch.support_x.shape == (4, WAYS * SHOTS, 1) and batch.query_x.shape == (4, WAYS * QUERIES, 1)
        for j in range(4):
            train_classes |= check_episode(batch.support_x[j], batch.support_y[j], batch.query_x[j], batch.query_y[j])
    for split in ("val", "test"):
        loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
        batches = list(loader)
        assert sum(b.num_clients for b in batches) == 4
        for batch in batches:
            for j in range(batch.num_clients):
                eval_classes[split] |= check_episode(batch.support_x[j], batch.support_y[j], batch.query_x[j],
                                                     batch.query_y[j])
    # 20 classes with class_split (0.64, 0.16, 0.2): 13 / 3 / 4
    assert len(train_classes) > 3 and len(eval_classes["val"]) == 3 and len(eval_classes["test"]) >= 3
    assert not train_classes & eval_classes["val"]
    assert not train_classes & eval_classes["test"]
    assert not eval_classes["val"] & eval_classes["test"]


def test_episodes_are_seeded():
    a, b, c = episodic(seed=1), episodic(seed=1), episodic(seed=2)
    for k in (0, 5, 999):
        ea, eb = a.population("train").client(k), b.population("train").client(k)
        torch.testing.assert_close(ea.x, eb.x)
        torch.testing.assert_close(ea.y, eb.y)
        assert ea.support_end == WAYS * SHOTS
    assert not torch.equal(a.population("train").client(0).x, a.population("train").client(1).x)
    assert not torch.equal(a.population("train").client(0).x, c.population("train").client(0).x)
    va, vb = list(a.val_dataloader()), list(b.val_dataloader())
    for x, y in zip(va, vb, strict=True):
        torch.testing.assert_close(x.support_x, y.support_x)
        torch.testing.assert_close(x.query_y, y.query_y)


@pytest.mark.parametrize("name, value", [("support_size", 5), ("query_size", 4), ("protocol", "local")])
def test_episodic_rejects_sizes_it_sets_itself(name, value):
    with pytest.raises(ValueError, match=rf"`{name}`.*{value!r}"):
        episodic(**{name: value})


def test_episodic_class_with_too_few_examples():
    counts = [10] * 20
    counts[7] = 3
    dm = episodic(dataset=ClassDataset(counts))
    with pytest.raises(ValueError, match=r"Class 7 has 3 examples.*`shots` \+ `queries` = 5"):
        dm.setup()


def test_episodic_too_few_classes_for_ways():
    dm = episodic(dataset=ClassDataset([10] * 6), class_split=(0.5, 0.25, 0.25))
    with pytest.raises(ValueError, match=r"`class_split`.*fewer than `ways`=3"):
        dm.setup()


@pytest.mark.parametrize("name", ["ways", "shots", "queries", "num_eval_clients"])
def test_episodic_bad_counts(name):
    with pytest.raises(ValueError, match=rf"`{name}`.*got 0"):
        episodic(**{name: 0})


# ------------------------------------------------------------------------------------ LightningCLI


MODEL_ARGS = ["--model=lightning_metafed.MAML", "--model.net=torch.nn.Linear", "--model.net.in_features=1",
              "--model.net.out_features=1", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
              "--seed_everything=0"]


def cli_datamodule(*data_args: str) -> FederatedDataModule:
    cli = LightningCLI(lm.MetaFedModule, FederatedDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=[*data_args, *MODEL_ARGS])
    assert isinstance(cli.model, lm.MAML)
    return cli.datamodule


def test_cli_sinusoid_forwards_base_arguments():
    dm = cli_datamodule("--data=lightning_metafed.data.SinusoidClients", "--data.clients_per_round=3",
                        "--data.num_clients=50", "--data.support_size=4", "--data.query_size=0.5", "--data.seed=11",
                        "--data.noise_std=0.1")
    assert isinstance(dm, SinusoidClients)
    assert (dm.clients_per_round, dm.support_size, dm.query_size, dm.seed) == (3, 4, 0.5, 11)
    assert dm.num_clients == 50 and dm.noise_std == 0.1
    batch = dm.round_batch(0)
    assert batch.support_x.shape == (3, 4, 1) and batch.query_x.shape == (3, 50, 1)
    direct = SinusoidClients(num_clients=50, clients_per_round=3, support_size=4, query_size=0.5, seed=11, noise_std=0.1)
    torch.testing.assert_close(batch.support_x, direct.round_batch(0).support_x)


def test_cli_synthetic_forwards_base_arguments():
    dm = cli_datamodule("--data=lightning_metafed.data.SyntheticClients", "--data.num_clients=20",
                        "--data.clients_per_round=5", "--data.support_size=6", "--data.seed=3", "--data.protocol=local",
                        "--data.alpha=1.0")
    assert isinstance(dm, SyntheticClients)
    assert (dm.clients_per_round, dm.support_size, dm.seed, dm.protocol, dm.alpha) == (5, 6, 3, "local", 1.0)
    assert dm.round_batch(0).support_x.shape == (5, 6, 60)


def test_cli_digits_with_a_partitioner():
    dm = cli_datamodule("--data=lightning_metafed.data.DigitsClients", "--data.num_clients=20",
                        "--data.partitioner=lightning_metafed.data.partition.Shards",
                        "--data.partitioner.classes_per_client=2", "--data.clients_per_round=4",
                        "--data.support_size=3", "--data.seed=9")
    assert isinstance(dm, DigitsClients) and isinstance(dm.partitioner, Shards)
    assert dm.partitioner.classes_per_client == 2
    assert (dm.clients_per_round, dm.support_size, dm.query_size, dm.seed) == (4, 3, 10, 9)
    pop = whole(dm)
    assert [torch.unique(pop.client(i).y).numel() for i in range(20)] == [2] * 20
    assert dm.round_batch(0).support_x.shape == (4, 3, 64)


def test_cli_tensor_clients_from_a_file(tmp_path):
    path = tmp_path / "train.pt"
    torch.save(TRAIN_SPEC, path)
    val, test = tmp_path / "val.pt", tmp_path / "test.pt"
    torch.save(VAL_SPEC, val)
    torch.save(TEST_SPEC, test)
    dm = cli_datamodule("--data=lightning_metafed.data.TensorClients", f"--data.train={path}", f"--data.val={val}",
                        f"--data.test={test}", "--data.clients_per_round=2", "--data.support_size=2",
                        "--data.query_size=3", "--data.seed=0")
    assert isinstance(dm, TensorClients) and dm.clients_per_round == 2
    direct = TensorClients(TRAIN_SPEC, val=VAL_SPEC, test=TEST_SPEC, clients_per_round=2, support_size=2, query_size=3,
                           seed=0)
    torch.testing.assert_close(dm.round_batch(1).support_x, direct.round_batch(1).support_x)
    assert [b.num_clients for b in dm.test_dataloader()] == [3]


def test_cli_leaf(tmp_path):
    root = leaf_split(tmp_path / "leaf")
    dm = cli_datamodule("--data=lightning_metafed.data.LEAFClients", f"--data.root={root}",
                        "--data.client_split=[0.5, 0.25, 0.25]", "--data.clients_per_round=2", "--data.support_size=2",
                        "--data.query_size=1", "--data.seed=1")
    assert isinstance(dm, LEAFClients)
    assert (dm.clients_per_round, dm.support_size, dm.seed, dm.client_split) == (2, 2, 1, (0.5, 0.25, 0.25))
    assert dm.round_batch(0).support_x.shape == (2, 2, 3)


def test_cli_dataset_clients():
    dataset_class = f"{TinyDataset.__module__}.TinyDataset"
    dm = cli_datamodule("--data=lightning_metafed.data.DatasetClients", f"--data.dataset={dataset_class}",
                        "--data.dataset.n=60", "--data.num_clients=6", "--data.clients_per_round=2",
                        "--data.support_size=2", "--data.query_size=2", "--data.seed=2",
                        "--data.partitioner=lightning_metafed.data.partition.IID")
    assert isinstance(dm, DatasetClients) and len(dm.dataset) == 60 and dm.clients_per_round == 2 and dm.seed == 2
    assert dm.round_batch(0).support_x.shape == (2, 2, 1)


def test_cli_episodic():
    dataset_class = f"{TinyDataset.__module__}.TinyDataset"
    dm = cli_datamodule("--data=lightning_metafed.data.EpisodicClients", f"--data.dataset={dataset_class}",
                        "--data.dataset.n=400", "--data.dataset.classes=20", "--data.ways=3", "--data.shots=1",
                        "--data.queries=2", "--data.clients_per_round=2", "--data.seed=4")
    assert isinstance(dm, EpisodicClients) and dm.seed == 4 and dm.support_size == 3 and dm.query_size == 6
    assert dm.round_batch(0).support_x.shape == (2, 3, 1)
