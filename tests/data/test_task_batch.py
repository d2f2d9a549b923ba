"""TaskBatch validation and helpers."""

from __future__ import annotations

import pytest
import torch

from lightning_metafed import TaskBatch


def make(m=3, s=4, q=5, **kwargs):
    return TaskBatch(torch.randn(m, s, 2), torch.randn(m, s, 1), torch.randn(m, q, 2), torch.randn(m, q, 1), **kwargs)


def test_importable_from_package_root():
    import lightning_metafed

    assert lightning_metafed.TaskBatch is TaskBatch
    assert make().num_clients == 3


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(query_x=torch.randn(2, 5, 2)), r"number of clients m.*`support_x` has 3, `query_x` has 2"),
        (dict(support_y=torch.randn(4, 4, 1)), r"`support_y` has 4"),
        (dict(query_y=torch.randn(3, 6, 1)), r"`query_y` to have 5 examples.*got 6"),
        (dict(support_y=torch.randn(3, 2, 1)), r"`support_y` to have 4 examples.*got 2"),
        (dict(support_x=torch.randn(3)), r"`support_x`.*\[m, n, \.\.\.\].*\(3,\)"),
        (dict(query_x=[1, 2]), r"`query_x`.*Tensor.*list"),
    ],
)
def test_inconsistent_shapes_raise(fields, match):
    base = dict(
        support_x=torch.randn(3, 4, 2), support_y=torch.randn(3, 4, 1), query_x=torch.randn(3, 5, 2), query_y=torch.randn(3, 5, 1)
    )
    base.update(fields)
    with pytest.raises(ValueError, match=match):
        TaskBatch(**base)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=torch.ones(2)), r"`weight`.*\[3\].*\(2,\)"),
        (dict(weight=torch.tensor([1.0, -1.0, 1.0])), r"`weight`.*>= 0.*-1.0"),
        (dict(weight=torch.zeros(3)), r"`weight`.*not all zero"),
        (dict(weight=torch.tensor([1.0, float("nan"), 1.0])), r"`weight`.*finite"),
        (dict(client_id=["a", "b"]), r"`client_id`.*3 ids.*2"),
        (dict(support_mask=torch.ones(3, 5)), r"`support_mask`.*\(3, 4\).*\(3, 5\)"),
    ],
)
def test_bad_optional_fields_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_indexing_collate_and_to_roundtrip():
    batch = make(weight=torch.tensor([1.0, 2.0, 3.0]), client_id=["a", "b", "c"])
    parts = [batch[i] for i in range(3)]
    assert parts[1].client_id == ["b"] and parts[1].num_clients == 1
    joined = TaskBatch.collate(parts)
    torch.testing.assert_close(joined.support_x, batch.support_x)
    torch.testing.assert_close(joined.weight, batch.weight)
    assert joined.client_id == ["a", "b", "c"]
    labels = TaskBatch(torch.randn(2, 3, 2), torch.tensor([[0, 1, 2], [2, 1, 0]]), torch.randn(2, 1, 2), torch.tensor([[1], [0]]))
    cast = labels.to(dtype=torch.float64)
    assert cast.support_x.dtype == torch.float64 and cast.support_y.dtype == torch.int64


def test_to_copies_pinned_tensors_asynchronously(monkeypatch):
    calls = []
    original = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking"))
        return original(self, *args, **kwargs)

    batch = TaskBatch(torch.randn(2, 3, 1), torch.randn(2, 3, 1), torch.randn(2, 4, 1), torch.randn(2, 4, 1))
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)  # as after pin_memory() on a CUDA machine
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    moved = batch.to("cpu")
    assert calls == [True] * 4 and torch.equal(moved.query_y, batch.query_y)
    calls.clear()
    batch.to("cpu", non_blocking=False)
    assert calls == [False] * 4
