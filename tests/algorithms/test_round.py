"""The communication round: client updates, aggregation, server step, vmap vs loop, fast path."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, classification_batch, loader, mlp, quiet_trainer, sinusoid_batch
from torch import nn

import lightning_metafed as lm
from lightning_metafed.inner import SGD, Adam

pytestmark = FIT_WITHOUT_VALIDATION  # the rounds here fit on bare training loaders

SERVER_SGD_1 = functools.partial(torch.optim.SGD, lr=1.0)


# Each entry builds one algorithm on a float64 regression net.
ALGORITHMS = {
    "maml": lambda **kw: lm.MAML(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=2, **kw),
    "fomaml": lambda **kw: lm.MAML(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=2, first_order=True, **kw),
    "maml_adam": lambda **kw: lm.MAML(mlp(), inner_optimizer=Adam(lr=0.01), inner_steps=2, **kw),
    "metasgd": lambda **kw: lm.MetaSGD(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=2, **kw),
    "metasgd_tensor": lambda **kw: lm.MetaSGD(mlp(), inner_optimizer=SGD(lr=0.05), lr_granularity="tensor", **kw),
    "anil": lambda **kw: lm.ANIL(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=2, **kw),
    "reptile": lambda **kw: lm.Reptile(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=3, **kw),
    "perfedavg_fo": lambda **kw: lm.PerFedAvg(mlp(), inner_optimizer=SGD(lr=0.05), variant="fo", local_steps=2, **kw),
    "perfedavg_hf": lambda **kw: lm.PerFedAvg(mlp(), inner_optimizer=SGD(lr=0.05), variant="hf", local_steps=2, **kw),
    "fedavg": lambda **kw: lm.FedAvg(mlp(), inner_optimizer=SGD(lr=0.05), local_epochs=2, local_batch_size=4, **kw),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_vmap_equals_loop(name):
    batch = sinusoid_batch(5)
    vec = ALGORITHMS[name](vectorize=True)
    loop = ALGORITHMS[name](vectorize=False)
    u_vec = vec.client_updates(batch)
    u_loop = loop.client_updates(batch)
    assert set(u_vec) == {n for n, _ in vec.named_parameters()}
    for key in u_vec:
        assert u_vec[key].shape == (5, *dict(vec.named_parameters())[key].shape)
        torch.testing.assert_close(u_vec[key], u_loop[key])
    assert any(u.abs().sum() > 0 for u in u_vec.values())
    assert vec.runner.vmap_error is None


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_training_step_with_server_sgd_applies_minus_weighted_mean(name):
    batch = sinusoid_batch(4)
    model = ALGORITHMS[name](server_optimizer=SERVER_SGD_1)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    updates = model.client_updates(batch)
    quiet_trainer(max_steps=1).fit(model, loader(batch))
    w = batch.weight / batch.weight.sum()
    for key, p in model.named_parameters():
        expected = before[key] - torch.einsum("m,m...->...", w, updates[key])
        torch.testing.assert_close(p.detach(), expected)
    assert model.global_step == 1


@pytest.mark.parametrize("name", ["maml", "fomaml", "maml_adam", "metasgd", "anil"])
@pytest.mark.parametrize("weighted", [True, False])
def test_fast_path_equals_explicit_path(name, weighted):
    batch = sinusoid_batch(4)
    results = []
    for fast in (True, False):
        model = ALGORITHMS[name](server_optimizer=SERVER_SGD_1, fast_path=fast, aggregator=lm.Mean(weighted=weighted))
        assert model._use_fast_path() is fast
        quiet_trainer(max_steps=1).fit(model, loader(batch))
        results.append({k: p.detach().clone() for k, p in model.named_parameters()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key])
    # the weights matter: weighted and unweighted rounds differ
    if weighted:
        other = ALGORITHMS[name](server_optimizer=SERVER_SGD_1, aggregator=lm.Mean(weighted=False))
        quiet_trainer(max_steps=1).fit(other, loader(batch))
        assert not torch.allclose(other.net[0].weight, results[0]["net.0.weight"])


def test_client_chunk_size_gives_identical_updates():
    batch = sinusoid_batch(7)
    full = ALGORITHMS["maml"]().client_updates(batch)
    chunked = ALGORITHMS["maml"](client_chunk_size=3).client_updates(batch)
    for key in full:
        torch.testing.assert_close(full[key], chunked[key])


def test_meta_sgd_uploads_and_learns_inner_lrs():
    model = ALGORITHMS["metasgd"](server_optimizer=SERVER_SGD_1)
    batch = sinusoid_batch(4)
    updates = model.client_updates(batch)
    lr_keys = [k for k in updates if k.startswith("inner_lrs.")]
    assert sorted(lr_keys) == sorted("inner_lrs." + n.replace(".", "__") for n, _ in model.net.named_parameters())
    assert all(updates[k].abs().sum() > 0 for k in lr_keys)
    before = model.inner_lrs["0__weight"].detach().clone()
    torch.testing.assert_close(before, torch.full_like(before, 0.05))
    quiet_trainer(max_steps=1).fit(model, loader(batch))
    assert not torch.allclose(model.inner_lrs["0__weight"].detach(), before)


def test_server_adam_state_persists_across_rounds():
    model = ALGORITHMS["maml"](server_optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    t = quiet_trainer(max_steps=3)
    t.fit(model, loader(*[sinusoid_batch(4, seed=s) for s in range(3)]))
    opt = t.optimizers[0]
    states = [opt.state[p] for p in model.parameters()]
    assert all(int(s["step"]) == 3 for s in states)


def test_resume_from_checkpoint_restores_server_optimizer(tmp_path):
    batches = loader(*[sinusoid_batch(4, seed=s) for s in range(2)])
    straight = ALGORITHMS["metasgd"]()
    quiet_trainer(max_epochs=2).fit(straight, batches)

    first = ALGORITHMS["metasgd"]()
    t1 = quiet_trainer(max_epochs=1)
    t1.fit(first, batches)
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = ALGORITHMS["metasgd"]()  # fresh parameters and server optimizer: all must come from the checkpoint
    t2 = quiet_trainer(max_epochs=2)
    t2.fit(resumed, batches, ckpt_path=ckpt)
    assert resumed.global_step == 4
    assert int(t2.optimizers[0].state[resumed.net[0].weight]["step"]) == 4
    for (k, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, msg=k)


def test_vmap_failure_falls_back_to_loop_with_warning():
    class ItemNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1).double()

        def forward(self, x):
            if x.sum().item() > -1e9:  # data-dependent Python control flow: vmap cannot batch .item()
                return self.lin(x)
            return -self.lin(x)

    batch = sinusoid_batch(3)
    torch.manual_seed(0)
    vec = lm.MAML(ItemNet(), inner_optimizer=SGD(lr=0.05))
    torch.manual_seed(0)
    loop = lm.MAML(ItemNet(), inner_optimizer=SGD(lr=0.05), vectorize=False)
    with pytest.warns(UserWarning, match="falling back to a per-client loop"):
        u_vec = vec.client_updates(batch)
    assert vec.runner.vmap_error is not None and "item" in vec.runner.vmap_error.lower()
    u_loop = loop.client_updates(batch)
    for key in u_loop:
        torch.testing.assert_close(u_vec[key], u_loop[key])


def test_nonfinite_aggregate_raises_before_the_server_step():
    batch = sinusoid_batch(3)
    batch.support_y[1, 0, 0] = float("nan")
    model = ALGORITHMS["maml"](fast_path=False, reject_nonfinite=False)
    before = model.net[0].weight.detach().clone()
    with pytest.raises(FloatingPointError, match="not finite"):
        quiet_trainer(max_steps=1).fit(model, loader(batch))
    torch.testing.assert_close(model.net[0].weight.detach(), before)


def test_classification_round_uses_cross_entropy():
    batch = classification_batch(3)
    model = lm.MAML(mlp(4, 8, 3), inner_optimizer=SGD(lr=0.1), task="classification", server_optimizer=SERVER_SGD_1)
    updates = model.client_updates(batch)
    # reference: one client's MAML gradient with cross-entropy by plain autograd
    net = model.net
    sx, sy, qx, qy = batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0]
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    ls = nn.functional.cross_entropy(net(sx), sy)
    grads = torch.autograd.grad(ls, params, create_graph=True)
    fast = {n: p - 0.1 * g for n, p, g in zip(names, params, grads)}
    lq = nn.functional.cross_entropy(torch.func.functional_call(net, fast, (qx,)), qy)
    expected = torch.autograd.grad(lq, params)
    for n, e in zip(names, expected):
        torch.testing.assert_close(updates["net." + n][0], e)


@pytest.mark.parametrize("name", ["maml", "metasgd", "anil"])
def test_chunked_fast_path_equals_unchunked(name):
    batch = sinusoid_batch(7)
    results = []
    for chunk in (None, 3):
        model = ALGORITHMS[name](server_optimizer=SERVER_SGD_1, client_chunk_size=chunk)
        assert model._use_fast_path()
        quiet_trainer(max_steps=1).fit(model, loader(batch))
        results.append({k: p.detach().clone() for k, p in model.named_parameters()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key])


def test_first_order_graph_memory_is_flat_in_inner_steps_and_second_order_grows_linearly():
    from lightning_metafed.diagnostics import graph_saved_bytes

    batch = sinusoid_batch(8, support=20)

    def graph_bytes(steps, first_order, chunk=None):
        model = lm.MAML(mlp(hidden=32), inner_optimizer=SGD(lr=0.01), inner_steps=steps, first_order=first_order)
        tasks = batch[: chunk or 8].tasks()
        losses, _ = model.map_clients(model.client_objective, (model.meta_parameters(),), tasks)
        return graph_saved_bytes(losses.sum())

    fo = [graph_bytes(k, True) for k in (1, 5, 20)]
    so = [graph_bytes(k, False) for k in (1, 5, 20)]
    assert fo[0] == fo[1] == fo[2]
    per_step = so[1] - so[0]
    assert per_step > 0 and so[2] - so[1] == pytest.approx(15 / 4 * per_step, rel=0.05)  # linear in steps
    assert graph_bytes(5, False, chunk=2) < 0.3 * so[1]  # a chunk of 2 of 8 clients holds about a quarter


def test_compiled_clients_equal_eager():
    batch = sinusoid_batch(4)
    eager = lm.MAML(mlp(hidden=4), inner_optimizer=SGD(lr=0.05), inner_steps=2)
    compiled = lm.MAML(mlp(hidden=4), inner_optimizer=SGD(lr=0.05), inner_steps=2, compile_clients=True)
    for model in (eager, compiled):
        model.round_gradients(batch)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert len(compiled.runner._compiled) == 1 and compiled.runner.vmap_error is None


def test_compile_clients_passes_a_torch_compile_mode_and_rejects_others(monkeypatch):
    import lightning_metafed.round.clients as clients

    modes = []
    monkeypatch.setattr(clients.torch, "compile", lambda fn, mode=None: modes.append(mode) or fn)
    batch = sinusoid_batch(4)
    eager = lm.MAML(mlp(hidden=4), inner_optimizer=SGD(lr=0.05), inner_steps=2)
    for setting in (True, "reduce-overhead"):
        model = lm.MAML(mlp(hidden=4), inner_optimizer=SGD(lr=0.05), inner_steps=2, compile_clients=setting)
        model.round_gradients(batch)
    assert modes == [None, "reduce-overhead"]
    eager.round_gradients(batch)
    for (name, a), (_, b) in zip(eager.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    with pytest.raises(ValueError, match="`compile_clients`.*'fast'"):
        lm.MAML(mlp(hidden=4), compile_clients="fast")
