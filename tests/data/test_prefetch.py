"""Round prefetching: the same batches as without it, errors where their batch was due, a thread
that stops with its consumer, and pinned memory only for a CUDA trainer."""

from __future__ import annotations

import gc
import threading
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader

import lightning_metafed as lm
from lightning_metafed.data import SinusoidClients, TaskBatch, TensorClients
from lightning_metafed.data.loaders import PREFETCH_THREAD_NAME, Rounds, RoundsLoader


def sinusoid_dm(**kwargs) -> SinusoidClients:
    args = dict(num_clients=60, clients_per_round=4, support_size=3, query_size=4, rounds_per_epoch=6, seed=5)
    return SinusoidClients(**{**args, **kwargs})


def tensor_dm(**kwargs) -> TensorClients:
    g = torch.Generator().manual_seed(0)
    sizes = [9, 14, 11, 20, 8, 17, 12, 15, 10, 13]
    clients = [(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)) for n in sizes]
    args = dict(clients_per_round=3, support_size=0.3, query_size=0.4, client_split=(0.6, 0.2, 0.2),
                rounds_per_epoch=6, seed=11)
    return TensorClients(clients, **{**args, **kwargs})


def with_prefetch(dm, prefetch: int):
    dm.prefetch = prefetch
    return dm


def assert_same_batch(a: TaskBatch, b: TaskBatch) -> None:
    for f in fields(TaskBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor), f.name
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PREFETCH_THREAD_NAME]


def assert_no_prefetch_thread() -> None:
    for t in prefetch_threads():
        t.join(2.0)
    assert not [t for t in prefetch_threads() if t.is_alive()]


def count_builds(monkeypatch, dm, fail_at: int | None = None) -> list[tuple[int, str]]:
    """Wrap ``dm.round_batch`` to record ``(round, thread name)`` of each call (and raise at ``fail_at``)."""
    calls: list[tuple[int, str]] = []
    build = dm.round_batch

    def recorded(r: int) -> TaskBatch:
        calls.append((r, threading.current_thread().name))
        if r == fail_at:
            raise ValueError(f"boom at {r}")
        return build(r)

    monkeypatch.setattr(dm, "round_batch", recorded)
    return calls


# ------------------------------------------------------------------------------------ same batches


@pytest.mark.parametrize("make_dm", [sinusoid_dm, tensor_dm], ids=["sinusoid", "tensors"])
def test_prefetching_yields_the_same_batches_over_whole_epochs(make_dm):
    reference = make_dm()
    R = reference.rounds_per_epoch
    expected = [reference.round_batch(r) for r in range(2 * R)]
    for prefetch in (0, 1, 3):
        dm = with_prefetch(make_dm(), prefetch)
        dm.setup()
        loader = RoundsLoader(Rounds(dm))
        got = list(loader) + list(loader)  # two epochs: rounds 0..R-1, then R..2R-1
        assert len(got) == 2 * R, prefetch
        for a, b in zip(got, expected):
            assert_same_batch(a, b)
    assert_no_prefetch_thread()


def test_prefetched_rounds_are_built_in_the_prefetch_thread(monkeypatch):
    dm = with_prefetch(sinusoid_dm(), 2)
    dm.setup()
    calls = count_builds(monkeypatch, dm)
    list(Rounds(dm))
    assert calls == [(r, PREFETCH_THREAD_NAME) for r in range(dm.rounds_per_epoch)]
    assert_no_prefetch_thread()


def test_without_prefetching_rounds_are_built_by_the_consumer(monkeypatch):
    dm = with_prefetch(sinusoid_dm(), 0)
    dm.setup()
    calls = count_builds(monkeypatch, dm)
    before = set(prefetch_threads())
    list(Rounds(dm))
    assert calls == [(r, threading.current_thread().name) for r in range(dm.rounds_per_epoch)]
    assert set(prefetch_threads()) <= before


