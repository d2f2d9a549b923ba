"""Ditto, SCAFFOLD and APFL: each round equals its pure rule called by hand per client with the
stored rows; rows, server control and parameters move as the papers say, through fit, faults,
evaluation and checkpoints."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch
from conftest import (
    FIT_WITHOUT_VALIDATION,
    client_task,
    loader,
    mlp,
    mse_fn,
    quiet_trainer,
    sinusoid_batch,
)

import lightning_metafed as lm
from lightning_metafed.algorithms.apfl import APFL
from lightning_metafed.algorithms.ditto import Ditto
from lightning_metafed.algorithms.scaffold import SCAFFOLD
from lightning_metafed.data import SinusoidClients
from lightning_metafed.faults import ClientFaults
from lightning_metafed.functional.personalized import (
    APFL_ALPHA_KEY,
    CONTROL_PREFIX,
    apfl_update,
    ditto_update,
    scaffold_update,
)
from lightning_metafed.inner import SGD

NAMES = ["ditto", "scaffold", "apfl"]
POPULATION = 10


def make(name, net=None, **kwargs):
    net = mlp() if net is None else net
    server = partial(torch.optim.SGD, lr=1.0)
    if name == "ditto":
        return Ditto(net, inner_optimizer=SGD(lr=0.05), inner_steps=3, personal_steps=2, lam=0.5, server_optimizer=server, **kwargs)
    if name == "scaffold":
        kwargs = {"population": POPULATION, "sampled_per_round": 4, **kwargs}
        return SCAFFOLD(net, local_lr=0.05, inner_steps=3, server_optimizer=server, **kwargs)
    return APFL(net, local_lr=0.05, inner_steps=3, alpha_lr=0.1, alpha_init=0.3, server_optimizer=server, **kwargs)


def with_ids(batch, ids):
    return replace(batch, client_id=torch.tensor(ids))


def net_keyed(params):
    return {k[len("net."):]: v for k, v in params.items() if k.startswith("net.")}


def hand_client(name, model, theta, row, task, control):
    """One client's (upload, new row) from the pure rule, net-keyed upload and module-keyed row."""
    loss = mse_fn(model.net)
    if name == "ditto":
        up, _, new = ditto_update(loss, theta, net_keyed(row), task, optimizer=SGD(lr=0.05), inner_steps=3,
                                  personal_steps=2, lam=0.5)
        return up, {"net." + k: v for k, v in new.items()}
    if name == "scaffold":
        up, _, new = scaffold_update(loss, theta, net_keyed(row), task, lr=0.05, inner_steps=3, server_control=control)
        return up, {"net." + k: v for k, v in new.items()}
    personal = {**net_keyed(row), APFL_ALPHA_KEY: row[APFL_ALPHA_KEY]}
    up, _, new = apfl_update(loss, theta, personal, task, lr=0.05, inner_steps=3, alpha_lr=0.1)
    alpha = new.pop(APFL_ALPHA_KEY)
    return up, {**{"net." + k: v for k, v in new.items()}, APFL_ALPHA_KEY: alpha}


def initial_row(name, theta):
    """A client never seen, from the net-keyed global parameters ``theta``."""
    if name == "scaffold":
        return {"net." + k: torch.zeros_like(v) for k, v in theta.items()}
    row = {"net." + k: v.clone() for k, v in theta.items()}
    if name == "apfl":
        row[APFL_ALPHA_KEY] = torch.tensor(0.3, dtype=torch.float64)
    return row


