"""FedPer and FedRep: a shared body trained by the round, a personal head kept per client.

Each round is checked against the pure rules (``fedper_update``, ``fedrep_update``) called by hand
per client with the heads a hand-written store holds; the global head never moves and never leaves
the clients.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import pytest
import torch
from conftest import F64, FIT_WITHOUT_VALIDATION, client_task, loader, mlp, quiet_trainer, sinusoid_batch

from lightning_metafed.algorithms.fedper import FedPer
from lightning_metafed.algorithms.fedrep import FedRep
from lightning_metafed.data import SinusoidClients
from lightning_metafed.faults import ClientFaults
from lightning_metafed.functional.personalized import fedper_update, fedrep_update
from lightning_metafed.inner import SGD

HEAD = ["net.2.weight", "net.2.bias"]
BODY = ["net.0.weight", "net.0.bias"]
ALGORITHMS = [(FedPer, {"inner_steps": 3}), (FedRep, {"head_steps": 2, "body_steps": 2})]
IDS = [cls.__name__ for cls, _ in ALGORITHMS]


def make(cls, kwargs, net=None, **overrides):
    net = mlp() if net is None else net
    return cls(net, inner_optimizer=SGD(lr=0.05), server_optimizer=partial(torch.optim.SGD, lr=1.0), **kwargs, **overrides)


def with_ids(batch, ids):
    return replace(batch, client_id=torch.tensor(ids))


def rule(model, params, head, task):
    """The pure rule the module calls, by hand: ``(upload, aux, new head)`` of one client."""
    common = {"optimizer": model.inner_optimizer, "head_names": model.head_names, "use_query": model.use_query}
    if isinstance(model, FedRep):
        steps = {"head_steps": model.head_steps, "body_steps": model.body_steps}
        return fedrep_update(model.functional_loss, params, head, task, **steps, **common)
    return fedper_update(model.functional_loss, params, head, task, inner_steps=model.inner_steps, **common)


def net_state(model):
    return {k: p.detach().clone() for k, p in model.net.named_parameters()}


def hand_round(model, params, heads, batch, survive=None):
    """One round by hand: the survivors' rules from their heads (or the global head), the body moved
    by the weighted mean upload (server SGD(lr=1)), the survivors' new heads stored."""
    ids = batch.client_id.tolist()
    keep = [i for i in range(len(ids)) if survive is None or bool(survive[i])]
    uploads, weights = [], batch.weight[keep]
    for i in keep:
        head = heads.get(ids[i], {n: params[n] for n in model.head_names})
        upload, _, new_head = rule(model, params, head, client_task(batch, i))
        uploads.append(upload)
        heads[ids[i]] = new_head
    mean = {k: sum(w * u[k] for w, u in zip(weights, uploads)) / weights.sum() for k in uploads[0]}
    return {k: v - mean[k] if k in mean else v for k, v in params.items()}, heads