# ------------------------------------------------------------------------------------ with a trainer


class RecordingMAML(lm.MAML):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(self.global_step)
        return super().training_step(batch, batch_idx)


def fit(prefetch: int, monkeypatch) -> tuple[RecordingMAML, list[tuple[int, str]]]:
    dm = with_prefetch(
        SinusoidClients(num_clients=50, clients_per_round=4, support_size=5, query_size=5, rounds_per_epoch=5, seed=3),
        prefetch,
    )
    calls = count_builds(monkeypatch, dm)
    torch.manual_seed(0)
    model = RecordingMAML(nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)))
    quiet_trainer(max_steps=7).fit(model, datamodule=dm)  # stops 2 rounds into the second epoch
    return model, calls


def test_trainer_reaches_the_same_parameters_with_prefetching_and_leaves_no_thread(monkeypatch):
    plain, plain_calls = fit(0, monkeypatch)
    prefetched, prefetched_calls = fit(2, monkeypatch)
    assert plain.seen == prefetched.seen == list(range(7))
    assert {name for _, name in plain_calls} == {threading.current_thread().name}
    assert {name for _, name in prefetched_calls} == {PREFETCH_THREAD_NAME}
    for (name, p), (_, q) in zip(plain.named_parameters(), prefetched.named_parameters()):
        assert torch.equal(p, q), name
    assert_no_prefetch_thread()


class FailingMAML(lm.MAML):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            raise RuntimeError("training failed at step 2")
        return super().training_step(batch, batch_idx)


def test_an_error_in_training_stops_the_thread(monkeypatch):
    dm = with_prefetch(sinusoid_dm(rounds_per_epoch=100), 2)
    calls = count_builds(monkeypatch, dm)
    model = FailingMAML(nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)))
    with pytest.raises(RuntimeError, match="training failed at step 2"):
        quiet_trainer(max_steps=50).fit(model, datamodule=dm)
    assert_no_prefetch_thread()
    assert len(calls) <= 3 + 2 + 1  # rounds 0..2 consumed, 2 queued, 1 being built


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("prefetch", [0, 2])
def test_an_error_building_a_round_surfaces_where_its_batch_was_due(monkeypatch, prefetch):
    dm = with_prefetch(sinusoid_dm(), prefetch)
    dm.setup()
    expected = [dm.round_batch(r) for r in range(2)]
    calls = count_builds(monkeypatch, dm, fail_at=2)
    batches = iter(Rounds(dm))
    for want in expected:
        assert_same_batch(next(batches), want)
    with pytest.raises(ValueError, match="^boom at 2$"):
        next(batches)
    assert [r for r, _ in calls] == [0, 1, 2]  # nothing built after the failing round
    with pytest.raises(StopIteration):
        next(batches)
    assert_no_prefetch_thread()


# ------------------------------------------------------------------------------------- early stops


def first_batch_taken(monkeypatch, prefetch: int):
    """A 100-round epoch with one batch taken: ``(iterator, its prefetch thread, rounds built)``."""
    dm = with_prefetch(sinusoid_dm(rounds_per_epoch=100), prefetch)
    dm.setup()
    calls = count_builds(monkeypatch, dm)
    before = set(prefetch_threads())
    batches = iter(Rounds(dm))
    next(batches)
    (thread,) = set(prefetch_threads()) - before
    return batches, thread, calls


@pytest.mark.parametrize("prefetch", [1, 3])
def test_closing_the_iterator_early_stops_the_thread(monkeypatch, prefetch):
    batches, thread, calls = first_batch_taken(monkeypatch, prefetch)
    assert thread.daemon
    batches.close()
    assert not thread.is_alive()
    assert 1 <= len(calls) <= 1 + prefetch + 1
    assert [r for r, _ in calls] == list(range(len(calls)))


