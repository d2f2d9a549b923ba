"""Proximal client updates in ``lightning_metafed.functional.proximal`` (FedProx, FedBABU, pFedMe)
against hand-written float64 references: closed-form gradients of a linear least-squares model,
plain-autograd loops on a tiny MLP, finite differences, and a closed-form proximal point."""

from __future__ import annotations

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
    fedavg_update,
    fedbabu_update,
    fedprox_update,
    mse_loss,
    pfedme_personalize,
    pfedme_update,
    proximal_loss,
)
from lightning_metafed.inner import SGD, Adam

HEAD = ["2.weight", "2.bias"]
BODY = ["0.weight", "0.bias"]


# ------------------------------------------------------------------------------------- helpers


def _grad(p, x, y):
    """Closed-form gradient of ``mean((x·w + b − y)²)``."""
    r = x @ p["w"] + p["b"] - y
    return {"w": 2.0 / x.shape[0] * x.T @ r, "b": 2.0 / x.shape[0] * r.sum()}


def _mse(p, x, y):
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


def _local(task):
    return torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])


def _perturbed(params, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}


def _with_junk_support_row(task):
    """``task`` with one masked junk example inserted into the support set (the query stays unmasked)."""
    junk_x, junk_y = 5 * torch.ones(1, task.support_x.shape[1], dtype=F64), torch.full((1,), -9.0, dtype=F64)
    return task._replace(
        support_x=torch.cat([task.support_x[:2], junk_x, task.support_x[2:]]),
        support_y=torch.cat([task.support_y[:2], junk_y, task.support_y[2:]]),
        support_mask=torch.tensor([1, 1, 0, 1, 1], dtype=F64),
    )


def _hand_prox_steps(theta, anchor, x, y, *, lr, lam, steps):
    """``steps`` of ``θ ← θ − lr (∇f(θ) + λ (θ − w))`` with the closed-form least-squares gradient."""
    for _ in range(steps):
        g = _grad(theta, x, y)
        theta = {k: theta[k] - lr * (g[k] + lam * (theta[k] - anchor[k])) for k in theta}
    return theta


# ---------------------------------------------------------------------------------------- FedProx


@pytest.mark.parametrize("padded", [False, True])
def test_fedprox_equals_hand_sgd_on_the_proximal_objective(padded):
    loss_fn, params, task = linear_problem(seed=1)
    lr, mu = 0.05, 0.7
    run = _with_junk_support_row(task) if padded else task
    update, aux = fedprox_update(loss_fn, params, run, optimizer=SGD(lr=lr), mu=mu, local_epochs=2, batch_size=3)
    x, y = _local(task)  # 7 real examples: mini-batches of 3, 3 and 1
    w, first = dict(params), None
    for _ in range(2):
        for sl in (slice(0, 3), slice(3, 6), slice(6, 7)):
            first = _mse(w, x[sl], y[sl]) if first is None else first
            g = _grad(w, x[sl], y[sl])
            w = {k: w[k] - lr * (g[k] + mu * (w[k] - params[k])) for k in w}
    torch.testing.assert_close(update, {k: params[k] - w[k] for k in params})
    torch.testing.assert_close(aux["support_loss"], first)
    if padded:  # the mask is what keeps the junk row out
        unmasked, _ = fedprox_update(loss_fn, params, run._replace(support_mask=None), optimizer=SGD(lr=lr), mu=mu,
                                     local_epochs=2, batch_size=3)
        assert not torch.allclose(unmasked["w"], update["w"])


def test_fedprox_with_mu_zero_is_fedavg_exactly_and_mu_pulls_towards_the_received_model():
    _, loss_fn, params, task = mlp_problem(seed=2)
    kw = {"optimizer": SGD(lr=0.1, momentum=0.5), "local_epochs": 2, "batch_size": 4}
    prox, prox_aux = fedprox_update(loss_fn, params, task, mu=0.0, **kw)
    avg, avg_aux = fedavg_update(loss_fn, params, task, **kw)
    torch.testing.assert_close(prox, avg, rtol=0, atol=0)
    torch.testing.assert_close(prox_aux, avg_aux, rtol=0, atol=0)
    pulled, _ = fedprox_update(loss_fn, params, task, mu=5.0, **kw)
    norm = lambda u: sum(float((v**2).sum()) for v in u.values())
    assert norm(pulled) < 0.9 * norm(avg)
    with pytest.raises(ValueError, match=r"`mu` >= 0, got -0.1"):
        fedprox_update(loss_fn, params, task, mu=-0.1, **kw)


