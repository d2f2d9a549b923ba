"""Personalized client updates in ``lightning_metafed.functional.personalized`` against hand-written
plain-autograd loops over two consecutive rounds of one client, and vmap over clients against a loop."""

from __future__ import annotations

import pytest
import torch
from conftest import F64, autograd_grad, client_task, mlp_problem, padded_task, plain_mse, stack_results

from lightning_metafed.functional import ClientTask, fedavg_update
from lightning_metafed.functional.personalized import (
    APFL_ALPHA_KEY,
    CONTROL_PREFIX,
    apfl_update,
    ditto_update,
    fedper_update,
    fedrep_update,
    scaffold_server_control,
    scaffold_update,
    split_control,
)
from lightning_metafed.inner import SGD

HEAD = ["2.weight", "2.bias"]
BODY = ["0.weight", "0.bias"]


# ------------------------------------------------------------------------------------- helpers


def _perturbed(params, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}


def _local(task):
    return torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])


def _sgd_loop(net, model, x, y, *, lr, steps, names, momentum=0.0):
    """``steps`` steps of (momentum) SGD on ``names`` of ``model``, gradients by plain autograd."""
    model = dict(model)
    buf = {n: torch.zeros_like(model[n]) for n in names}
    for _ in range(steps):
        g = autograd_grad(net, model, x, y)
        for n in names:
            buf[n] = momentum * buf[n] + g[n]
            model[n] = model[n] - lr * buf[n]
    return model


def _two_tasks(seed):
    net, loss_fn, params, task1 = mlp_problem(seed=seed)
    task2 = mlp_problem(seed=seed + 100)[3]
    return net, loss_fn, params, (task1, task2)


def _server_step(params, update):
    return {k: params[k] - update[k] if k in update else params[k] for k in params}


# --------------------------------------------------------------------------- FedPer and FedRep


def test_fedper_two_rounds_equal_hand_loop():
    net, loss_fn, params, tasks = _two_tasks(seed=1)
    head = {k: v for k, v in _perturbed(params, 10).items() if k in HEAD}
    opt, lr, mu, steps = SGD(lr=0.1, momentum=0.5), 0.1, 0.5, 3
    theta, state, ref_theta, ref_head = dict(params), dict(head), dict(params), dict(head)
    for task in tasks:
        upload, aux, state = fedper_update(loss_fn, theta, state, task, optimizer=opt, inner_steps=steps, head_names=HEAD)
        x, y = _local(task)
        start = {**{k: ref_theta[k] for k in BODY}, **ref_head}
        final = _sgd_loop(net, start, x, y, lr=lr, steps=steps, names=list(start), momentum=mu)
        expected = {k: ref_theta[k] - final[k] for k in BODY}
        torch.testing.assert_close(upload, expected)
        assert set(upload) == set(BODY)
        ref_head = {k: final[k] for k in HEAD}
        torch.testing.assert_close(state, ref_head)
        torch.testing.assert_close(aux["support_loss"], plain_mse(net, start, x, y))
        torch.testing.assert_close(aux["query_loss"], plain_mse(net, final, task.query_x, task.query_y))
        theta, ref_theta = _server_step(theta, upload), _server_step(ref_theta, expected)


def test_fedrep_two_rounds_equal_hand_loop():
    net, loss_fn, params, tasks = _two_tasks(seed=2)
    head = {k: v for k, v in _perturbed(params, 20).items() if k in HEAD}
    lr, head_steps, body_steps = 0.15, 3, 2
    theta, state, ref_theta, ref_head = dict(params), dict(head), dict(params), dict(head)
    for task in tasks:
        upload, aux, state = fedrep_update(
            loss_fn, theta, state, task, optimizer=SGD(lr=lr), head_steps=head_steps, body_steps=body_steps, head_names=HEAD
        )
        x, y = _local(task)
        start = {**{k: ref_theta[k] for k in BODY}, **ref_head}
        mid = _sgd_loop(net, start, x, y, lr=lr, steps=head_steps, names=HEAD)
        final = _sgd_loop(net, mid, x, y, lr=lr, steps=body_steps, names=BODY)
        expected = {k: ref_theta[k] - final[k] for k in BODY}
        torch.testing.assert_close(upload, expected)
        assert set(upload) == set(BODY)
        ref_head = {k: mid[k] for k in HEAD}
        torch.testing.assert_close(state, ref_head)
        torch.testing.assert_close(aux["support_loss"], plain_mse(net, start, x, y))
        theta, ref_theta = _server_step(theta, upload), _server_step(ref_theta, expected)


