"""The data module's batched round and evaluation batches equal an independent per-client reference.

For every built-in source, under both protocols, ``round_batch(r)`` and ``eval_batch(split, ...)``
must equal, field by field and exactly, what :mod:`reference_sampling` computes one client at a time
with scalar hashing (values, dtypes, shapes, padding, and which masks are present).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reference_raw import (
    dataset_labels,
    dataset_raw,
    episodic_splits,
    leaf_raw,
    sinusoid_raw,
    tensor_raw,
)
from reference_sampling import (
    RefBatch,
    Reference,
    differences,
    listed,
    local_splits,
    unseen_splits,
)
from torch.utils.data import Dataset, TensorDataset

from lightning_metafed.data import (
    DatasetClients,
    DigitsClients,
    EpisodicClients,
    FederatedDataModule,
    LEAFClients,
    SinusoidClients,
    SyntheticClients,
    TaskBatch,
    TensorClients,
)
from lightning_metafed.data.partition import Dirichlet

ROUNDS = (0, 1, 7)


# --------------------------------------------------------------------------------------- helpers


def reference_for(dm: FederatedDataModule, clients) -> Reference:
    """The reference of ``dm`` whose whole population is ``clients`` (split by ``dm.protocol``)."""
    if dm.protocol == "local":
        splits = local_splits(clients, dm.seed, dm.local_split)
    else:
        splits = unseen_splits(clients, dm.seed, dm.client_split)
    return Reference(splits, dm.seed, dm.clients_per_round, dm.support_size, dm.query_size, dm.eval_support_size,
                     size_sampling=dm.client_sampling == "size")


def make_specs(entries, seed: int, x_shape=(1,), classes: int | None = None) -> list:
    """TensorClients specs: an int ``n`` is a client of ``n`` examples; ``(e, q)`` a fixed split."""
    g = torch.Generator().manual_seed(seed)

    def xy(n: int):
        x = torch.randn(n, *x_shape, generator=g)
        y = torch.randint(classes, (n,), generator=g) if classes else torch.randn(n, 1, generator=g)
        return x, y

    return [xy(e) if isinstance(e, int) else (xy(e[0]), xy(e[1])) for e in entries]


def tensor_case(entries, protocol: str, seed: int, x_shape=(1,), classes=None, **kwargs):
    specs = make_specs(entries, seed, x_shape, classes)
    args = dict(clients_per_round=4, seed=seed, protocol=protocol, client_split=(0.6, 0.2, 0.2),
                local_split=(0.6, 0.2, 0.2))
    args.update(kwargs)
    dm = TensorClients(specs, num_classes=classes, **args)
    return dm, reference_for(dm, listed([tensor_raw(s) for s in specs]))


VARIED = [14, 20, 16, 25, 30, 18, 15, 22, 27, 17]
FIXED = [(6, 5), (9, 8), (7, 12), (10, 6), (8, 9), (11, 7), (6, 10), (12, 8), (7, 7), (9, 11)]
MIXED = [16, (7, 9), 22, (10, 6), 14, 28, (6, 11), 19, (12, 10), 25]
SMALL = [3, 5, 8, 4, (2, 3), 6, (3, 1), 9, 5, (5, 4)]


class PlainDataset(Dataset):
    """A map-style dataset without ``targets`` (the per-item path): items ``(x[i], int(y[i]))``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def labelled_tensors(n: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(classes, (n,), generator=g)


def dataset_case(kind: str, protocol: str, seed: int, **kwargs):
    x, y = labelled_tensors(160, 4, 3, seed)
    dataset = TensorDataset(x, y) if kind == "tensor" else PlainDataset(x, y)
    partitioner = Dirichlet(alpha=1.0, min_size=10)
    args = dict(clients_per_round=3, seed=seed, protocol=protocol, client_split=(0.5, 0.25, 0.25),
                local_split=(0.6, 0.2, 0.2), support_size=2, query_size=3)
    args.update(kwargs)
    dm = DatasetClients(dataset, num_clients=8, partitioner=partitioner, num_classes=4, **args)
    parts = partitioner(torch.tensor(dataset_labels(dataset)), 8, seed)
    clients = [(i, (lambda p=p: dataset_raw(dataset, p.tolist()))) for i, p in enumerate(parts)]
    return dm, reference_for(dm, clients)


def digits_case(protocol: str, seed: int, images: bool):
    pytest.importorskip("sklearn")
    from lightning_metafed.data.digits import load_digits_tensors

    partitioner = Dirichlet(alpha=0.5, min_size=15)
    dm = DigitsClients(num_clients=10, partitioner=partitioner, images=images, clients_per_round=4, support_size=5,
                       query_size=0.3, protocol=protocol, client_split=(0.6, 0.2, 0.2), local_split=(0.6, 0.2, 0.2),
                       seed=seed)
    x, y = load_digits_tensors(images)
    parts = partitioner(y, 10, seed)
    clients = [(i, (lambda p=p: (x[p], y[p], None))) for i, p in enumerate(parts)]
    return dm, reference_for(dm, clients)


def sinusoid_case(protocol: str, seed: int, noise_std: float, **kwargs):
    spec = dict(num_clients=30, examples_per_client=20, amplitude=(0.5, 2.5), phase=(0.25, 2.0), x_range=(-3.0, 4.0),
                noise_std=noise_std)
    args = dict(clients_per_round=5, support_size=4, query_size=6, protocol=protocol, client_split=(0.6, 0.2, 0.2),
                local_split=(0.6, 0.2, 0.2), seed=seed)
    args.update(kwargs)
    return (dm := SinusoidClients(**spec, **args)), sinusoid_case_reference(dm)


def sinusoid_case_reference(dm: SinusoidClients) -> Reference:
    clients = [
        (g, (lambda g=g: sinusoid_raw(dm.seed, g, dm.examples_per_client, dm.amplitude, dm.phase, dm.x_range,
                                      dm.noise_std)))
        for g in range(dm.num_clients)
    ]
    return reference_for(dm, clients)


def synthetic_case(protocol: str, seed: int):
    dm = SyntheticClients(num_clients=12, dimension=5, num_classes=3, size_mean=2.5, size_sigma=0.6, min_samples=14,
                          max_samples=40, clients_per_round=4, support_size=3, query_size=4, protocol=protocol,
                          client_split=(0.5, 0.25, 0.25), local_split=(0.6, 0.2, 0.2), seed=seed)
    # The stored data of a client is SyntheticClients' own generator (not what is tested here).
    clients = [(k, (lambda k=k: tuple(dm.make_client(k)))) for k in range(dm.num_clients)]
    return dm, reference_for(dm, clients)


LEAF_SIZES = [8, 13, 9, 16, 10, 12, 7, 15]


def leaf_user(u: int, n: int, start: int = 0) -> dict:
    return {"x": [[u * 100.0 + k, u * 100.0 + k + 0.5, -float(k)] for k in range(start, start + n)],
            "y": [(u + k) % 3 for k in range(start, start + n)]}


def write_leaf(root: Path, split: bool) -> Path:
    def blob(users: dict) -> str:
        return json.dumps({"users": list(users), "num_samples": [len(d["y"]) for d in users.values()], "user_data": users})

    names = [f"user_{u:02d}" for u in range(len(LEAF_SIZES))][::-1]  # written out of sorted order
    if split:
        train = {name: leaf_user(u, n) for u, (name, n) in enumerate(zip(names, LEAF_SIZES))}
        test = {name: leaf_user(u, 3 + u % 4, start=n) for u, (name, n) in enumerate(zip(names, LEAF_SIZES))}
        for folder, users in (("train", train), ("test", test)):
            (root / folder).mkdir(parents=True)
            (root / folder / f"{folder}_0.json").write_text(blob(users))
    else:
        users = {name: leaf_user(u, n) for u, (name, n) in enumerate(zip(names, LEAF_SIZES))}
        root.mkdir(parents=True)
        (root / "a.json").write_text(blob(dict(list(users.items())[:3])))
        (root / "b.json").write_text(blob(dict(list(users.items())[3:])))
    return root


def leaf_case(tmp: Path, split: bool, protocol: str, seed: int):
    root = write_leaf(tmp / f"leaf_{'split' if split else 'flat'}_{protocol}_{seed}", split)
    size = 2 if protocol == "local" else 3
    dm = LEAFClients(str(root), clients_per_round=3, support_size=size, query_size=2, protocol=protocol,
                     client_split=(0.5, 0.25, 0.25), local_split=(0.7, 0.1, 0.2), eval_support_size=0.4, seed=seed)
    return dm, reference_for(dm, listed(leaf_raw(root)))


def class_tensors(classes: int = 20, per_class: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Item ``x = [id, -id]`` (original class = id // 100), ``per_class`` items of each class, interleaved."""
    ids = torch.tensor([c * 100 + k for k in range(per_class) for c in range(classes)], dtype=torch.float32)
    return torch.stack([ids, -ids], dim=1), (ids // 100).long()


def episodic_case(kind: str, seed: int):
    x, y = class_tensors()
    dataset = TensorDataset(x, y) if kind == "tensor" else PlainDataset(x, y)
    args = dict(ways=3, shots=2, queries=3, class_split=(0.6, 0.2, 0.2), num_train_clients=50, num_eval_clients=5)
    dm = EpisodicClients(dataset, clients_per_round=4, eval_clients_per_batch=2, seed=seed, **args)
    splits = episodic_splits(dataset, seed, args["ways"], args["shots"], args["queries"], args["class_split"],
                             args["num_train_clients"], args["num_eval_clients"])
    ref = Reference(splits, seed, 4, args["ways"] * args["shots"], args["ways"] * args["queries"])
    return dm, ref


def explicit_case(seed: int):
    """TensorClients with explicit val/test client lists (global ids continue across the lists)."""
    train, val, test = (make_specs(e, seed + k) for k, e in enumerate((VARIED[:6], MIXED[:4], [15, (5, 9), 12])))
    dm = TensorClients(train, val=val, test=test, clients_per_round=3, support_size=3, query_size=4,
                       eval_support_size=0.25, seed=seed)
    splits, first = {}, 0
    for split, specs in (("train", train), ("val", val), ("test", test)):
        splits[split] = listed([tensor_raw(s) for s in specs], first)
        first += len(specs)
    return dm, Reference(splits, seed, 3, 3, 4, 0.25)


CASES: dict[str, Callable[[Path], tuple[FederatedDataModule, Reference]]] = {
    # TensorClients: clients of different sizes (masks), fixed splits, both kinds mixed, fractions, replacement
    "tensor-varied-unseen": lambda t: tensor_case(VARIED, "unseen", 1, support_size=3, query_size=4, eval_support_size=0.3),
    "tensor-varied-local": lambda t: tensor_case(VARIED, "local", 2, support_size=3, query_size=4),
    "tensor-fixed-unseen": lambda t: tensor_case(FIXED, "unseen", 3, support_size=4, query_size=5),
    "tensor-fixed-local": lambda t: tensor_case(FIXED, "local", 4, support_size=2, query_size=2),
    "tensor-mixed-fractions-unseen": lambda t: tensor_case(MIXED, "unseen", 5, support_size=0.3, query_size=0.45,
                                                           eval_support_size=0.35),
    "tensor-mixed-fractions-local": lambda t: tensor_case(MIXED, "local", 6, support_size=0.3, query_size=0.5),
    "tensor-replacement-unseen": lambda t: tensor_case(SMALL, "unseen", 7, support_size=4, query_size=5,
                                                       eval_support_size=0.5, replacement=True),
    "tensor-replacement-local": lambda t: tensor_case([4, 6, 9, 5, (4, 3), 7, 11, (6, 2)], "local", 8, support_size=3,
                                                      query_size=4, replacement=True),
    "tensor-size-sampling-unseen": lambda t: tensor_case(MIXED, "unseen", 9, support_size=3, query_size=4,
                                                         client_sampling="size"),
    "tensor-size-sampling-local": lambda t: tensor_case(VARIED, "local", 10, support_size=3, query_size=4,
                                                        client_sampling="size"),
    "tensor-classes-images-unseen": lambda t: tensor_case(MIXED, "unseen", 11, x_shape=(2, 3), classes=5,
                                                          support_size=3, query_size=4, eval_support_size=4),
    "tensor-classes-images-local": lambda t: tensor_case(MIXED, "local", 12, x_shape=(2, 3), classes=5,
                                                         support_size=2, query_size=2),
    "tensor-explicit-val-test": lambda t: explicit_case(13),
    # SinusoidClients: every client one size (no masks)
    "sinusoid-noise-unseen": lambda t: sinusoid_case("unseen", 14, 0.3),
    "sinusoid-unseen-fractions": lambda t: sinusoid_case("unseen", 15, 0.0, support_size=0.25, query_size=0.4,
                                                         eval_support_size=0.3),
    "sinusoid-noise-local": lambda t: sinusoid_case("local", 16, 0.5),
    "sinusoid-local-replacement": lambda t: sinusoid_case("local", 17, 0.0, support_size=7, query_size=8,
                                                          replacement=True),
    # the other sources
    "synthetic-unseen": lambda t: synthetic_case("unseen", 18),
    "synthetic-local": lambda t: synthetic_case("local", 19),
    "digits-unseen": lambda t: digits_case("unseen", 20, images=False),
    "digits-images-local": lambda t: digits_case("local", 21, images=True),
    "leaf-flat-unseen": lambda t: leaf_case(t, False, "unseen", 22),
    "leaf-flat-local": lambda t: leaf_case(t, False, "local", 23),
    "leaf-split-unseen": lambda t: leaf_case(t, True, "unseen", 24),
    "leaf-split-local": lambda t: leaf_case(t, True, "local", 25),
    "dataset-tensor-unseen": lambda t: dataset_case("tensor", "unseen", 26),
    "dataset-tensor-local": lambda t: dataset_case("tensor", "local", 27),
    "dataset-plain-unseen": lambda t: dataset_case("plain", "unseen", 28, eval_support_size=0.3),
    "dataset-plain-local": lambda t: dataset_case("plain", "local", 29),
    "episodic-tensor": lambda t: episodic_case("tensor", 30),
    "episodic-plain": lambda t: episodic_case("plain", 31),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> tuple[str, FederatedDataModule, Reference]:
    dm, ref = CASES[request.param](tmp_path_factory.mktemp("sources"))
    dm.setup()  # before any `_sample_clients` call: size-weighted sampling needs the setup's weights
    return request.param, dm, ref


def assert_same(batch, ref: RefBatch, what: str) -> None:
    assert isinstance(batch, TaskBatch), f"{what}: expected a TaskBatch, got {type(batch).__name__}"
    assert batch.num_steps is None, f"{what}: num_steps should be None, got {batch.num_steps!r}"
    problems = differences(batch, ref)
    assert not problems, f"{what} (reference client ids {ref.client_id.tolist()}):\n  " + "\n  ".join(problems)


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("r", ROUNDS)
def test_round_batch_equals_the_reference(case, r):
    """The examples drawn from the round's clients (``dm._sample_clients(r)``; the sampling rule
    itself is checked by ``test_round_samples_the_clients_of_the_rule``)."""
    name, dm, ref = case
    positions = torch.as_tensor(dm._sample_clients(r)).tolist()
    assert_same(dm.round_batch(r), ref.round_batch(r, positions), f"{name}: round_batch({r}) of positions {positions}")


@pytest.mark.parametrize("r", ROUNDS)
def test_round_samples_the_clients_of_the_rule(case, r):
    name, dm, ref = case
    positions = torch.as_tensor(dm._sample_clients(r)).tolist()
    expected = ref.sampled(r)
    assert positions == expected, f"{name}: round {r} samples train positions {positions}, the rule gives {expected}"
    ids = dm.round_batch(r).client_id
    assert ids.tolist() == [ref.splits["train"][i][0] for i in expected]


def test_uniform_sampling_with_many_clients():
    """The ``N > 4 m`` branch of uniform client sampling (few clients per round of a large population)."""
    dm = SinusoidClients(num_clients=400, examples_per_client=6, clients_per_round=5, support_size=2, query_size=3,
                         seed=3)
    dm.setup()
    ref = sinusoid_case_reference(dm)
    for r in ROUNDS:
        positions = torch.as_tensor(dm._sample_clients(r)).tolist()
        assert positions == ref.sampled(r), f"round {r}: library {positions}, rule {ref.sampled(r)}"
        assert_same(dm.round_batch(r), ref.round_batch(r), f"sinusoid N=400 m=5: round_batch({r})")


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("which", ["all", "some"])
def test_eval_batch_equals_the_reference(case, split, which):
    name, dm, ref = case
    n = len(dm.population(split))
    assert n == len(ref.splits[split]), f"{name}: {split} has {n} clients, the reference {len(ref.splits[split])}"
    if n == 0:
        pytest.skip(f"{name} has no {split} clients")
    indices = range(n) if which == "all" else list(range(n - 1, -1, -2))  # reversed, every other client
    assert_same(dm.eval_batch(split, indices), ref.eval_batch(split, list(indices)), f"{name}: eval_batch({split!r}, {indices})")


def test_eval_loader_batches_equal_the_reference(case):
    """The val/test loaders cover the held-out clients in chunks of ``eval_clients_per_batch``."""
    name, dm, ref = case
    B = dm.eval_clients_per_batch
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        batches = list(loader)
        n = len(ref.splits[split])
        assert len(batches) == -(-n // B), f"{name}: {split} loader gave {len(batches)} batches for {n} clients"
        for k, batch in enumerate(batches):
            chunk = list(range(k * B, min((k + 1) * B, n)))
            assert_same(batch, ref.eval_batch(split, chunk), f"{name}: {split} loader batch {k}")


def test_rounds_depend_on_the_round(case):
    """Sanity of the comparison: different rounds give different reference batches, so equal batches
    above are not an accident of constant draws."""
    _, _, ref = case
    a, b = ref.round_batch(0), ref.round_batch(1)
    same_shape = a.support_x.shape == b.support_x.shape and a.query_x.shape == b.query_x.shape
    assert not (same_shape and torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x))


@pytest.mark.parametrize(
    "name, kind",
    [
        ("tensor-varied-unseen", "eval"),
        ("tensor-mixed-fractions-unseen", "round"),
        ("tensor-mixed-fractions-unseen", "eval"),
        ("tensor-varied-local", "eval"),
        ("tensor-replacement-unseen", "eval"),
        ("leaf-split-unseen", "eval"),
        ("dataset-plain-unseen", "eval"),
    ],
)
def test_cases_exercise_padding(name, kind, tmp_path):
    """The comparisons above include batches whose clients have different counts (both masks present)."""
    _, ref = CASES[name](tmp_path)
    if kind == "round":
        batches = [ref.round_batch(r) for r in ROUNDS]
    else:
        batches = [ref.eval_batch(split, range(len(ref.splits[split]))) for split in ("val", "test")]
    assert any(b.support_mask is not None and b.query_mask is not None for b in batches)
    assert any((b.support_mask == 0).any() for b in batches if b.support_mask is not None)