def test_proximal_loss_value_and_gradient_against_finite_differences_and_autograd():
    net, loss_fn, params, task = mlp_problem(seed=3)
    anchor, point, mu = _perturbed(params, 30), _perturbed(params, 31), 0.8
    x, y = task.support_x, task.support_y
    regularized = proximal_loss(loss_fn, anchor, mu)
    distance = sum(((point[k] - anchor[k]) ** 2).sum() for k in point)
    torch.testing.assert_close(regularized(point, x, y, None), plain_mse(net, point, x, y) + 0.5 * mu * distance)
    grad = torch.func.grad(lambda p: regularized(p, x, y, None))(point)
    fd = finite_difference_grad(lambda p: regularized(p, x, y, None), point)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7)
    plain = autograd_grad(net, point, x, y)
    torch.testing.assert_close(grad, {k: plain[k] + mu * (point[k] - anchor[k]) for k in point})
    leaf = {k: v.clone().requires_grad_(True) for k, v in anchor.items()}
    at = {k: v.clone().requires_grad_(True) for k, v in point.items()}
    proximal_loss(loss_fn, leaf, mu)(at, x, y, None).backward()
    assert all(v.grad is None for v in leaf.values())  # the anchor is a constant
    torch.testing.assert_close({k: v.grad for k, v in at.items()}, grad)


# ---------------------------------------------------------------------------------------- FedBABU


def test_fedbabu_trains_only_the_body_against_a_hand_loop():
    net, loss_fn, params, task = mlp_problem(seed=4)
    lr = 0.1
    upload, aux = fedbabu_update(loss_fn, params, task, optimizer=SGD(lr=lr), head_names=HEAD, local_epochs=2,
                                 batch_size=4)
    assert sorted(upload) == sorted(BODY)
    x, y = _local(task)  # 11 examples: mini-batches of 4, 4 and 3
    local = dict(params)
    for _ in range(2):
        for sl in (slice(0, 4), slice(4, 8), slice(8, 11)):
            g = autograd_grad(net, local, x[sl], y[sl])
            local = {k: local[k] - lr * g[k] if k in BODY else local[k] for k in local}
    torch.testing.assert_close(upload, {k: params[k] - local[k] for k in BODY})
    torch.testing.assert_close(aux["support_loss"], plain_mse(net, params, x[:4], y[:4]))
    full, _ = fedavg_update(loss_fn, params, task, optimizer=SGD(lr=lr), local_epochs=2, batch_size=4, adapt_names=BODY)
    for k in HEAD:  # the frozen head never moves
        torch.testing.assert_close(full[k], torch.zeros_like(params[k]), rtol=0, atol=0)
    torch.testing.assert_close({k: full[k] for k in BODY}, upload, rtol=0, atol=0)
    trained_head, _ = fedavg_update(loss_fn, params, task, optimizer=SGD(lr=lr), local_epochs=2, batch_size=4)
    assert not torch.allclose(trained_head["0.weight"], upload["0.weight"])  # training the head changes the body


@pytest.mark.parametrize("head_names", [[], ["3.weight"], ["2.weight", "nope"], [*BODY, *HEAD]])
def test_fedbabu_rejects_a_head_that_is_empty_unknown_or_everything(head_names):
    _, loss_fn, params, task = mlp_problem(seed=5)
    with pytest.raises(ValueError, match="`head_names` to be a non-empty proper subset"):
        fedbabu_update(loss_fn, params, task, optimizer=SGD(lr=0.1), head_names=head_names)


# ----------------------------------------------------------------------------------------- pFedMe


