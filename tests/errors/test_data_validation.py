"""Client data is checked where it enters the data module (naming the client), and TaskBatch shapes."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

from lightning_metafed.data import (
    IID,
    DatasetClients,
    DataSpec,
    FederatedDataModule,
    LEAFClients,
    TaskBatch,
    TensorClients,
)
from lightning_metafed.data.population import ClientData, LazyPopulation, Population


def regression_clients(n: int = 6, size: int = 12, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, generator=g), torch.randn(size, 1, generator=g)) for _ in range(n)]


def label_clients(n: int = 6, size: int = 12, classes: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, generator=g), torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


def explicit(train, **kwargs) -> TensorClients:
    """``train`` clients named 'train_<i>' plus one valid val and test client each."""
    good = train[0]
    args = dict(clients_per_round=2, support_size=3, query_size=3, seed=0)
    args.update(kwargs)
    return TensorClients(train, val=[good], test=[good], **args)


# ----------------------------------------------------------------------------- in-memory clients


def test_nan_target_names_the_client_at_setup():
    clients = regression_clients()
    clients[4][1][7, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Client 'train_4': expected finite targets `y` \(no NaN or inf\), got nan in example 7"):
        explicit(clients).setup("fit")


def test_inf_target_names_the_client_at_setup():
    clients = regression_clients()
    clients[2][1][3, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"Client 'train_2': expected finite targets `y`.*got -inf in example 3"):
        explicit(clients).setup("fit")


def test_nan_feature_of_a_late_client_is_found_at_setup():
    clients = regression_clients(n=60)
    clients[57][0][5, 2] = float("nan")
    dm = TensorClients(clients, protocol="local", clients_per_round=2, support_size=3, query_size=3, rounds_per_epoch=1)
    # client 57 would not be sampled for many rounds: setup finds it before any batch is drawn
    with pytest.raises(ValueError, match=r"Client '57': expected finite features `x` \(no NaN or inf\), got nan in example 5"):
        dm.setup("fit")


def test_nan_feature_in_a_held_out_client_is_found_at_setup():
    clients = regression_clients(n=20)
    clients[0][0][0, 0] = float("inf")
    dm = TensorClients(clients, client_split=(0.8, 0.1, 0.1), clients_per_round=2, support_size=3, query_size=3)
    with pytest.raises(ValueError, match=r"Client '0': expected finite features `x`.*got inf in example 0"):
        dm.setup("fit")


@pytest.mark.parametrize("labels", [[0.0, 2.0, 1.0], [0.5, 2.0, 1.0]])
def test_float_targets_rejected_for_a_classification_source(labels):
    clients = label_clients()
    clients[1] = (clients[1][0][:3], torch.tensor(labels))
    found = "whole numbers" if labels[0] == 0.0 else "non-integer values such as 0.5"
    with pytest.raises(ValueError, match=rf"Client 'train_1': expected integer labels `y` for classification \(`num_classes`=3\), "
                                         rf"got a float target of dtype torch.float32 holding {found}; pass integer labels"):
        explicit(clients, num_classes=3, support_size=1, query_size=1).setup("fit")


def test_float_labels_of_a_dataset_are_rejected():
    dataset = ItemDataset(n=40)
    dataset.targets = [float(c) for c in dataset.targets]
    dm = DatasetClients(dataset, num_clients=10, clients_per_round=2, support_size=2, query_size=2)
    with pytest.raises(ValueError, match=r"integer class labels in `dataset.targets`, got a float target of dtype torch.float32.*pass integer labels"):
        dm.setup("fit")


@pytest.mark.parametrize("bad", [3, -1])
def test_label_out_of_range_names_client_example_and_value(bad):
    clients = label_clients()
    clients[5][1][9] = bad
    with pytest.raises(ValueError, match=rf"Client 'train_5': expected integer labels `y` in \[0, 3\) \(`num_classes`=3\), got {bad} in example 9"):
        explicit(clients, num_classes=3).setup("fit")


def test_clients_with_different_feature_shapes():
    clients = regression_clients()
    clients[3] = (torch.randn(12, 4), torch.randn(12, 1))
    with pytest.raises(ValueError, match=r"Client 'train_3': expected features `x` of per-example shape \(3,\) like client 'train_0', "
                                         r"got \(4,\) \(`x` has shape \(12, 4\)\)"):
        explicit(clients).setup("fit")


def test_clients_with_different_feature_dtypes():
    clients = regression_clients()
    clients[2] = (clients[2][0].double(), clients[2][1])
    with pytest.raises(ValueError, match=r"Client 'train_2': expected features `x` of dtype torch.float32 like client 'train_0', "
                                         r"got torch.float64"):
        explicit(clients).setup("fit")


def test_clients_with_different_target_shapes_or_dtypes():
    clients = regression_clients()
    clients[1] = (clients[1][0], clients[1][1][:, 0])
    with pytest.raises(ValueError, match=r"Client 'train_1': expected targets `y` of per-example shape \(1,\) like client 'train_0', got \(\)"):
        explicit(clients).setup("fit")
    clients = label_clients()
    clients[4] = (clients[4][0], clients[4][1].int())
    with pytest.raises(ValueError, match=r"Client 'train_4': expected targets `y` of dtype torch.int64 .*got torch.int32"):
        explicit(clients).setup("fit")


def test_held_out_clients_are_checked_against_the_train_clients():
    clients = regression_clients()
    with pytest.raises(ValueError, match=r"Client 'val_0': expected features `x` of per-example shape \(3,\) like client 'train_0'"):
        TensorClients(clients, val=[(torch.randn(8, 2), torch.randn(8, 1))], clients_per_round=2, support_size=3,
                      query_size=3).setup("fit")


def test_a_failed_setup_can_be_retried_after_fixing_the_data():
    clients = regression_clients()
    clients[4][1][0, 0] = float("nan")
    dm = explicit(clients)
    with pytest.raises(ValueError, match=r"train_4"):
        dm.setup("fit")
    clients[4][1][0, 0] = 0.0
    dm.setup("fit")
    assert dm.round_batch(0).num_clients == 2


# ------------------------------------------------------------------------------------ data spec


def test_data_spec_of_in_memory_clients():
    spec = explicit(regression_clients()).data_spec()
    assert spec == DataSpec((3,), torch.float32, (1,), torch.float32, None, False)
    assert not spec.classification
    labels = explicit(label_clients()).data_spec()
    assert labels.integral_targets and labels.num_classes is None and labels.classification
    assert explicit(label_clients(), num_classes=3).data_spec().num_classes == 3
    with pytest.raises(AttributeError):
        spec.num_classes = 3  # frozen


def test_data_spec_of_a_lazy_source_loads_one_client():
    dm = DatasetClients(ItemDataset(n=40), num_clients=10, partitioner=IID(), clients_per_round=2, support_size=2,
                        query_size=2)
    spec = dm.data_spec()
    assert spec == DataSpec((2,), torch.float32, (), torch.int64, 4, True)


# ---------------------------------------------------------------------------------- lazy sources


class ItemDataset(Dataset):
    """``n`` items ``(tensor([i, -i]), i % classes)``; item ``bad`` has a NaN feature."""

    def __init__(self, n: int = 40, classes: int = 4, bad: int | None = None):
        self.x = torch.stack([torch.arange(n).float(), -torch.arange(n).float()], dim=1)
        if bad is not None:
            self.x[bad, 1] = float("nan")
        self.targets = [i % classes for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], self.targets[i]


def holder(dm: DatasetClients, item: int) -> tuple[Population, int]:
    """The split population and index of the client holding dataset item ``item``."""
    for split in ("train", "val", "test"):
        population = dm.population(split)
        for i in range(len(population)):
            if item in population.base.parts[population.ids[i]].tolist():
                return population, i
    raise AssertionError(item)


def test_lazy_dataset_client_is_named_when_loaded():
    dm = DatasetClients(ItemDataset(bad=13), num_clients=10, partitioner=IID(), clients_per_round=2, support_size=1,
                        query_size=1)
    dm.setup("fit")  # items are read on demand: nothing is loaded at setup
    population, i = holder(dm, 13)
    row = population.base.parts[population.ids[i]].tolist().index(13)
    with pytest.raises(ValueError, match=rf"Client '{population.name(i)}': expected finite features `x` \(no NaN or inf\), "
                                         rf"got nan in example {row}"):
        dm.load_client(population, i)


class ShapeShiftingClients(FederatedDataModule):
    """Lazily generated clients; client ``odd`` has 4 features instead of 3."""

    def __init__(self, odd: int, **kwargs):
        super().__init__(**kwargs)
        self.odd = odd

    def build_population(self) -> Population:
        def make(k: int) -> ClientData:
            return ClientData(torch.randn(10, 4 if k == self.odd else 3), torch.randn(10, 1))

        return LazyPopulation(20, make, 10)


def test_lazy_clients_are_checked_against_the_first_client_loaded():
    dm = ShapeShiftingClients(odd=7, protocol="local", clients_per_round=2, support_size=2, query_size=2)
    dm.setup("fit")
    train = dm.population("train")
    dm.load_client(train, 3)
    with pytest.raises(ValueError, match=r"Client '7': expected features `x` of per-example shape \(3,\) like client '3', got \(4,\)"):
        dm.load_client(train, 7)


# ------------------------------------------------------------------------------------- TaskBatch


def batch_fields(m: int = 3, s: int = 4, q: int = 5) -> dict:
    return dict(support_x=torch.randn(m, s, 2), support_y=torch.randn(m, s, 1), query_x=torch.randn(m, q, 2),
                query_y=torch.randn(m, q, 1))


def test_task_batch_clients_disagree_in_m():
    with pytest.raises(ValueError, match=r"number of clients m: `support_x` has 3, `query_y` has 2 "
                                         r"\(expected `query_y` of shape \[3, \.\.\.\], got \(2, 5, 1\)\)"):
        TaskBatch(**{**batch_fields(), "query_y": torch.randn(2, 5, 1)})


def test_task_batch_y_examples_disagree_with_x():
    with pytest.raises(ValueError, match=r"`query_y` to have 5 examples per client like `query_x`, got 4 "
                                         r"\(expected shape \[3, 5, \.\.\.\], got \(3, 4, 1\)\)"):
        TaskBatch(**{**batch_fields(), "query_y": torch.randn(3, 4, 1)})


def test_task_batch_support_and_query_feature_shapes_differ():
    with pytest.raises(ValueError, match=r"`query_x` to have shape \(3, 5, 2\) \(\[m, Q\] and the per-example shape \(2,\) "
                                         r"of `support_x`\), got \(3, 5, 3\)"):
        TaskBatch(**{**batch_fields(), "query_x": torch.randn(3, 5, 3)})


def test_task_batch_support_and_query_target_shapes_differ():
    with pytest.raises(ValueError, match=r"`query_y` to have shape \(3, 5, 1\) .*`support_y`\), got \(3, 5\)"):
        TaskBatch(**{**batch_fields(), "query_y": torch.randn(3, 5)})


def test_task_batch_support_and_query_dtypes_differ():
    with pytest.raises(ValueError, match=r"`query_x` to have the dtype of `support_x` \(torch.float32\), got torch.float64"):
        TaskBatch(**{**batch_fields(), "query_x": torch.randn(3, 5, 2, dtype=torch.float64)})
    labels = dict(support_y=torch.zeros(3, 4, dtype=torch.long), query_y=torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"`query_y` to have the dtype of `support_y` \(torch.int64\), got torch.float32"):
        TaskBatch(**{**batch_fields(), **labels})


@pytest.mark.parametrize("weight", [[1.0, float("inf"), 1.0], [1.0, -2.0, 1.0]])
def test_task_batch_weight_finite_and_non_negative(weight):
    with pytest.raises(ValueError, match=r"`weight` to be finite, >= 0 and not all zero"):
        TaskBatch(**batch_fields(), weight=torch.tensor(weight))


def test_task_batch_query_mask_shape():
    with pytest.raises(ValueError, match=r"`query_mask` to have shape \(3, 5\), got \(3, 4\)"):
        TaskBatch(**batch_fields(), query_mask=torch.ones(3, 4))


def test_task_batch_mask_values_and_type():
    with pytest.raises(ValueError, match=r"`support_mask` to hold only 0/1.*got 0.5"):
        TaskBatch(**batch_fields(), support_mask=torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match=r"`query_mask` to be a torch.Tensor or None, got list"):
        TaskBatch(**batch_fields(), query_mask=[[1] * 5] * 3)
    batch = TaskBatch(**batch_fields(), support_mask=torch.ones(3, 4, dtype=torch.bool), query_mask=torch.ones(3, 5))
    assert batch.num_clients == 3


def test_task_batch_client_id_shape():
    with pytest.raises(ValueError, match=r"`client_id` to have shape \[3\], got \(3, 1\)"):
        TaskBatch(**batch_fields(), client_id=torch.arange(3).reshape(3, 1))


def test_leaf_float_labels_are_named_not_truncated(tmp_path):
    users = [f"u{i}" for i in range(6)]
    data = {"users": users, "num_samples": [6] * 6, "user_data": {u: {"x": [[0.0, 1.0]] * 6, "y": [0, 1, 0, 1, 0, 1]} for u in users}}
    data["user_data"]["u3"]["y"] = [0, 1.5, 0, 1, 0, 1]
    (tmp_path / "all_data_0.json").write_text(json.dumps(data))
    dm = LEAFClients(str(tmp_path), clients_per_round=2, support_size=2, query_size=2, client_split=(0.5, 0.25, 0.25))
    with pytest.raises(ValueError, match=r"Client 'u3': expected integer class labels `y` in the LEAF JSON, got 1.5"):
        dm.setup("fit")