def test_fedper_ignores_the_global_head_and_checks_head_names():
    _, loss_fn, params, task = mlp_problem(seed=3)
    head = {k: params[k] + 1.0 for k in HEAD}
    other = {**params, **{k: params[k] - 5.0 for k in HEAD}}
    kwargs = {"optimizer": SGD(lr=0.1), "inner_steps": 2, "head_names": HEAD}
    torch.testing.assert_close(fedper_update(loss_fn, params, head, task, **kwargs),
                               fedper_update(loss_fn, other, head, task, **kwargs))
    with pytest.raises(ValueError, match="head_names"):
        fedper_update(loss_fn, params, {"2.weight": head["2.weight"]}, task, **kwargs)


# ----------------------------------------------------------------------------------------- Ditto


def test_ditto_two_rounds_equal_hand_loop():
    net, loss_fn, params, tasks = _two_tasks(seed=4)
    personal = _perturbed(params, 40)
    lr, plr, lam, steps, psteps = 0.1, 0.05, 0.7, 2, 3
    theta, state, ref_theta, ref_v = dict(params), dict(personal), dict(params), dict(personal)
    for task in tasks:
        upload, aux, state = ditto_update(
            loss_fn, theta, state, task, optimizer=SGD(lr=lr), inner_steps=steps, personal_steps=psteps, lam=lam,
            personal_optimizer=SGD(lr=plr),
        )
        x, y = _local(task)
        w = _sgd_loop(net, ref_theta, x, y, lr=lr, steps=steps, names=list(params))
        expected = {k: ref_theta[k] - w[k] for k in params}
        start_v = dict(ref_v)
        for _ in range(psteps):
            g = autograd_grad(net, ref_v, x, y)
            ref_v = {k: ref_v[k] - plr * (g[k] + lam * (ref_v[k] - ref_theta[k])) for k in params}
        torch.testing.assert_close(upload, expected)
        torch.testing.assert_close(state, ref_v)
        proximal = sum(((start_v[k] - ref_theta[k]) ** 2).sum() for k in params)
        torch.testing.assert_close(aux["personal_loss"], plain_mse(net, start_v, x, y) + 0.5 * lam * proximal)
        torch.testing.assert_close(aux["query_loss"], plain_mse(net, ref_v, task.query_x, task.query_y))
        # server SGD with lr 0.5
        theta = _server_step(theta, {k: 0.5 * v for k, v in upload.items()})
        ref_theta = _server_step(ref_theta, {k: 0.5 * v for k, v in expected.items()})


def test_ditto_lambda_zero_is_plain_local_training_of_the_personal_model():
    net, loss_fn, params, task = mlp_problem(seed=5)
    personal = _perturbed(params, 50)
    _, _, v = ditto_update(loss_fn, params, personal, task, optimizer=SGD(lr=0.1, momentum=0.9), inner_steps=1,
                           personal_steps=4, lam=0.0)
    x, y = _local(task)
    torch.testing.assert_close(v, _sgd_loop(net, personal, x, y, lr=0.1, steps=4, names=list(params), momentum=0.9))
    _, _, pulled = ditto_update(loss_fn, params, personal, task, optimizer=SGD(lr=0.1), inner_steps=1,
                                personal_steps=4, lam=1.0)
    assert not torch.allclose(pulled["0.weight"], v["0.weight"])
    with pytest.raises(ValueError, match="lam"):
        ditto_update(loss_fn, params, personal, task, optimizer=SGD(lr=0.1), inner_steps=1, personal_steps=1, lam=-1.0)