def test_pfedme_personalize_equals_hand_proximal_steps():
    loss_fn, anchor, task = linear_problem(seed=6)
    start = _perturbed(anchor, 60, scale=1.0)
    p, lam, steps = 0.05, 2.5, 4
    got = pfedme_personalize(loss_fn, anchor, start, task.support_x, task.support_y, None, optimizer=SGD(lr=p),
                             steps=steps, lam=lam)
    want = _hand_prox_steps(start, anchor, task.support_x, task.support_y, lr=p, lam=lam, steps=steps)
    torch.testing.assert_close(got, want)
    assert all(not v.requires_grad for v in got.values())
    same = pfedme_personalize(loss_fn, anchor, start, task.support_x, task.support_y, None, optimizer=SGD(lr=p),
                              steps=0, lam=lam)
    torch.testing.assert_close(same, start, rtol=0, atol=0)
    masked = _with_junk_support_row(task)
    torch.testing.assert_close(pfedme_personalize(loss_fn, anchor, start, masked.support_x, masked.support_y,
                                                  masked.support_mask, optimizer=SGD(lr=p), steps=steps, lam=lam), want)


def test_pfedme_personalize_converges_to_the_closed_form_prox_point():
    loss_fn, anchor, task = linear_problem(seed=7, support=6)
    x, y, lam = task.support_x, task.support_y, 1.5
    got = pfedme_personalize(loss_fn, anchor, _perturbed(anchor, 70, scale=2.0), x, y, None, optimizer=SGD(lr=0.1),
                             steps=400, lam=lam)
    # argmin mean((A θ − y)²) + λ/2 ‖θ − w‖²  ⇔  (2/n AᵀA + λ I) θ = 2/n Aᵀy + λ w
    # with A = [x, 1] and θ = [w; b]
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64)], dim=1)
    w = torch.cat([anchor["w"], anchor["b"].reshape(1)])
    n = x.shape[0]
    theta = torch.linalg.solve(2.0 / n * a.T @ a + lam * torch.eye(4, dtype=F64), 2.0 / n * a.T @ y + lam * w)
    torch.testing.assert_close(torch.cat([got["w"], got["b"].reshape(1)]), theta, rtol=0, atol=1e-10)
    minimizer = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]
    assert float((theta - w).norm()) > 0.1 and float((theta - minimizer).norm()) > 0.1  # the prox is neither end


def _hand_pfedme(params, task, *, p, k_steps, lam, eta, rounds, beta, batch):
    """pFedMe's Algorithm 1 for one client, closed-form gradients: returns ``(upload, last θ)``."""
    x, y = _local(task)
    starts = list(range(0, x.shape[0], batch))
    w, theta = dict(params), dict(params)
    for r in range(rounds):
        sl = slice(starts[r % len(starts)], starts[r % len(starts)] + batch)
        theta = _hand_prox_steps(theta, w, x[sl], y[sl], lr=p, lam=lam, steps=k_steps)
        w = {k: w[k] - eta * lam * (w[k] - theta[k]) for k in w}
    return {k: beta * (params[k] - w[k]) for k in params}, theta


@pytest.mark.parametrize("padded", [False, True])
def test_pfedme_update_equals_hand_algorithm_1(padded):
    loss_fn, params, task = linear_problem(seed=8)
    kw = {"lam": 3.0, "lr": 0.2, "local_steps": 5, "beta": 0.7, "batch_size": 3}
    run = _with_junk_support_row(task) if padded else task  # 8 rows, the junk last: batches 3, 3 and 1 + junk
    upload, aux = pfedme_update(loss_fn, params, run, optimizer=SGD(lr=0.04), personal_steps=3, **kw)
    want, theta = _hand_pfedme(params, task, p=0.04, k_steps=3, lam=3.0, eta=0.2, rounds=5, beta=0.7, batch=3)
    torch.testing.assert_close(upload, want)
    x, y = _local(task)
    torch.testing.assert_close(aux["support_loss"], _mse(params, x, y))
    torch.testing.assert_close(aux["query_loss"], _mse(theta, task.query_x, task.query_y))
    cold = dict(params)  # without the warm start each round would restart θ from w
    for sl in [slice(0, 3), slice(3, 6), slice(6, 7), slice(0, 3), slice(3, 6)]:
        restarted = _hand_prox_steps(cold, cold, x[sl], y[sl], lr=0.04, lam=3.0, steps=3)
        cold = {k: cold[k] - 0.2 * 3.0 * (cold[k] - restarted[k]) for k in cold}
    assert not torch.allclose(upload["w"], 0.7 * (params["w"] - cold["w"]))
    if padded:
        unmasked, _ = pfedme_update(loss_fn, params, run._replace(support_mask=None), optimizer=SGD(lr=0.04),
                                    personal_steps=3, **kw)
        assert not torch.allclose(unmasked["w"], upload["w"])


