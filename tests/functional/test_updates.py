"""Client-update rules in ``lightning_metafed.functional.updates`` against independent references:
central finite differences, the ``higher`` library, and hand-written plain-autograd loops."""

from __future__ import annotations

import higher
import pytest
import torch
from conftest import (
    F64,
    autograd_grad,
    client_task,
    finite_difference_grad,
    linear_problem,
    mlp_problem,
    padded_task,
    plain_mse,
    stack_results,
)

from lightning_metafed.functional import (
    ClientTask,
    anil_update,
    fedavg_update,
    hvp,
    maml_objective,
    maml_update,
    meta_sgd_update,
    per_fedavg_update,
    reptile_update,
    weighted_mean,
)
from lightning_metafed.inner import SGD, Adam

HEAD = ["2.weight", "2.bias"]


# ------------------------------------------------------------------------------------- helpers


def _higher_meta_grad(net, task, torch_optimizer, steps, names=None):
    """∇_θ L_query(θ_K) with ``higher``; the inner optimizer covers ``names`` (all by default)."""
    named = dict(net.named_parameters())
    names = list(named) if names is None else names
    opt = torch_optimizer([named[n] for n in names])
    with higher.innerloop_ctx(net, opt, copy_initial_weights=False, track_higher_grads=True) as (fnet, diffopt):
        for _ in range(steps):
            diffopt.step(((fnet(task.support_x) - task.support_y) ** 2).mean())
        query_loss = ((fnet(task.query_x) - task.query_y) ** 2).mean()
        grads = torch.autograd.grad(query_loss, list(net.parameters()))
    return dict(zip(named, grads))