def assert_rows(model, heads):
    ids = sorted(heads)
    rows = model.client_state.gather(ids)
    for j, key in enumerate(ids):
        for name in model.head_names:
            torch.testing.assert_close(rows[name][j], heads[key][name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls,kwargs", ALGORITHMS, ids=IDS)
def test_client_updates_equal_the_pure_rule_and_vmap_equals_the_loop(cls, kwargs):
    batch = with_ids(sinusoid_batch(4, seed=1), [5, 1, 8, 2])
    g = torch.Generator().manual_seed(0)
    global_head = {n: p for n, p in net_state(make(cls, kwargs)).items() if n.startswith("2.")}
    stored = {5: {n: p + 0.3 * torch.randn(p.shape, generator=g, dtype=F64) for n, p in global_head.items()}}
    results = {}
    for vectorize in (True, False):
        model = make(cls, kwargs, vectorize=vectorize)
        model.client_state.write([5], {n: v[None] for n, v in stored[5].items()})
        results[vectorize] = model.client_updates(batch)
        params, heads = net_state(model), {5: stored[5]}
        for i, key in enumerate([5, 1, 8, 2]):
            head = heads.get(key, {n: params[n] for n in model.head_names})
            upload, _, _ = rule(model, params, head, client_task(batch, i))
            for name in upload:
                torch.testing.assert_close(results[vectorize][f"net.{name}"][i], upload[name], rtol=0, atol=1e-12)
        aggregate, _ = model.round_gradients(batch)  # writes .grad (body only) and the new heads
        want, want_heads = hand_round(model, params, dict(heads), batch)
        for name in BODY:
            torch.testing.assert_close(aggregate[name], params[name[4:]] - want[name[4:]], rtol=0, atol=1e-12)
        assert all(model.net.get_parameter(n[4:]).grad is None for n in HEAD)
        assert_rows(model, want_heads)
    assert set(results[True]) == set(BODY)  # no head entry is uploaded
    for name in BODY:
        torch.testing.assert_close(results[True][name], results[False][name], rtol=0, atol=1e-12)


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("cls,kwargs", ALGORITHMS, ids=IDS)
@pytest.mark.parametrize("max_resident_rows", [None, 1])
def test_two_rounds_move_the_body_keep_the_global_head_and_store_the_new_heads(cls, kwargs, max_resident_rows):
    batches = [with_ids(sinusoid_batch(3, seed=0), [0, 1, 2]), with_ids(sinusoid_batch(3, seed=1), [2, 3, 4])]
    model = make(cls, kwargs, max_resident_rows=max_resident_rows)
    params, heads = net_state(model), {}
    quiet_trainer(max_steps=2).fit(model, loader(*batches))
    for batch in batches:  # client 2 starts round 1 from the head it kept in round 0
        params, heads = hand_round(model, params, heads, batch)
    for name, value in model.net.named_parameters():
        torch.testing.assert_close(value.detach(), params[name], rtol=0, atol=1e-12)
    torch.testing.assert_close(model.net[2].weight.detach(), mlp()[2].weight.detach(), rtol=0, atol=0)
    assert len(model.client_state) == 5 and sorted(heads) == [0, 1, 2, 3, 4]
    assert_rows(model, heads)
    body_bytes = sum(model.net.get_parameter(n[4:]).numel() for n in BODY) * 8
    assert model.communication["upload_bytes"] == 2 * 3 * body_bytes  # survivors x rounds x body only
    assert model.ledgers.communication.last["upload_bytes_per_client"] == body_bytes


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("cls,kwargs", ALGORITHMS, ids=IDS)
def test_a_dropped_client_keeps_its_old_head(cls, kwargs):
    faults = ClientFaults(dropout=0.4, seed=2)  # round 0 drops client 1, round 1 drops clients 0 and 2
    survive = [~faults.dropped(r, 5) for r in range(2)]
    assert survive[0].tolist() == [True, False, True, True, True] and survive[1].tolist() == [False, True, False, True, True]
    batches = [with_ids(sinusoid_batch(5, seed=r), [0, 1, 2, 3, 4]) for r in range(2)]
    model = make(cls, kwargs, faults=faults)
    params, heads = net_state(model), {}
    quiet_trainer(max_steps=2).fit(model, loader(*batches))
    params, heads = hand_round(model, params, heads, batches[0], survive[0])
    after_first = {k: dict(v) for k, v in heads.items()}
    params, heads = hand_round(model, params, heads, batches[1], survive[1])
    assert_rows(model, heads)
    for key in (0, 2):
        for name in model.head_names:
            torch.testing.assert_close(heads[key][name], after_first[key][name], rtol=0, atol=0)
    for name, value in model.net.named_parameters():
        torch.testing.assert_close(value.detach(), params[name], rtol=0, atol=1e-12)


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("cls,kwargs", ALGORITHMS, ids=IDS)
def test_evaluation_starts_a_trained_client_from_its_head_and_an_unseen_one_from_the_global_head(cls, kwargs):
    model = make(cls, kwargs)
    quiet_trainer(max_steps=1).fit(model, loader(with_ids(sinusoid_batch(3), [0, 1, 2])))
    batch = with_ids(sinusoid_batch(2, seed=4), [0, 99])
    start = model.personalize(batch, steps=0)
    stored = model.client_state.gather([0])
    for name in model.head_names:
        torch.testing.assert_close(start[name][0], stored[name][0], rtol=0, atol=0)
        torch.testing.assert_close(start[name][1], model.net.get_parameter(name).detach(), rtol=0, atol=0)
        assert not torch.allclose(start[name][0], start[name][1])
    for name in BODY:
        torch.testing.assert_close(start[name[4:]], model.net.get_parameter(name[4:]).detach().expand_as(start[name[4:]]))
    adapted = model.personalize(batch)
    if cls is FedRep:  # evaluation adapts the head only, as FedRep's first phase does
        for name in BODY:
            torch.testing.assert_close(adapted[name[4:]], start[name[4:]], rtol=0, atol=0)
    assert len(model.client_state) == 3  # evaluating an unseen client stores nothing
    metrics = quiet_trainer(limit_val_batches=1.0).validate(model, loader(batch), verbose=False)[0]
    assert metrics and all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("cls,kwargs", ALGORITHMS, ids=IDS)
def test_a_resumed_fit_restores_the_store_and_equals_the_uninterrupted_one(cls, kwargs, tmp_path):
    def data():
        return SinusoidClients(num_clients=10, clients_per_round=4, support_size=5, query_size=5, rounds_per_epoch=2, seed=2)

    whole = make(cls, kwargs, net=mlp().float())
    quiet_trainer(max_steps=4).fit(whole, data())
    first = make(cls, kwargs, net=mlp().float())
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(first, data())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    restored = make(cls, kwargs, net=mlp().float())
    quiet_trainer(max_steps=2).fit(restored, data(), ckpt_path=tmp_path / "two.ckpt", weights_only=False)
    ids = sorted(first.client_state.rows)
    assert sorted(restored.client_state.rows) == ids
    for name, value in first.client_state.gather(ids).items():
        torch.testing.assert_close(restored.client_state.gather(ids)[name], value, rtol=0, atol=0)
    resumed = make(cls, kwargs, net=mlp().float())
    quiet_trainer(max_steps=4).fit(resumed, data(), ckpt_path=tmp_path / "two.ckpt", weights_only=False)
    ids = sorted(whole.client_state.rows)
    assert sorted(resumed.client_state.rows) == ids and len(ids) > len(first.client_state)
    for name, value in whole.client_state.gather(ids).items():
        torch.testing.assert_close(resumed.client_state.gather(ids)[name], value, rtol=0, atol=1e-6)
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_the_default_head_is_the_last_layer_and_patterns_select_others():
    assert FedPer(mlp()).head_names == ["2.weight", "2.bias"]
    assert FedRep(mlp(), head_params="2.weight").head_names == ["2.weight"]
    assert FedRep(mlp(), head_params=["0.*"]).head_names == ["0.weight", "0.bias"]
    assert FedRep(mlp(), head_steps=2, body_steps=3).local_step_bound() == ("body_steps", 3)
    assert FedRep(mlp(), head_steps=4, body_steps=0).local_step_bound() == ("head_steps", 4)
    assert FedPer(mlp(), inner_steps=4).local_step_bound() == ("inner_steps", 4)


@pytest.mark.parametrize(
    "make_bad,match",
    [
        (lambda: FedPer(mlp(), head_params=["classifier.*"]), r"'classifier\.\*' in `head_params` matches no parameter"),
        (lambda: FedRep(mlp(), head_params="*"), r"`head_params` to leave at least one parameter in the shared body"),
        (lambda: FedRep(mlp(), body_steps=-1), r"`body_steps` to be an integer >= 0, got -1"),
        (lambda: FedRep(mlp(), head_steps=0), r"`head_steps` to be an integer >= 1, got 0"),
        (lambda: FedRep(mlp(), inner_steps=3), r"`inner_steps` is not used.*got 3"),
        (lambda: FedPer(mlp(), inner_steps=0), r"`inner_steps` to be an integer >= 1, got 0"),
        (lambda: FedPer(mlp(), max_resident_rows=-1), r"`max_resident_rows` to be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(make_bad, match):
    with pytest.raises(ValueError, match=match):
        make_bad()