def hand_round(name, model, theta, rows, control, batch, survived):
    """One round by hand: ``(new theta, new control, rows)`` (rows updated for survivors only)."""
    ids = batch.client_id.tolist()
    uploads, new_rows = [], {}
    for i, key in enumerate(ids):
        up, new = hand_client(name, model, theta, rows.get(key) or initial_row(name, theta), client_task(batch, i), control)
        uploads.append(up)
        new_rows[key] = new
    keep = [i for i in range(len(ids)) if survived[i]]
    w = batch.weight[keep] / batch.weight[keep].sum()
    mean = {k: sum(w[j] * uploads[i][k] for j, i in enumerate(keep)) for k in uploads[0]}
    theta = {k: theta[k] - mean[k] for k in theta}
    if name == "scaffold":
        control = {k: control[k] + (4 / POPULATION) * mean[CONTROL_PREFIX + k] for k in control}
    rows = {**rows, **{ids[i]: new_rows[ids[i]] for i in keep}}
    return theta, control, rows


def seed_rows(name, model, ids):
    """Write distinct, non-initial rows for ``ids`` (and a non-zero server control for SCAFFOLD)."""
    g = torch.Generator().manual_seed(7)
    rows = model.client_state.gather(torch.tensor(ids))
    rows = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in rows.items()}
    if APFL_ALPHA_KEY in rows:
        rows[APFL_ALPHA_KEY] = torch.tensor([0.2, 0.8], dtype=torch.float64)[: len(ids)]
    model.client_state.write(ids, rows)
    if name == "scaffold":
        for buffer in model.server_control.buffers():
            buffer.copy_(0.05 * torch.randn(buffer.shape, generator=g, dtype=buffer.dtype))


def assert_rows(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key, row in expected.items():
        for name, value in row.items():
            torch.testing.assert_close(actual[key][name], value)


# -------------------------------------------------------------------------------------- one round


@pytest.mark.parametrize("name", NAMES)
def test_client_updates_equal_the_rule_by_hand_with_stored_rows_and_vmap_equals_the_loop(name):
    batch = with_ids(sinusoid_batch(4, seed=1), [3, 8, 1, 5])
    models = {v: make(name, vectorize=v) for v in (True, False)}
    for model in models.values():
        seed_rows(name, model, [3, 1])
    model = models[True]
    theta = net_keyed(model.meta_parameters(detach=True))
    control = net_keyed(model.control()) if name == "scaffold" else None
    stored = {k: model.client_state.rows[k] for k in (3, 1)}
    got = model.client_updates(batch)
    for i, key in enumerate([3, 8, 1, 5]):
        row = stored.get(key) or initial_row(name, theta)
        want, _ = hand_client(name, model, theta, row, client_task(batch, i), control)
        for k, v in want.items():
            prefixed = CONTROL_PREFIX + "net." + k[len(CONTROL_PREFIX):] if k.startswith(CONTROL_PREFIX) else "net." + k
            torch.testing.assert_close(got[prefixed][i], v)
    assert len(got) == len(model.meta_parameters()) * (2 if name == "scaffold" else 1)
    looped = models[False].client_updates(batch)
    for k in got:
        torch.testing.assert_close(looped[k], got[k])
    assert len(model.client_state) == 2  # reading the rows stores nothing


def test_scaffold_with_zero_controls_makes_fedavg_local_sgd_steps():
    batch = with_ids(sinusoid_batch(3, seed=2), [0, 1, 2])
    scaffold = make("scaffold")
    fedavg = lm.FedAvg(mlp(), inner_optimizer=SGD(lr=0.05), local_epochs=3)
    got, want = scaffold.client_updates(batch), fedavg.client_updates(batch)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v)
        torch.testing.assert_close(got[CONTROL_PREFIX + k], v / (3 * 0.05))  # c_i⁺ = (θ − y_K) / (K·lr)