@pytest.mark.parametrize("budget", [2, torch.tensor(2), 0, torch.tensor(0)])
def test_pfedme_step_budget_stops_the_local_rounds(budget):
    net, loss_fn, params, task = mlp_problem(seed=9)
    kw = {"optimizer": SGD(lr=0.05), "personal_steps": 2, "lam": 2.0, "lr": 0.3, "batch_size": 4}
    got, aux = pfedme_update(loss_fn, params, task._replace(num_steps=budget), local_steps=5, **kw)
    if int(budget) == 0:  # no local round: nothing uploaded, the personalized model is the received one
        torch.testing.assert_close(got, {k: torch.zeros_like(v) for k, v in params.items()}, rtol=0, atol=0)
        torch.testing.assert_close(aux["query_loss"], plain_mse(net, params, task.query_x, task.query_y))
        return
    want, want_aux = pfedme_update(loss_fn, params, task, local_steps=2, **kw)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(aux, want_aux)
    more, _ = pfedme_update(loss_fn, params, task, local_steps=3, **kw)
    assert not torch.allclose(more["0.weight"], got["0.weight"])


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"lam": 0.0}, r"^Expected `lam` > 0, got 0.0$"),
        ({"lam": -1.0}, r"^Expected `lam` > 0, got -1.0$"),
        ({"lr": 0.0}, r"^Expected `lr` > 0, got 0.0$"),
        ({"beta": -0.5}, r"^Expected `beta` > 0, got -0.5$"),
        ({"local_steps": 0}, r"`local_steps` >= 1, got 0"),
        ({"personal_steps": -1}, r"`personal_steps` >= 0, got -1"),
        ({"batch_size": 0}, r"`batch_size` >= 1, got 0"),
    ],
)
def test_pfedme_rejects_invalid_arguments(overrides, match):
    loss_fn, params, task = linear_problem(seed=10)
    kw = {"optimizer": SGD(lr=0.1), "personal_steps": 1, "lam": 1.0, "lr": 0.1, "local_steps": 2, "beta": 1.0}
    with pytest.raises(ValueError, match=match):
        pfedme_update(loss_fn, params, task, **{**kw, **overrides})


# ------------------------------------------------------------------------------------ vmap == loop


def _rules():
    return {
        "fedprox": lambda lf, p, t: fedprox_update(lf, p, t, optimizer=SGD(lr=0.1, momentum=0.5), mu=0.5,
                                                   local_epochs=2, batch_size=4),
        "fedbabu": lambda lf, p, t: fedbabu_update(lf, p, t, optimizer=SGD(lr=0.1), head_names=HEAD, local_epochs=2,
                                                   batch_size=4),
        "pfedme": lambda lf, p, t: pfedme_update(lf, p, t, optimizer=SGD(lr=0.05), personal_steps=2, lam=2.0, lr=0.3,
                                                 local_steps=4, beta=0.8, batch_size=4),
    }


def _stacked_tasks(m, seed, support=5, query=6):
    torch.manual_seed(seed)
    x = torch.rand(m, support + query, 1, dtype=F64) * 4 - 2
    y = (torch.rand(m, 1, 1, dtype=F64) * 2 + 0.5) * torch.sin(x + torch.rand(m, 1, 1, dtype=F64))
    support_mask = torch.ones(m, support, dtype=F64)
    support_mask[0, 1] = support_mask[2, 3] = 0.0
    return ClientTask(x[:, :support], y[:, :support], x[:, support:], y[:, support:], support_mask)