def test_dropping_the_iterator_stops_the_thread(monkeypatch):
    batches, thread, calls = first_batch_taken(monkeypatch, 2)
    del batches
    gc.collect()
    thread.join(2.0)
    assert not thread.is_alive()
    assert len(calls) <= 1 + 2 + 1


# ------------------------------------------------------------------------------------------ pinning


def fake_trainer(device: torch.device | None):
    strategy = SimpleNamespace() if device is None else SimpleNamespace(root_device=device)
    return SimpleNamespace(global_step=0, strategy=strategy)


@pytest.mark.parametrize(
    "device, prefetch, pinned",
    [
        (torch.device("cuda"), 2, True),
        (torch.device("cpu"), 2, False),
        (None, 2, False),  # a strategy without a root device
        (torch.device("cuda"), 0, False),  # no prefetching: exactly the loop without a thread
    ],
)
def test_batches_are_pinned_only_for_a_cuda_trainer(monkeypatch, device, prefetch, pinned):
    dm = with_prefetch(sinusoid_dm(), prefetch)
    dm.setup()
    expected = [dm.round_batch(r) for r in range(dm.rounds_per_epoch)]
    dm.trainer = fake_trainer(device)
    pins: list[tuple[TaskBatch, str]] = []

    def record(self: TaskBatch) -> TaskBatch:
        pins.append((self, threading.current_thread().name))
        return self

    monkeypatch.setattr(TaskBatch, "pin_memory", record)
    got = list(Rounds(dm))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert_same_batch(a, b)
    if pinned:
        assert [b for b, _ in pins] == got  # every yielded batch went through pin_memory
        assert all(name == PREFETCH_THREAD_NAME for _, name in pins)
    else:
        assert pins == []
    assert_no_prefetch_thread()


def test_an_error_pinning_a_batch_surfaces_in_the_consumer(monkeypatch):
    dm = with_prefetch(sinusoid_dm(), 2)
    dm.setup()
    dm.trainer = fake_trainer(torch.device("cuda"))

    def fail(self: TaskBatch) -> TaskBatch:
        raise RuntimeError("no CUDA to pin with")

    monkeypatch.setattr(TaskBatch, "pin_memory", fail)
    with pytest.raises(RuntimeError, match="no CUDA to pin with"):
        next(iter(Rounds(dm)))
    assert_no_prefetch_thread()


@pytest.mark.parametrize(
    "device, threaded",
    [(torch.device("cuda"), True), (torch.device("cpu"), False), ("no trainer", False)],
)
def test_the_default_prefetches_on_an_accelerator_only(monkeypatch, device, threaded):
    dm = with_prefetch(sinusoid_dm(), None)
    dm.setup()
    expected = [dm.round_batch(r) for r in range(dm.rounds_per_epoch)]
    if device != "no trainer":
        dm.trainer = fake_trainer(device)
        monkeypatch.setattr(TaskBatch, "pin_memory", lambda self: self)
    calls = count_builds(monkeypatch, dm)
    got = list(Rounds(dm))
    for a, b in zip(got, expected, strict=True):
        assert_same_batch(a, b)
    builder = PREFETCH_THREAD_NAME if threaded else threading.current_thread().name
    assert calls == [(r, builder) for r in range(dm.rounds_per_epoch)]
    assert_no_prefetch_thread()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_pins_every_tensor_and_keeps_the_values():
    dm = sinusoid_dm()
    batch = dm.round_batch(0)
    batch.support_mask = torch.ones(batch.support_x.shape[:2])
    pinned = batch.pin_memory()
    for f in fields(TaskBatch):
        value = getattr(pinned, f.name)
        if isinstance(value, torch.Tensor):
            assert value.is_pinned(), f.name
    assert_same_batch(pinned, batch)
    (loaded,) = list(DataLoader([batch], batch_size=None, pin_memory=True))
    assert isinstance(loaded, TaskBatch) and loaded.support_x.is_pinned()
    assert_same_batch(loaded, batch)