def _flattened(params):
    """``(flat, unflatten)``: the parameters as one vector, and the map from such a vector back to a dict."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def unflatten(flat):
        return {k: c.reshape(s) for k, c, s in zip(names, flat.split(sizes), shapes)}

    return torch.cat([params[k].reshape(-1) for k in names]), unflatten


def _linear_grad(p, x, y):
    """Closed-form gradient of mean((x·w + b − y)²)."""
    r = x @ p["w"] + p["b"] - y
    n = x.shape[0]
    return {"w": 2.0 / n * x.T @ r, "b": 2.0 / n * r.sum()}


def _stacked_tasks(m: int, seed: int, inp: int = 1, support: int = 5, query: int = 6) -> ClientTask:
    torch.manual_seed(seed)
    x = torch.rand(m, support + query, inp, dtype=F64) * 4 - 2
    amp = torch.rand(m, 1, 1, dtype=F64) * 2 + 0.5
    y = amp * torch.sin(x.sum(-1, keepdim=True) + torch.rand(m, 1, 1, dtype=F64))
    return ClientTask(x[:, :support], y[:, :support], x[:, support:], y[:, support:])


# ------------------------------------------------------------------- MAML vs finite differences


@pytest.mark.parametrize(
    "optimizer, steps",
    [
        (SGD(lr=0.3), 1),
        (SGD(lr=0.2), 3),
        (Adam(lr=0.05, eps=1e-3), 2),
        (SGD(lr=0.1, momentum=0.9), 3),
        (SGD(lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.1), 2),
    ],
)
def test_maml_second_order_matches_finite_differences(optimizer, steps):
    _, loss_fn, params, task = mlp_problem(seed=1)
    meta, aux = maml_update(loss_fn, params, task, optimizer=optimizer, inner_steps=steps)

    def objective(p):
        return maml_objective(loss_fn, p, task, optimizer=optimizer, inner_steps=steps)[0]

    fd = finite_difference_grad(objective, params)
    torch.testing.assert_close(meta, fd, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(aux["query_loss"], objective(params))
    torch.testing.assert_close(aux["support_loss"], loss_fn(params, task.support_x, task.support_y, None))


def test_maml_zero_inner_steps_is_the_query_gradient():
    net, loss_fn, params, task = mlp_problem(seed=2)
    meta, _ = maml_update(loss_fn, params, task, optimizer=SGD(lr=0.3), inner_steps=0)
    torch.testing.assert_close(meta, autograd_grad(net, params, task.query_x, task.query_y))


def test_maml_one_step_formula_by_hand():
    # (I − α ∇²L_s(θ)) ∇L_q(θ − α ∇L_s(θ)) with an explicit Hessian of the flattened parameters
    net, loss_fn, params, task = mlp_problem(seed=3)
    alpha = 0.3
    meta, _ = maml_update(loss_fn, params, task, optimizer=SGD(lr=alpha), inner_steps=1)

    flat, unflatten = _flattened(params)
    support_loss = lambda f: plain_mse(net, unflatten(f), task.support_x, task.support_y)  # noqa: E731
    query_loss = lambda f: plain_mse(net, unflatten(f), task.query_x, task.query_y)  # noqa: E731
    g_s = torch.autograd.functional.jacobian(support_loss, flat)
    h_s = torch.autograd.functional.hessian(support_loss, flat)
    g_q = torch.autograd.functional.jacobian(query_loss, flat - alpha * g_s)
    expected = unflatten((torch.eye(flat.numel(), dtype=F64) - alpha * h_s) @ g_q)
    torch.testing.assert_close(meta, expected)


def test_maml_masked_padding_does_not_change_meta_gradient():
    _, loss_fn, params, task = mlp_problem(seed=31, support=4, query=4)
    padded = padded_task(task, 310)
    opt = SGD(lr=0.2, momentum=0.5)
    plain, plain_aux = maml_update(loss_fn, params, task, optimizer=opt, inner_steps=2)
    masked, masked_aux = maml_update(loss_fn, params, padded, optimizer=opt, inner_steps=2)
    torch.testing.assert_close(masked, plain)
    torch.testing.assert_close(masked_aux, plain_aux)
    unmasked, _ = maml_update(loss_fn, params, padded._replace(support_mask=None, query_mask=None), optimizer=opt,
                              inner_steps=2)
    assert not torch.allclose(unmasked["2.bias"], plain["2.bias"])


# --------------------------------------------------------------------------- MAML vs higher


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_sgd_matches_higher(steps):
    net, loss_fn, params, task = mlp_problem(seed=4, hidden=5)
    alpha = 0.2
    meta, _ = maml_update(loss_fn, params, task, optimizer=SGD(lr=alpha), inner_steps=steps)
    expected = _higher_meta_grad(net, task, lambda ps: torch.optim.SGD(ps, lr=alpha), steps)
    torch.testing.assert_close(meta, expected)


def test_maml_momentum_sgd_matches_higher():
    net, loss_fn, params, task = mlp_problem(seed=5, hidden=5)
    opt = SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)
    meta, _ = maml_update(loss_fn, params, task, optimizer=opt, inner_steps=3)
    expected = _higher_meta_grad(net, task, opt.torch_optimizer, 3)
    torch.testing.assert_close(meta, expected)


def test_maml_adam_one_step_matches_higher_with_rescaled_eps():
    # ``higher``'s DifferentiableAdam puts eps outside the bias correction,
    # θ − lr·sqrt(bc2)/bc1 · m / (sqrt(v) + eps_h), whereas torch.optim.Adam (and this package) use
    # θ − lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps). For one step they agree with eps_h = eps·sqrt(bc2).
    net, loss_fn, params, task = mlp_problem(seed=6, hidden=5)
    lr, betas, eps = 0.05, (0.9, 0.999), 1e-2
    meta, _ = maml_update(loss_fn, params, task, optimizer=Adam(lr=lr, betas=betas, eps=eps), inner_steps=1)
    eps_h = eps * (1 - betas[1]) ** 0.5
    expected = _higher_meta_grad(net, task, lambda ps: torch.optim.Adam(ps, lr=lr, betas=betas, eps=eps_h), 1)
    torch.testing.assert_close(meta, expected)


def test_maml_adam_two_steps_matches_higher():
    # with a negligible eps the eps placement above does not matter
    net, loss_fn, params, task = mlp_problem(seed=7, hidden=5)
    opt = Adam(lr=0.05, betas=(0.8, 0.9), eps=1e-14)
    meta, _ = maml_update(loss_fn, params, task, optimizer=opt, inner_steps=2)
    expected = _higher_meta_grad(net, task, opt.torch_optimizer, 2)
    torch.testing.assert_close(meta, expected, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------- FOMAML


@pytest.mark.parametrize("optimizer", [SGD(lr=0.3), Adam(lr=0.05)])
def test_fomaml_is_query_gradient_at_detached_adapted_params(optimizer):
    net, loss_fn, params, task = mlp_problem(seed=8)
    steps = 2
    fo, fo_aux = maml_update(loss_fn, params, task, optimizer=optimizer, inner_steps=steps, first_order=True)
    so, _ = maml_update(loss_fn, params, task, optimizer=optimizer, inner_steps=steps)

    # hand reference: adapt with plain autograd (no create_graph), then ∇L_q at the adapted params
    current = {k: v.clone() for k, v in params.items()}
    state = optimizer.init(current)
    for _ in range(steps):
        current, state = optimizer.step(current, autograd_grad(net, current, task.support_x, task.support_y), state)
    query_loss = plain_mse(net, current, task.query_x, task.query_y)
    expected = autograd_grad(net, current, task.query_x, task.query_y)

    torch.testing.assert_close(fo, expected)
    torch.testing.assert_close(fo_aux["query_loss"], query_loss.detach())
    assert not all(torch.allclose(fo[k], so[k], rtol=1e-3, atol=1e-6) for k in fo)


# ------------------------------------------------------------------------------------ Meta-SGD


def _meta_sgd_reference(net, params, lrs, task, steps):
    theta = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    alpha = {k: v.clone().requires_grad_(True) for k, v in lrs.items()}
    fast = dict(theta)
    for _ in range(steps):
        grads = torch.autograd.grad(
            plain_mse(net, fast, task.support_x, task.support_y), list(fast.values()), create_graph=True
        )
        fast = {k: fast[k] - alpha[k] * g for k, g in zip(fast, grads)}
    query_loss = plain_mse(net, fast, task.query_x, task.query_y)
    grads = torch.autograd.grad(query_loss, list(theta.values()) + list(alpha.values()))
    n = len(theta)
    return dict(zip(theta, grads[:n])), dict(zip(alpha, grads[n:]))


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_sgd_matches_plain_autograd_reference(steps):
    net, loss_fn, params, task = mlp_problem(seed=9)
    torch.manual_seed(90)
    lrs = {k: torch.rand_like(v) * 0.3 + 0.05 for k, v in params.items()}
    (g_params, g_lrs), aux = meta_sgd_update(
        loss_fn, params, lrs, task, optimizer=SGD(lr=1e-3), inner_steps=steps
    )
    ref_params, ref_lrs = _meta_sgd_reference(net, params, lrs, task, steps)
    torch.testing.assert_close(g_params, ref_params)
    torch.testing.assert_close(g_lrs, ref_lrs)
    assert set(aux) == {"support_loss", "query_loss"}


def test_meta_sgd_one_step_lr_gradient_formula():
    net, loss_fn, params, task = mlp_problem(seed=10)
    torch.manual_seed(100)
    lrs = {k: torch.rand_like(v) * 0.3 + 0.05 for k, v in params.items()}
    (_, g_lrs), _ = meta_sgd_update(loss_fn, params, lrs, task, optimizer=SGD(lr=1e-3), inner_steps=1)

    g_s = autograd_grad(net, params, task.support_x, task.support_y)
    g_q = autograd_grad(net, {k: params[k] - lrs[k] * g_s[k] for k in params}, task.query_x, task.query_y)
    torch.testing.assert_close(g_lrs, {k: -g_s[k] * g_q[k] for k in params})


# ---------------------------------------------------------------------------------------- ANIL


def test_anil_equals_maml_with_adapt_names_and_higher():
    net, loss_fn, params, task = mlp_problem(seed=11, hidden=5)
    opt = SGD(lr=0.25)
    anil, anil_aux = anil_update(loss_fn, params, task, head_names=HEAD, optimizer=opt, inner_steps=2)
    maml, maml_aux = maml_update(loss_fn, params, task, optimizer=opt, inner_steps=2, adapt_names=HEAD)
    torch.testing.assert_close(anil, maml)
    torch.testing.assert_close(anil_aux, maml_aux)
    assert anil["0.weight"].abs().sum() > 0 and anil["0.bias"].abs().sum() > 0

    expected = _higher_meta_grad(net, task, opt.torch_optimizer, 2, names=HEAD)
    torch.testing.assert_close(anil, expected)

    # and it is not the full-MAML meta-gradient
    full, _ = maml_update(loss_fn, params, task, optimizer=opt, inner_steps=2)
    assert not torch.allclose(full["0.weight"], anil["0.weight"])


def test_anil_matches_finite_differences():
    _, loss_fn, params, task = mlp_problem(seed=12)
    opt = SGD(lr=0.2, momentum=0.5)
    anil, _ = anil_update(loss_fn, params, task, head_names=HEAD, optimizer=opt, inner_steps=2)

    def objective(p):
        return maml_objective(loss_fn, p, task, optimizer=opt, inner_steps=2, adapt_names=HEAD)[0]

    torch.testing.assert_close(anil, finite_difference_grad(objective, params), rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------------- Per-FedAvg


def test_hvp_equals_hessian_times_vector():
    net, loss_fn, params, task = mlp_problem(seed=13, inp=2, hidden=3, out=2)
    torch.manual_seed(130)
    vector = {k: torch.randn_like(v) for k, v in params.items()}
    result = hvp(lambda p: loss_fn(p, task.support_x, task.support_y, None), params, vector)

    flat, unflatten = _flattened(params)
    hessian = torch.autograd.functional.hessian(lambda f: plain_mse(net, unflatten(f), task.support_x, task.support_y), flat)
    expected = unflatten(hessian @ _flattened(vector)[0])
    torch.testing.assert_close(result, expected)


def test_per_fedavg_hf_support_one_step_equals_maml_gradient():
    _, loss_fn, params, task = mlp_problem(seed=14)
    alpha = 0.2
    opt = SGD(lr=alpha)
    update, _ = per_fedavg_update(
        loss_fn, params, task, optimizer=opt, alpha=alpha, beta=1.0, local_steps=1, variant="hf",
        hessian_batch="support",
    )
    maml, _ = maml_update(loss_fn, params, task, optimizer=opt, inner_steps=1)
    torch.testing.assert_close(update, maml)


def _hessian_vector(net, params, x, y, vector):
    """∇²L(θ)·v with plain double-backward autograd."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(plain_mse(net, leaves, x, y), list(leaves.values()), create_graph=True)
    dot = sum((g * vector[k]).sum() for g, k in zip(grads, leaves))
    return dict(zip(leaves, torch.autograd.grad(dot, list(leaves.values()))))