@pytest.mark.parametrize("budget", [None, torch.tensor([1, 3, 0])])
@pytest.mark.parametrize("rule", list(_rules()))
def test_vmap_over_clients_equals_loop(rule, budget):
    fn = _rules()[rule]
    _, loss_fn, params, _ = mlp_problem(seed=11)
    tasks = _stacked_tasks(3, seed=12)._replace(num_steps=budget)
    dims = ClientTask(0, 0, 0, 0, 0, None, None if budget is None else 0)
    batched = torch.func.vmap(lambda t: fn(loss_fn, params, t), in_dims=(dims,))(tasks)
    looped = stack_results([
        fn(loss_fn, params, client_task(tasks, i)._replace(num_steps=None if budget is None else int(budget[i])))
        for i in range(3)
    ])
    torch.testing.assert_close(batched, looped)
    upload = batched[0]
    assert not torch.allclose(upload["0.weight"][0], upload["0.weight"][1])
    if rule == "fedbabu":
        assert sorted(upload) == sorted(BODY)
    if budget is not None:  # the client without steps uploads nothing
        torch.testing.assert_close(upload["0.weight"][2], torch.zeros_like(params["0.weight"]), rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["fedprox", "pfedme", "fedavg_momentum", "fedavg_adam"])
def test_a_mini_batch_of_padding_only_changes_nothing(rule):
    """A client's update does not depend on how much it was padded (which depends on the other
    clients of its round): padding-only mini-batches are no step, and pFedMe cycles over real rows."""
    rules = {
        **_rules(),
        "fedavg_momentum": lambda lf, p, t: fedavg_update(lf, p, t, optimizer=SGD(lr=0.1, momentum=0.9), local_epochs=2, batch_size=4),
        "fedavg_adam": lambda lf, p, t: fedavg_update(lf, p, t, optimizer=Adam(lr=0.05), local_epochs=2, batch_size=4),
    }
    _, loss_fn, params, task = mlp_problem(seed=13, support=4, query=4)
    padded = padded_task(task, 130)  # 8 real rows first, then 3 junk rows: with batch_size 4 the last batch is junk
    torch.testing.assert_close(rules[rule](loss_fn, params, padded), rules[rule](loss_fn, params, task))


@pytest.mark.parametrize("budget", [3, torch.tensor(3), 0])
def test_a_step_budget_counts_real_steps_only(budget):
    """Padding-only mini-batches do not use up a client's step budget."""
    _, loss_fn, params, task = mlp_problem(seed=14, support=4, query=4)
    padded = padded_task(task, 131)
    run = lambda t: fedavg_update(loss_fn, params, t, optimizer=SGD(lr=0.1, momentum=0.9), local_epochs=2, batch_size=4)  # noqa: E731
    torch.testing.assert_close(run(padded._replace(num_steps=budget)), run(task._replace(num_steps=budget)))
    if budget == 0:
        assert all(float(v.abs().max()) == 0.0 for v in run(padded._replace(num_steps=budget))[0].values())


def test_an_all_ones_mask_changes_nothing_in_float32_with_a_scalar_parameter():
    """With a mask, Adam's step count is kept per client as a tensor; the update must stay bit-identical
    (and in the parameters' dtype, a 0-d parameter included) to the unmasked one."""
    torch.manual_seed(3)
    params = {"w": torch.randn(3), "b": torch.randn(())}
    x, y = torch.randn(12, 3), torch.randn(12)
    task = ClientTask(x[:6], y[:6], x[6:], y[6:])
    ones = task._replace(support_mask=torch.ones(6), query_mask=torch.ones(6))

    def loss_fn(p, x, y, mask):
        return mse_loss(x @ p["w"] + p["b"], y, mask)

    plain, _ = fedavg_update(loss_fn, params, task, optimizer=Adam(lr=0.05), local_epochs=2, batch_size=4)
    masked, _ = fedavg_update(loss_fn, params, ones, optimizer=Adam(lr=0.05), local_epochs=2, batch_size=4)
    for name in params:
        assert masked[name].dtype == torch.float32 and torch.equal(masked[name], plain[name]), name


def test_adapt_names_must_name_parameters():
    loss_fn, params, task = linear_problem(seed=4)
    with pytest.raises(ValueError, match=r"`adapt_names`.*\['nope'\]"):
        fedavg_update(loss_fn, params, task, optimizer=SGD(lr=0.1), adapt_names=["w", "nope"])