# ------------------------------------------------------------------------------------ two rounds


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_two_rounds_of_fit_equal_the_hand_rounds(name, dropout):
    faults = ClientFaults(dropout=dropout, seed=36) if dropout else None
    batches = [with_ids(sinusoid_batch(4, seed=10), [0, 1, 2, 3]), with_ids(sinusoid_batch(4, seed=11), [2, 5, 0, 3])]
    model = make(name, faults=faults)
    theta = net_keyed(model.meta_parameters(detach=True))
    control = {k: torch.zeros_like(v) for k, v in theta.items()}
    rows: dict = {}
    survived = [~faults.dropped(r, 4) if faults else torch.ones(4, dtype=torch.bool) for r in range(2)]
    theta, control, rows = hand_round(name, model, theta, rows, control, batches[0], survived[0].tolist())
    after_round_0 = dict(rows)
    theta, control, rows = hand_round(name, model, theta, rows, control, batches[1], survived[1].tolist())
    quiet_trainer(max_steps=2).fit(model, loader(*batches))
    for k, v in theta.items():
        torch.testing.assert_close(model.net.get_parameter(k).detach(), v)
    assert_rows(model.client_state.rows, rows)
    if name == "scaffold":
        for k, v in control.items():
            torch.testing.assert_close(model.control()["net." + k], v)
    for key in (0, 3):  # sampled in both rounds: round 1 started from the round-0 row, so the rows differ
        assert not torch.equal(rows[key]["net.0.weight"], after_round_0[key]["net.0.weight"])
    if dropout:  # this seed drops client 1 in round 0 and client 2 (which trained in round 0) in round 1
        assert survived[0].tolist() == [True, False, True, True] and survived[1].tolist() == [False, True, True, True]
        assert 1 not in model.client_state.rows
        assert_rows({2: model.client_state.rows[2]}, {2: after_round_0[2]})


@FIT_WITHOUT_VALIDATION
def test_scaffold_without_population_fails_before_the_first_round():
    model = make("scaffold", population=None, sampled_per_round=None)
    with pytest.raises(ValueError, match="`sampled_per_round` and `population`"):
        quiet_trainer(max_steps=1).fit(model, loader(with_ids(sinusoid_batch(2), [0, 1])))


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("name", NAMES)
def test_spilled_rows_train_as_rows_in_memory(name):
    batches = [with_ids(sinusoid_batch(4, seed=10), [0, 1, 2, 3]), with_ids(sinusoid_batch(4, seed=11), [2, 5, 0, 3])]
    memory, spilled = make(name), make(name, max_resident_rows=1)
    for model in (memory, spilled):
        quiet_trainer(max_steps=2).fit(model, loader(*batches))
    ids = torch.tensor([0, 1, 2, 3, 5])
    want, got = memory.client_state.gather(ids), spilled.client_state.gather(ids)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v)


# ------------------------------------------------------------------------------------- evaluation


def query_loss(model, params, batch):
    """Each client's query MSE at its own parameters ``{module name: [m, ...]}``."""
    loss = mse_fn(model.net)
    return torch.stack([
        loss({k: v[i] for k, v in net_keyed(params).items()}, batch.query_x[i], batch.query_y[i], None)
        for i in range(batch.num_clients)
    ])


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("name", NAMES)
def test_validation_starts_trained_clients_from_their_state_and_unseen_ones_from_the_initial_state(name):
    model = make(name)
    quiet_trainer(max_steps=1).fit(model, loader(with_ids(sinusoid_batch(4, seed=10), [0, 1, 2, 3])))
    batch = with_ids(sinusoid_batch(4, seed=20), [0, 2, 7, 9])  # two trained clients, two never seen
    meta = model.meta_parameters(detach=True)
    rows = model.client_state.rows
    if name == "scaffold":
        assert model.evaluation_params(batch) is None
        start = {k: v.expand(4, *v.shape) for k, v in meta.items()}
    else:
        start = model.evaluation_params(batch)
        for i, key in enumerate([0, 2]):
            alpha = rows[key][APFL_ALPHA_KEY] if name == "apfl" else torch.tensor(1.0, dtype=torch.float64)
            for k, v in meta.items():
                torch.testing.assert_close(start[k][i], alpha * rows[key][k] + (1 - alpha) * v)
                assert not torch.allclose(start[k][i], v)
        for k, v in meta.items():  # unseen: the initial state (v = θ) gives the global model
            torch.testing.assert_close(start[k][2:], v.expand(2, *v.shape))
    results = quiet_trainer(limit_val_batches=1.0).validate(model, loader(batch), verbose=False)[0]
    assert results["val/loss_pre"] == pytest.approx(float(query_loss(model, start, batch).mean()), rel=1e-6)
    assert all(torch.isfinite(torch.tensor(v)) for v in results.values())
    if name != "scaffold":  # default eval_inner_steps = 0: the personal model as trained
        assert model.eval_inner_steps == 0 and results["val/loss_post"] == results["val/loss_pre"]