@pytest.mark.parametrize("local_steps", [1, 2])
def test_per_fedavg_hf_query_split_equals_hand_formula(local_steps):
    net, loss_fn, params, task = mlp_problem(seed=15, support=4, query=5)
    alpha, beta = 0.2, 0.5
    update, aux = per_fedavg_update(
        loss_fn, params, task, optimizer=SGD(lr=alpha), alpha=alpha, beta=beta, local_steps=local_steps,
        variant="hf", hessian_batch="query_split",
    )
    d1_x, d1_y = task.query_x[:2], task.query_y[:2]  # D'
    d2_x, d2_y = task.query_x[2:], task.query_y[2:]  # D''
    theta = dict(params)
    for _ in range(local_steps):
        g = autograd_grad(net, theta, task.support_x, task.support_y)
        tilde = {k: theta[k] - alpha * g[k] for k in theta}
        g_q = autograd_grad(net, tilde, d1_x, d1_y)
        hv = _hessian_vector(net, theta, d2_x, d2_y, g_q)
        theta = {k: theta[k] - beta * (g_q[k] - alpha * hv[k]) for k in theta}
    torch.testing.assert_close(update, {k: params[k] - theta[k] for k in params})
    torch.testing.assert_close(aux["support_loss"], plain_mse(net, params, task.support_x, task.support_y))


