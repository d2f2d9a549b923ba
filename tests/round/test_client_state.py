"""The per-client state seam: state rows go into the vmapped client function and come back, only
the accepted clients' rows are written, the math of the upload is untouched."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, loader, mlp, quiet_trainer, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.data import SinusoidClients
from lightning_metafed.faults import ClientFaults
from lightning_metafed.inner import SGD
from lightning_metafed.round import ClientStateStore, InMemoryClientState


def zero_state(key):
    return {"rounds": torch.zeros((), dtype=torch.float64), "last_loss": torch.zeros((), dtype=torch.float64)}


class CountingMAML(lm.MAML):
    """MAML whose clients keep how many rounds they took part in and their last query loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.client_state = InMemoryClientState(zero_state)

    def client_update(self, meta, task, state):
        update, aux = super().client_update(meta, task)
        return update, aux, {"rounds": state["rounds"] + 1, "last_loss": aux["query_loss"]}


def with_ids(batch, ids):
    return replace(batch, client_id=torch.tensor(ids))


def test_the_store_is_a_client_state_store_and_grows_with_visited_clients_only():
    store = InMemoryClientState(zero_state)
    assert isinstance(store, ClientStateStore)
    rows = store.gather(torch.tensor([10**6, 3]))  # never seen: initial rows, nothing stored
    assert rows["rounds"].shape == (2,) and len(store) == 0
    store.write([3], {"rounds": torch.tensor([2.0], dtype=torch.float64), "last_loss": torch.tensor([0.5], dtype=torch.float64)})
    assert len(store) == 1 and store.gather([3, 4])["rounds"].tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="`client_id`"):
        store.gather(None)


@pytest.mark.parametrize("vectorize", [True, False])
def test_state_flows_through_the_round_without_changing_the_upload(vectorize):
    batch = with_ids(sinusoid_batch(4), [7, 3, 9, 1])
    model = CountingMAML(mlp(), inner_optimizer=SGD(lr=0.05), vectorize=vectorize, server_optimizer=torch.optim.SGD)
    plain = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.05), fast_path=False, vectorize=vectorize)
    assert not model._use_fast_path()  # per-client state needs the per-client computation
    result = model.run_round(batch)
    want, _ = plain.round_gradients(batch)
    for name in want:
        torch.testing.assert_close(result.aggregate[name], want[name], rtol=0, atol=0)
    ids, rows = result.new_state.client_id, result.new_state.rows
    _, aux = plain.client_updates_with_aux(batch)
    assert ids.tolist() == [7, 3, 9, 1] and rows["rounds"].tolist() == [1.0] * 4
    torch.testing.assert_close(rows["last_loss"], aux["query_loss"])
    assert len(model.client_state) == 0  # run_round changes nothing; the training step writes back


@FIT_WITHOUT_VALIDATION
def test_only_clients_that_uploaded_get_their_state_written_during_fit():
    faults = ClientFaults(dropout=0.4, seed=2)
    ids = torch.arange(5)
    batches = [with_ids(sinusoid_batch(5, seed=r), ids.tolist()) for r in range(6)]
    model = CountingMAML(mlp(), inner_optimizer=SGD(lr=0.05), faults=faults, server_optimizer=torch.optim.SGD)
    quiet_trainer(max_steps=6).fit(model, loader(*batches))
    survived = torch.stack([~faults.dropped(r, 5) for r in range(6)]).sum(0)
    assert 0 < int(survived.min()) < 6  # this seed drops some clients in some rounds
    counts = model.client_state.gather(ids)["rounds"]
    assert counts.tolist() == survived.double().tolist()


@FIT_WITHOUT_VALIDATION
def test_a_rejected_upload_does_not_write_its_state():
    batch = with_ids(sinusoid_batch(4), [0, 1, 2, 3])
    batch.support_y[1, 0, 0] = float("nan")
    model = CountingMAML(mlp(), inner_optimizer=SGD(lr=0.05), server_optimizer=torch.optim.SGD)
    with pytest.warns(UserWarning, match="rejected 1 of 4"):
        quiet_trainer(max_steps=1).fit(model, loader(batch))
    assert model.client_state.gather([0, 1, 2, 3])["rounds"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert sorted(model.client_state.rows) == [0, 2, 3]


def test_state_is_checkpointed_and_a_resumed_fit_equals_the_uninterrupted_one(tmp_path):
    def data():  # round r's clients are a pure function of (seed, r): a resumed fit sees the same ones
        return SinusoidClients(num_clients=10, clients_per_round=4, support_size=5, query_size=5, rounds_per_epoch=2, seed=3)

    faults = ClientFaults(dropout=0.3, seed=5)
    whole = CountingMAML(mlp().float(), inner_optimizer=SGD(lr=0.05), faults=faults)
    quiet_trainer(max_steps=4).fit(whole, data())
    first = CountingMAML(mlp().float(), inner_optimizer=SGD(lr=0.05), faults=faults)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(first, data())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = CountingMAML(mlp().float(), inner_optimizer=SGD(lr=0.05), faults=faults)
    quiet_trainer(max_steps=4).fit(resumed, data(), ckpt_path=tmp_path / "two.ckpt", weights_only=False)
    assert len(first.client_state) < len(whole.client_state)  # the last two rounds visit new clients
    assert sorted(resumed.client_state.rows) == sorted(whole.client_state.rows)
    for key, row in whole.client_state.rows.items():
        for name, value in row.items():
            torch.testing.assert_close(resumed.client_state.rows[key][name], value, rtol=0, atol=1e-6)


def test_state_outside_a_trainer_client_updates_read_it_and_round_gradients_write_it():
    batch = with_ids(sinusoid_batch(3), [4, 5, 6])
    model = CountingMAML(mlp(), inner_optimizer=SGD(lr=0.05))
    updates, aux = model.client_updates_with_aux(batch)  # reads the rows, keeps the store as it was
    assert updates["net.0.weight"].shape[0] == 3 and len(model.client_state) == 0
    model.round_gradients(batch)
    model.round_gradients(batch)
    assert model.client_state.gather([4, 5, 6])["rounds"].tolist() == [2.0, 2.0, 2.0]
