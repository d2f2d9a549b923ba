"""Functional inner optimizers (``sgd_step``/``adam_step``) and their config classes."""

from __future__ import annotations

import pytest
import torch
from conftest import F64, finite_difference_grad, mse_fn
from torch import nn

from lightning_metafed.functional import (
    ClientTask,
    adam_init,
    adam_step,
    maml_objective,
    maml_update,
    sgd_init,
    sgd_step,
)
from lightning_metafed.inner import SGD, Adam


def _params_and_grad_sequence(seed: int, steps: int):
    torch.manual_seed(seed)
    params = {"w": torch.randn(3, 2, dtype=F64), "b": torch.randn(3, dtype=F64)}
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(steps)]
    return params, grads


def _run_torch_optimizer(opt_cls, params, grads, **kwargs):
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = opt_cls(list(tensors.values()), **kwargs)
    for g in grads:
        for k, p in tensors.items():
            p.grad = g[k].clone()
        opt.step()
    return {k: v.detach() for k, v in tensors.items()}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1},
        {"lr": 0.05, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.7, "nesterov": True},
        {"lr": 0.1, "weight_decay": 0.3},
        {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.2},
    ],
)
def test_sgd_step_matches_torch_optim_sgd(kwargs):
    params, grads = _params_and_grad_sequence(seed=0, steps=5)
    expected = _run_torch_optimizer(torch.optim.SGD, params, grads, **kwargs)

    momentum = kwargs.get("momentum", 0.0)
    state = sgd_init(params, momentum)
    current = dict(params)
    for g in grads:
        current, state = sgd_step(current, g, state, **kwargs)
    torch.testing.assert_close(current, expected)
    # the update actually moved the parameters
    assert not torch.allclose(current["w"], params["w"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1},
        {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6},
        {"lr": 0.1, "weight_decay": 0.3},
    ],
)
def test_adam_step_matches_torch_optim_adam(kwargs):
    params, grads = _params_and_grad_sequence(seed=1, steps=6)
    expected = _run_torch_optimizer(torch.optim.Adam, params, grads, **kwargs)

    state = adam_init(params)
    current = dict(params)
    for g in grads:
        current, state = adam_step(current, g, state, **kwargs)
    assert state["step"] == len(grads)
    torch.testing.assert_close(current, expected)
    assert not torch.allclose(current["w"], params["w"])


def test_config_classes_match_torch_optimizers():
    params, grads = _params_and_grad_sequence(seed=2, steps=4)
    for config, opt_cls, kwargs in [
        (SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1), torch.optim.SGD,
         {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
        (Adam(lr=0.02, betas=(0.85, 0.95), eps=1e-7, weight_decay=0.05), torch.optim.Adam,
         {"lr": 0.02, "betas": (0.85, 0.95), "eps": 1e-7, "weight_decay": 0.05}),
    ]:
        expected = _run_torch_optimizer(opt_cls, params, grads, **kwargs)
        state = config.init(params)
        current = dict(params)
        for g in grads:
            current, state = config.step(current, g, state)
        torch.testing.assert_close(current, expected)


def test_functional_steps_do_not_modify_inputs():
    params, grads = _params_and_grad_sequence(seed=3, steps=1)
    before = {k: v.clone() for k, v in params.items()}
    state = sgd_init(params, 0.9)
    sgd_step(params, grads[0], state, lr=0.1, momentum=0.9)
    adam_step(params, grads[0], adam_init(params), lr=0.1)
    torch.testing.assert_close(params, before)
    torch.testing.assert_close(state["momentum_buffer"], {k: torch.zeros_like(v) for k, v in params.items()})


# ------------------------------------------------------------------------ Adam at a zero gradient


def test_adam_step_derivative_at_zero_gradient_is_finite_and_exact():
    # One Adam step maps g to θ − lr · g / (|g| + eps) (bias corrections cancel at step 1), whose
    # derivative at g = 0 is −lr / eps; a plain sqrt would give NaN.
    lr, eps = 0.1, 1e-3
    p = torch.tensor([0.5, -1.0], dtype=F64)
    g = torch.tensor([0.0, 0.2], dtype=F64, requires_grad=True)
    new, _ = adam_step({"p": p}, {"p": g}, adam_init({"p": p}), lr=lr, eps=eps)
    (jac,) = torch.autograd.grad(new["p"].sum(), g)
    assert torch.isfinite(jac).all()
    expected = torch.tensor([-lr / eps, -lr * eps / (0.2 + eps) ** 2], dtype=F64)
    torch.testing.assert_close(jac, expected)


def _dead_relu_setup():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    # unit 1 is dead for every input: zero incoming weights, negative bias
    params["0.weight"][1] = 0.0
    params["0.bias"][1] = -1.0
    # keep the other units alive on the data
    params["0.bias"][[0, 2, 3]] = torch.tensor([0.3, 0.5, 0.4], dtype=F64)
    x = torch.randn(10, 2, dtype=F64) * 0.3
    y = torch.randn(10, 1, dtype=F64)
    task = ClientTask(x[:6], y[:6], x[6:], y[6:])
    return mse_fn(net), params, task


def test_adam_meta_gradient_with_dead_relu_unit_is_finite_and_matches_finite_differences():
    loss_fn, params, task = _dead_relu_setup()
    opt = Adam(lr=0.05, eps=1e-3)
    # the dead unit's coordinates have an exactly zero support gradient
    g = torch.func.grad(lambda p: loss_fn(p, task.support_x, task.support_y, None))(params)
    assert (g["0.weight"][1] == 0).all() and g["0.bias"][1] == 0 and g["2.weight"][0, 1] == 0

    meta, _ = maml_update(loss_fn, params, task, optimizer=opt, inner_steps=2)
    for v in meta.values():
        assert torch.isfinite(v).all()

    def objective(p):
        return maml_objective(loss_fn, p, task, optimizer=opt, inner_steps=2)[0]

    torch.testing.assert_close(meta, finite_difference_grad(objective, params), rtol=1e-5, atol=1e-8)
    # the live coordinates do carry a meta-gradient
    assert meta["0.weight"][0].abs().sum() > 0


# ---------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "factory, argument",
    [
        (lambda: SGD(lr=0), "`lr`"),
        (lambda: SGD(lr=-1), "`lr`"),
        (lambda: SGD(lr=float("inf")), "`lr`"),
        (lambda: Adam(lr=float("nan")), "`lr`"),
        (lambda: Adam(lr=0.0), "`lr`"),
        (lambda: SGD(momentum=1.5), "`momentum`"),
        (lambda: SGD(momentum=-0.1), "`momentum`"),
        (lambda: SGD(nesterov=True), "`momentum`"),
        (lambda: SGD(weight_decay=-1.0), "`weight_decay`"),
        (lambda: Adam(betas=(1.0, 0.9)), r"`betas\[0\]`"),
        (lambda: Adam(betas=(0.9, 1.2)), r"`betas\[1\]`"),
        (lambda: Adam(eps=0.0), "`eps`"),
        (lambda: Adam(weight_decay=-0.5), "`weight_decay`"),
    ],
)
def test_config_validation_names_the_argument(factory, argument):
    with pytest.raises(ValueError, match=argument):
        factory()