@pytest.mark.parametrize("local_steps", [1, 3])
def test_per_fedavg_fo_equals_hand_formula(local_steps):
    net, loss_fn, params, task = mlp_problem(seed=16)
    alpha, beta = 0.3, 0.4
    update, aux = per_fedavg_update(
        loss_fn, params, task, optimizer=SGD(lr=alpha), alpha=alpha, beta=beta, local_steps=local_steps, variant="fo"
    )
    theta = dict(params)
    first_query_loss = None
    for _ in range(local_steps):
        g = autograd_grad(net, theta, task.support_x, task.support_y)
        tilde = {k: theta[k] - alpha * g[k] for k in theta}
        if first_query_loss is None:
            first_query_loss = plain_mse(net, tilde, task.query_x, task.query_y)
        g_q = autograd_grad(net, tilde, task.query_x, task.query_y)
        theta = {k: theta[k] - beta * g_q[k] for k in theta}
    torch.testing.assert_close(update, {k: params[k] - theta[k] for k in params})
    torch.testing.assert_close(aux["query_loss"], first_query_loss)


def test_per_fedavg_hf_differs_from_fo():
    _, loss_fn, params, task = mlp_problem(seed=17)
    kw = dict(optimizer=SGD(lr=0.3), alpha=0.3, beta=0.5)
    fo, _ = per_fedavg_update(loss_fn, params, task, variant="fo", **kw)
    hf, _ = per_fedavg_update(loss_fn, params, task, variant="hf", hessian_batch="support", **kw)
    assert not torch.allclose(fo["0.weight"], hf["0.weight"], rtol=1e-4)