# ------------------------------------------------------------------------------------ checkpoints


def sinusoid_data():
    return SinusoidClients(num_clients=10, clients_per_round=4, support_size=5, query_size=5, rounds_per_epoch=2, seed=3)


@pytest.mark.parametrize("name", NAMES)
def test_a_resumed_fit_restores_the_rows_and_the_server_control(name, tmp_path):
    kwargs = {"population": None, "sampled_per_round": None} if name == "scaffold" else {}
    whole = make(name, mlp().float(), **kwargs)
    quiet_trainer(max_steps=4).fit(whole, sinusoid_data())
    first = make(name, mlp().float(), **kwargs)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(first, sinusoid_data())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = make(name, mlp().float(), **kwargs)
    quiet_trainer(max_steps=4).fit(resumed, sinusoid_data(), ckpt_path=tmp_path / "two.ckpt", weights_only=False)
    assert sorted(resumed.client_state.rows) == sorted(whole.client_state.rows)
    for key, row in whole.client_state.rows.items():
        for k, v in row.items():
            torch.testing.assert_close(resumed.client_state.rows[key][k], v, rtol=0, atol=1e-5)
    for k, v in whole.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(k), v, rtol=0, atol=1e-5)
    if name == "scaffold":  # |S| and N come from the data module
        assert whole.round_sizes() == (4, len(sinusoid_data().population("train")))
        assert any(bool(c.abs().sum() > 0) for c in first.control().values())
        loaded = make(name, mlp().float(), **kwargs)
        loaded.load_state_dict(torch.load(tmp_path / "two.ckpt", weights_only=False)["state_dict"])
        for k, v in first.control().items():
            torch.testing.assert_close(loaded.control()[k], v, rtol=0, atol=0)
        for k, v in whole.control().items():
            torch.testing.assert_close(resumed.control()[k], v, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- bad arguments


def test_scaffold_population_that_contradicts_the_data_module_is_named():
    model = make("scaffold", mlp().float(), population=POPULATION, sampled_per_round=None)
    train = len(sinusoid_data().population("train"))
    with pytest.raises(ValueError, match=f"Expected `population` = {train} \\(the data module's\\), got {POPULATION}"):
        quiet_trainer(max_steps=1).fit(model, sinusoid_data())



@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (Ditto, {"lam": -0.1}, "`lam`"),
        (Ditto, {"personal_steps": -1}, "`personal_steps`"),
        (SCAFFOLD, {"local_lr": 0.0}, "`local_lr`"),
        (SCAFFOLD, {"inner_steps": 0}, "`inner_steps`"),
        (SCAFFOLD, {"population": 0}, "`population`"),
        (SCAFFOLD, {"population": 3, "sampled_per_round": 4}, "`sampled_per_round` <= `population` = 3, got 4"),
        (APFL, {"alpha_init": 1.5}, r"`alpha_init` in \[0.0, 1.0\], got 1.5"),
        (APFL, {"alpha_init": -0.1}, "`alpha_init`"),
        (APFL, {"alpha_lr": -1.0}, "`alpha_lr`"),
        (APFL, {"local_lr": -0.5}, "`local_lr`"),
    ],
)
def test_bad_arguments_are_named(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(mlp(), **kwargs)