@pytest.mark.parametrize(
    "factory",
    [
        lambda: SGD(weight_decay=float("nan")),
        lambda: Adam(weight_decay=float("nan")),
        lambda: SGD(weight_decay=float("inf")),
        lambda: Adam(weight_decay=float("inf")),
    ],
    ids=["SGD-nan", "Adam-nan", "SGD-inf", "Adam-inf"],
)
def test_non_finite_weight_decay_is_rejected(factory):
    # a NaN check written as `weight_decay < 0` would let NaN through, and a NaN weight decay
    # turns every adapted parameter into NaN.
    with pytest.raises(ValueError, match="`weight_decay`"):
        factory()


def test_valid_configs_store_hyperparameters():
    sgd = SGD(lr=0.2, momentum=0.5, nesterov=True, weight_decay=0.1)
    assert (sgd.lr, sgd.momentum, sgd.nesterov, sgd.weight_decay) == (0.2, 0.5, True, 0.1)
    adam = Adam(lr=1e-3, betas=(0.5, 0.6), eps=1e-6)
    assert (adam.lr, adam.betas, adam.eps) == (1e-3, (0.5, 0.6), 1e-6)


# --------------------------------------------------------------------------- tensor learning rates


def test_sgd_step_with_per_element_lr_dict():
    torch.manual_seed(5)
    params = {"w": torch.randn(3, 2, dtype=F64), "b": torch.randn(3, dtype=F64)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    lrs = {k: torch.rand_like(v) for k, v in params.items()}
    new, state = sgd_step(params, grads, sgd_init(params), lr=lrs)
    assert state == {}
    for k in params:
        torch.testing.assert_close(new[k], params[k] - lrs[k] * grads[k])


def test_sgd_step_per_element_lr_with_momentum_and_config_override():
    torch.manual_seed(6)
    params = {"w": torch.randn(4, dtype=F64)}
    g1 = {"w": torch.randn(4, dtype=F64)}
    g2 = {"w": torch.randn(4, dtype=F64)}
    lrs = {"w": torch.rand(4, dtype=F64)}
    opt = SGD(lr=123.0, momentum=0.5)  # the explicit lr overrides the config's
    state = opt.init(params)
    p1, state = opt.step(params, g1, state, lrs)
    p2, state = opt.step(p1, g2, state, lrs)
    b1 = g1["w"]
    b2 = 0.5 * b1 + g2["w"]
    torch.testing.assert_close(p2["w"], params["w"] - lrs["w"] * b1 - lrs["w"] * b2)


def test_tensor_lr_is_differentiable():
    torch.manual_seed(7)
    params = {"w": torch.randn(3, dtype=F64)}
    grads = {"w": torch.randn(3, dtype=F64)}
    lr = torch.tensor(0.3, dtype=F64, requires_grad=True)
    new, _ = sgd_step(params, grads, {}, lr=lr)
    (d_lr,) = torch.autograd.grad(new["w"].sum(), lr)
    torch.testing.assert_close(d_lr, -grads["w"].sum())

    lrs = {"w": torch.rand(3, dtype=F64, requires_grad=True)}
    new, _ = adam_step(params, grads, adam_init(params), lr=lrs, eps=1e-8)
    (d_lrs,) = torch.autograd.grad(new["w"].sum(), lrs["w"])
    # first Adam step: θ − α · g / (|g| + eps)
    torch.testing.assert_close(d_lrs, -grads["w"] / (grads["w"].abs() + 1e-8))