# -------------------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_two_rounds_equal_hand_loop():
    net, loss_fn, params, tasks = _two_tasks(seed=6)
    control = {k: 0.1 * v for k, v in _perturbed(params, 60, scale=1.0).items()}
    server = {k: 0.1 * v for k, v in _perturbed(params, 61, scale=1.0).items()}
    lr, steps, population = 0.1, 3, 4
    theta, c_i, c = dict(params), dict(control), dict(server)
    ref_theta, ref_ci, ref_c = dict(params), dict(control), dict(server)
    for task in tasks:
        upload, aux, c_i = scaffold_update(loss_fn, theta, c_i, task, lr=lr, inner_steps=steps, server_control=c)
        x, y = _local(task)
        local = dict(ref_theta)
        for _ in range(steps):
            g = autograd_grad(net, local, x, y)
            local = {k: local[k] - lr * (g[k] - ref_ci[k] + ref_c[k]) for k in local}
        new_ci = {k: ref_ci[k] - ref_c[k] + (ref_theta[k] - local[k]) / (steps * lr) for k in local}
        expected = {k: ref_theta[k] - local[k] for k in local}
        expected.update({CONTROL_PREFIX + k: new_ci[k] - ref_ci[k] for k in local})
        torch.testing.assert_close(upload, expected)
        torch.testing.assert_close(c_i, new_ci)
        torch.testing.assert_close(aux["support_loss"], plain_mse(net, ref_theta, x, y))
        update, delta = split_control(upload)
        theta, c = _server_step(theta, update), scaffold_server_control(c, delta, 1, population)
        ref_theta = {k: ref_theta[k] - (ref_theta[k] - local[k]) for k in local}
        ref_c = {k: ref_c[k] + (new_ci[k] - ref_ci[k]) / population for k in local}
        ref_ci = new_ci


def test_scaffold_zero_controls_is_fedavg_local_sgd():
    _, loss_fn, params, task = mlp_problem(seed=7)
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    lr, steps = 0.2, 4
    upload, _, c_i = scaffold_update(loss_fn, params, zeros, task, lr=lr, inner_steps=steps, server_control=zeros)
    update, delta = split_control(upload)
    expected, _ = fedavg_update(loss_fn, params, task, optimizer=SGD(lr=lr), local_epochs=steps)
    torch.testing.assert_close(update, expected)
    torch.testing.assert_close(delta, {k: v / (steps * lr) for k, v in expected.items()})
    torch.testing.assert_close(c_i, delta)


def test_scaffold_server_control_formula():
    c = {"w": torch.tensor([1.0, -2.0], dtype=F64)}
    delta = {"w": torch.tensor([0.4, 0.8], dtype=F64)}
    out = scaffold_server_control(c, delta, sampled=5, population=20)
    torch.testing.assert_close(out["w"], torch.tensor([1.1, -1.8], dtype=F64))
    with pytest.raises(ValueError, match="sampled"):
        scaffold_server_control(c, delta, sampled=0, population=20)
    with pytest.raises(ValueError, match="inner_steps"):
        _, loss_fn, params, task = mlp_problem(seed=8)
        scaffold_update(loss_fn, params, params, task, lr=0.1, inner_steps=0, server_control=params)


# ------------------------------------------------------------------------------------------ APFL