# ------------------------------------------------------------------------------------- Reptile


@pytest.mark.parametrize("use_query", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_reptile_linear_model_equals_hand_loop(use_query, momentum):
    loss_fn, params, task = linear_problem(seed=18)
    lr, steps = 0.1, 3
    update, aux = reptile_update(
        loss_fn, params, task, optimizer=SGD(lr=lr, momentum=momentum), inner_steps=steps, use_query=use_query
    )
    x, y = task.support_x, task.support_y
    if use_query:
        x, y = torch.cat([x, task.query_x]), torch.cat([y, task.query_y])
    theta = dict(params)
    buf = {k: torch.zeros_like(v) for k, v in params.items()}
    for _ in range(steps):
        g = _linear_grad(theta, x, y)
        buf = {k: momentum * buf[k] + g[k] for k in theta}
        theta = {k: theta[k] - lr * buf[k] for k in theta}
    torch.testing.assert_close(update, {k: params[k] - theta[k] for k in params})
    torch.testing.assert_close(aux["support_loss"], ((x @ params["w"] + params["b"] - y) ** 2).mean())
    for v in update.values():
        assert not v.requires_grad


def test_reptile_use_query_changes_the_update():
    loss_fn, params, task = linear_problem(seed=19)
    a, _ = reptile_update(loss_fn, params, task, optimizer=SGD(lr=0.1), inner_steps=2, use_query=False)
    b, _ = reptile_update(loss_fn, params, task, optimizer=SGD(lr=0.1), inner_steps=2, use_query=True)
    assert not torch.allclose(a["w"], b["w"])


def test_reptile_masked_padding_does_not_change_update():
    loss_fn, params, task = linear_problem(seed=20)
    torch.manual_seed(200)
    junk_x = torch.randn(2, 3, dtype=F64) * 5
    junk_y = torch.randn(2, dtype=F64) * 5
    padded = ClientTask(
        torch.cat([task.support_x, junk_x[:1]]),
        torch.cat([task.support_y, junk_y[:1]]),
        torch.cat([junk_x[1:], task.query_x]),
        torch.cat([junk_y[1:], task.query_y]),
        torch.tensor([1, 1, 1, 1, 0], dtype=F64),
        torch.tensor([0, 1, 1, 1], dtype=F64),
    )
    plain, _ = reptile_update(loss_fn, params, task, optimizer=SGD(lr=0.1), inner_steps=3, use_query=True)
    masked, _ = reptile_update(loss_fn, params, padded, optimizer=SGD(lr=0.1), inner_steps=3, use_query=True)
    torch.testing.assert_close(masked, plain)
    # only one of the two masks given
    half = padded._replace(query_x=task.query_x, query_y=task.query_y, query_mask=None)
    masked_half, _ = reptile_update(loss_fn, params, half, optimizer=SGD(lr=0.1), inner_steps=3, use_query=True)
    torch.testing.assert_close(masked_half, plain)


# -------------------------------------------------------------------------------------- FedAvg


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fedavg_linear_model_equals_torch_sgd_loop(momentum):
    loss_fn, params, task = linear_problem(seed=21, support=4, query=3)
    lr = 0.05
    update, aux = fedavg_update(
        loss_fn, params, task, optimizer=SGD(lr=lr, momentum=momentum), local_epochs=2, batch_size=3, use_query=True
    )
    x = torch.cat([task.support_x, task.query_x])
    y = torch.cat([task.support_y, task.query_y])
    w = params["w"].clone().requires_grad_(True)
    b = params["b"].clone().requires_grad_(True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=momentum)
    first_loss = None
    for _ in range(2):
        for sl in (slice(0, 3), slice(3, 6), slice(6, 7)):
            opt.zero_grad()
            loss = ((x[sl] @ w + b - y[sl]) ** 2).mean()
            first_loss = loss.detach() if first_loss is None else first_loss
            loss.backward()
            opt.step()
    expected = {"w": params["w"] - w.detach(), "b": params["b"] - b.detach()}
    torch.testing.assert_close(update, expected)
    torch.testing.assert_close(aux["support_loss"], first_loss)


def test_fedavg_full_batch_support_only():
    loss_fn, params, task = linear_problem(seed=22)
    lr = 0.1
    update, _ = fedavg_update(loss_fn, params, task, optimizer=SGD(lr=lr), local_epochs=3, use_query=False)
    theta = dict(params)
    for _ in range(3):
        g = _linear_grad(theta, task.support_x, task.support_y)
        theta = {k: theta[k] - lr * g[k] for k in theta}
    torch.testing.assert_close(update, {k: params[k] - theta[k] for k in params})


# ------------------------------------------------------------------------------- vmap == loop


def _rules():
    opt = SGD(lr=0.2)
    return {
        "maml": lambda lf, p, t: maml_update(lf, p, t, optimizer=opt, inner_steps=2),
        "fomaml": lambda lf, p, t: maml_update(lf, p, t, optimizer=opt, inner_steps=2, first_order=True),
        "maml_adam": lambda lf, p, t: maml_update(lf, p, t, optimizer=Adam(lr=0.05, eps=1e-3), inner_steps=2),
        "anil": lambda lf, p, t: anil_update(lf, p, t, head_names=HEAD, optimizer=opt, inner_steps=2),
        "meta_sgd": lambda lf, p, t: meta_sgd_update(
            lf, p, {k: torch.full_like(v, 0.1) for k, v in p.items()}, t, optimizer=opt, inner_steps=2
        ),
        "reptile": lambda lf, p, t: reptile_update(lf, p, t, optimizer=SGD(lr=0.1, momentum=0.5), inner_steps=3),
        "per_fedavg_fo": lambda lf, p, t: per_fedavg_update(
            lf, p, t, optimizer=opt, alpha=0.2, beta=0.3, local_steps=2, variant="fo"
        ),
        "per_fedavg_hf": lambda lf, p, t: per_fedavg_update(
            lf, p, t, optimizer=opt, alpha=0.2, beta=0.3, local_steps=2, variant="hf"
        ),
        "per_fedavg_hf_support": lambda lf, p, t: per_fedavg_update(
            lf, p, t, optimizer=opt, alpha=0.2, beta=0.3, variant="hf", hessian_batch="support"
        ),
        "fedavg": lambda lf, p, t: fedavg_update(
            lf, p, t, optimizer=SGD(lr=0.1, momentum=0.9), local_epochs=2, batch_size=4
        ),
    }


@pytest.mark.parametrize("rule", list(_rules()))
def test_vmap_over_clients_equals_loop(rule):
    fn = _rules()[rule]
    _, loss_fn, params, _ = mlp_problem(seed=23)
    tasks = _stacked_tasks(4, seed=24)
    batched = torch.func.vmap(lambda t: fn(loss_fn, params, t), in_dims=(ClientTask(0, 0, 0, 0, None, None),))(tasks)
    looped = stack_results([fn(loss_fn, params, client_task(tasks, i)) for i in range(4)])
    torch.testing.assert_close(batched, looped)
    # the clients differ, so the per-client results do too
    leaf = batched[0] if isinstance(batched[0], dict) else batched[0][0]
    first = next(iter(leaf.values()))
    assert not torch.allclose(first[0], first[1])


def test_vmap_with_masks_equals_loop():
    _, loss_fn, params, _ = mlp_problem(seed=25)
    tasks = _stacked_tasks(4, seed=26)
    torch.manual_seed(260)
    support_mask = (torch.rand(4, 5) > 0.3).to(F64)
    support_mask[:, 0] = 1.0
    query_mask = (torch.rand(4, 6) > 0.3).to(F64)
    query_mask[:, 0] = 1.0
    tasks = tasks._replace(support_mask=support_mask, query_mask=query_mask)
    opt = SGD(lr=0.2)
    for fn in [
        lambda t: maml_update(loss_fn, params, t, optimizer=opt, inner_steps=2),
        lambda t: reptile_update(loss_fn, params, t, optimizer=opt, inner_steps=2),
        lambda t: fedavg_update(loss_fn, params, t, optimizer=opt, batch_size=4),
    ]:
        batched = torch.func.vmap(fn, in_dims=(ClientTask(0, 0, 0, 0, 0, 0),))(tasks)
        looped = stack_results([fn(client_task(tasks, i)) for i in range(4)])
        torch.testing.assert_close(batched, looped)


# ------------------------------------------------------------------------------- aggregation


def test_weighted_mean_equals_hand_computation():
    torch.manual_seed(27)
    updates = {"w": torch.randn(4, 3, 2, dtype=F64), "b": torch.randn(4, dtype=F64)}
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    result = weighted_mean(updates, weights)
    for k, u in updates.items():
        expected = sum(weights[i] * u[i] for i in range(4)) / weights.sum()
        torch.testing.assert_close(result[k], expected)
    assert result["w"].shape == (3, 2) and result["b"].shape == ()
    assert result["w"].dtype == F64


def test_weighted_mean_without_weights_is_plain_mean():
    torch.manual_seed(28)
    updates = {"w": torch.randn(5, 3, dtype=F64), "b": torch.randn(5, 1, dtype=F64)}
    result = weighted_mean(updates)
    torch.testing.assert_close(result, {k: v.mean(0) for k, v in updates.items()})
    # integer weights (sample counts) are cast to the updates' dtype
    counts = torch.tensor([1, 1, 1, 1, 6])
    weighted = weighted_mean(updates, counts)
    torch.testing.assert_close(weighted["w"], (updates["w"][:4].sum(0) + 6 * updates["w"][4]) / 10)