def test_apfl_two_rounds_equal_hand_loop():
    net, loss_fn, params, tasks = _two_tasks(seed=9)
    state = {**_perturbed(params, 90), APFL_ALPHA_KEY: torch.tensor(0.4, dtype=F64)}
    lr, alpha_lr, steps = 0.1, 0.5, 3
    theta, ref_theta = dict(params), dict(params)
    ref_v, ref_a = {k: state[k] for k in params}, state[APFL_ALPHA_KEY]
    for task in tasks:
        upload, aux, state = apfl_update(loss_fn, theta, state, task, lr=lr, inner_steps=steps, alpha_lr=alpha_lr)
        x, y = _local(task)
        w = dict(ref_theta)
        for _ in range(steps):
            g_w = autograd_grad(net, w, x, y)
            v_leaf = {k: t.clone().requires_grad_(True) for k, t in ref_v.items()}
            a_leaf = ref_a.clone().requires_grad_(True)
            mixed = {k: a_leaf * v_leaf[k] + (1 - a_leaf) * w[k] for k in w}
            *g_v, g_a = torch.autograd.grad(plain_mse(net, mixed, x, y), [*v_leaf.values(), a_leaf])
            w = {k: w[k] - lr * g_w[k] for k in w}
            ref_v = {k: ref_v[k] - lr * gv for k, gv in zip(ref_v, g_v)}
            ref_a = (ref_a - alpha_lr * g_a).clamp(0, 1)
        expected = {k: ref_theta[k] - w[k] for k in w}
        torch.testing.assert_close(upload, expected)
        torch.testing.assert_close(state, {**ref_v, APFL_ALPHA_KEY: ref_a})
        mixed = {k: ref_a * ref_v[k] + (1 - ref_a) * w[k] for k in w}
        torch.testing.assert_close(aux["query_loss"], plain_mse(net, mixed, task.query_x, task.query_y))
        theta, ref_theta = _server_step(theta, upload), _server_step(ref_theta, expected)
    assert 0.0 < float(state[APFL_ALPHA_KEY]) < 1.0


def test_apfl_alpha_is_clamped_to_the_unit_interval():
    _, loss_fn, params, task = mlp_problem(seed=10)
    state = {**_perturbed(params, 100, scale=2.0), APFL_ALPHA_KEY: torch.tensor(0.5, dtype=F64)}
    _, _, new = apfl_update(loss_fn, params, state, task, lr=0.05, inner_steps=2, alpha_lr=1e6)
    assert float(new[APFL_ALPHA_KEY]) in (0.0, 1.0)
    outside = {**state, APFL_ALPHA_KEY: torch.tensor(1.5, dtype=F64)}
    _, _, kept = apfl_update(loss_fn, params, outside, task, lr=0.05, inner_steps=0, alpha_lr=0.0)
    assert float(kept[APFL_ALPHA_KEY]) == 1.0
    with pytest.raises(ValueError, match="alpha_lr"):
        apfl_update(loss_fn, params, state, task, lr=0.1, inner_steps=1, alpha_lr=-0.1)
    with pytest.raises(ValueError, match=APFL_ALPHA_KEY):
        apfl_update(loss_fn, {**params, APFL_ALPHA_KEY: torch.tensor(0.0)}, state, task, lr=0.1, inner_steps=1,
                    alpha_lr=0.1)


# ------------------------------------------------------------------------ vmap, masks and budgets


def _rules():
    server_control = lambda p: {k: 0.05 * torch.ones_like(v) for k, v in p.items()}
    return {
        "fedper": (lambda lf, p, s, t: fedper_update(lf, p, s, t, optimizer=SGD(lr=0.1, momentum=0.5), inner_steps=3,
                                                     head_names=HEAD),
                   lambda p, seed: {k: v for k, v in _perturbed(p, seed).items() if k in HEAD}),
        "fedrep": (lambda lf, p, s, t: fedrep_update(lf, p, s, t, optimizer=SGD(lr=0.1), head_steps=2, body_steps=2,
                                                     head_names=HEAD),
                   lambda p, seed: {k: v for k, v in _perturbed(p, seed).items() if k in HEAD}),
        "ditto": (lambda lf, p, s, t: ditto_update(lf, p, s, t, optimizer=SGD(lr=0.1), inner_steps=2, personal_steps=3,
                                                   lam=0.5),
                  lambda p, seed: _perturbed(p, seed)),
        "scaffold": (lambda lf, p, s, t: scaffold_update(lf, p, s, t, lr=0.1, inner_steps=3, server_control=server_control(p)),
                     lambda p, seed: {k: 0.1 * v for k, v in _perturbed(p, seed, scale=1.0).items()}),
        "apfl": (lambda lf, p, s, t: apfl_update(lf, p, s, t, lr=0.1, inner_steps=3, alpha_lr=0.2),
                 lambda p, seed: {**_perturbed(p, seed), APFL_ALPHA_KEY: torch.tensor(0.2 + 0.2 * (seed % 3), dtype=F64)}),
    }


def _stacked_tasks(m, seed, support=5, query=6):
    torch.manual_seed(seed)
    x = torch.rand(m, support + query, 1, dtype=F64) * 4 - 2
    y = (torch.rand(m, 1, 1, dtype=F64) * 2 + 0.5) * torch.sin(x + torch.rand(m, 1, 1, dtype=F64))
    return ClientTask(x[:, :support], y[:, :support], x[:, support:], y[:, support:])


@pytest.mark.parametrize("rule", list(_rules()))
def test_vmap_over_clients_equals_loop(rule):
    fn, make_state = _rules()[rule]
    _, loss_fn, params, _ = mlp_problem(seed=11)
    tasks = _stacked_tasks(3, seed=12)
    rows = [make_state(params, 120 + i) for i in range(3)]
    batched = torch.func.vmap(lambda t, s: fn(loss_fn, params, s, t), in_dims=(ClientTask(0, 0, 0, 0, None, None), 0))(
        tasks, stack_results(rows)
    )
    looped = stack_results([fn(loss_fn, params, rows[i], client_task(tasks, i)) for i in range(3)])
    torch.testing.assert_close(batched, looped)
    first = next(iter(batched[2].values()))
    assert not torch.allclose(first[0], first[1])


@pytest.mark.parametrize("rule", list(_rules()))
def test_budgets_under_vmap_equal_integer_budgets(rule):
    fn, make_state = _rules()[rule]
    _, loss_fn, params, _ = mlp_problem(seed=13)
    budget = torch.tensor([3, 1, 0])
    tasks = _stacked_tasks(3, seed=14)._replace(num_steps=budget)
    rows = [make_state(params, 130 + i) for i in range(3)]
    batched = torch.func.vmap(lambda t, s: fn(loss_fn, params, s, t), in_dims=(ClientTask(0, 0, 0, 0, None, None, 0), 0))(
        tasks, stack_results(rows)
    )
    looped = stack_results([fn(loss_fn, params, rows[i], client_task(tasks, i)._replace(num_steps=int(budget[i])))
                     for i in range(3)])
    torch.testing.assert_close(batched, looped)
    # a client without steps uploads nothing and keeps its state
    torch.testing.assert_close({k: v[2] for k, v in batched[0].items()}, {k: torch.zeros_like(v[2]) for k, v in batched[0].items()})
    torch.testing.assert_close({k: v[2] for k, v in batched[2].items()}, rows[2])


@pytest.mark.parametrize("rule", list(_rules()))
def test_masked_padding_does_not_change_the_result(rule):
    fn, make_state = _rules()[rule]
    _, loss_fn, params, task = mlp_problem(seed=15, support=4, query=4)
    padded = padded_task(task, 150)
    state = make_state(params, 151)
    torch.testing.assert_close(fn(loss_fn, params, state, padded), fn(loss_fn, params, state, task))
    unmasked = fn(loss_fn, params, state, padded._replace(support_mask=None, query_mask=None))
    assert not torch.allclose(next(iter(unmasked[0].values())), next(iter(fn(loss_fn, params, state, task)[0].values())))
