"""``adapt``, ``iterate_adaptation`` and ``select_params``."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import F64, autograd_grad, mlp_problem, plain_mse

from lightning_metafed.functional import (
    adapt,
    cross_entropy_loss,
    iterate_adaptation,
    masked_mean,
    mse_loss,
    select_params,
)
from lightning_metafed.inner import SGD, Adam


def _mlp_problem(seed: int = 0, n: int = 6):
    """``(net, loss_fn, params, x, y)``: the shared MLP problem with ``n`` support examples only."""
    net, loss_fn, params, task = mlp_problem(seed, hidden=8, support=n, query=0)
    return net, loss_fn, params, task.support_x, task.support_y


def test_adapt_one_sgd_step_equals_hand_update():
    net, loss_fn, params, x, y = _mlp_problem()
    alpha = 0.3
    adapted = adapt(loss_fn, params, x, y, optimizer=SGD(lr=alpha), steps=1)
    grads = autograd_grad(net, params, x, y)
    expected = {k: params[k] - alpha * grads[k] for k in params}
    torch.testing.assert_close(adapted, expected)


def test_adapt_three_sgd_steps_equals_hand_loop():
    net, loss_fn, params, x, y = _mlp_problem(seed=1)
    alpha = 0.2
    adapted = adapt(loss_fn, params, x, y, optimizer=SGD(lr=alpha), steps=3)
    current = dict(params)
    for _ in range(3):
        grads = autograd_grad(net, current, x, y)
        current = {k: current[k] - alpha * grads[k] for k in current}
    torch.testing.assert_close(adapted, current)


def test_adapt_zero_steps_returns_the_parameters():
    _, loss_fn, params, x, y = _mlp_problem(seed=2)
    adapted = adapt(loss_fn, params, x, y, optimizer=SGD(lr=0.1), steps=0)
    assert set(adapted) == set(params)
    torch.testing.assert_close(adapted, params)


def test_adapt_is_differentiable_wrt_params():
    # d/dθ of one SGD step: (I − α ∇²L) — check via the directional derivative against a
    # finite difference along a random direction.
    _, loss_fn, params, x, y = _mlp_problem(seed=3)
    opt = SGD(lr=0.25)
    torch.manual_seed(30)
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p):
        return adapt(loss_fn, p, x, y, optimizer=opt, steps=2)

    _, tangent = torch.func.jvp(f, (params,), (direction,))
    h = 1e-6
    plus = f({k: params[k] + h * direction[k] for k in params})
    minus = f({k: params[k] - h * direction[k] for k in params})
    fd = {k: (plus[k] - minus[k]) / (2 * h) for k in params}
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)


def test_adapt_names_only_changes_selected_parameters():
    net, loss_fn, params, x, y = _mlp_problem(seed=4)
    alpha = 0.3
    head = ["2.weight", "2.bias"]
    adapted = adapt(loss_fn, params, x, y, optimizer=SGD(lr=alpha), steps=1, adapt_names=head)
    grads = autograd_grad(net, params, x, y)
    for k in params:
        if k in head:
            torch.testing.assert_close(adapted[k], params[k] - alpha * grads[k])
            assert not torch.allclose(adapted[k], params[k])
        else:
            torch.testing.assert_close(adapted[k], params[k], rtol=0, atol=0)


def test_adapt_names_with_adam_keeps_body_fixed_over_steps():
    _, loss_fn, params, x, y = _mlp_problem(seed=5)
    adapted = adapt(loss_fn, params, x, y, optimizer=Adam(lr=0.05), steps=3, adapt_names=["0.bias"])
    assert set(adapted) == set(params)
    for k in ["0.weight", "2.weight", "2.bias"]:
        torch.testing.assert_close(adapted[k], params[k], rtol=0, atol=0)
    assert not torch.allclose(adapted["0.bias"], params["0.bias"])


def test_select_params_patterns():
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert select_params(names, None) == names
    assert select_params(names, "2.*") == ["2.weight", "2.bias"]
    assert select_params(names, ["*.bias", "0.weight"]) == ["0.weight", "0.bias", "2.bias"]


def test_select_params_unmatched_pattern_raises():
    names = ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match="`adapt_params`") as info:
        select_params(names, ["0.*", "head.*"])
    assert "head.*" in str(info.value)
    with pytest.raises(ValueError, match=re.escape("'head.*'") + ".*`adapt_params`"):
        select_params(names, "head.*")
    with pytest.raises(ValueError, match="`head_params`"):
        select_params(names, ["nothing"], argument="head_params")
    with pytest.raises(ValueError, match="`adapt_params`"):
        select_params(names, [])


def test_negative_steps_raise():
    _, loss_fn, params, x, y = _mlp_problem(seed=6)
    with pytest.raises(ValueError, match="`steps`"):
        adapt(loss_fn, params, x, y, optimizer=SGD(lr=0.1), steps=-1)
    with pytest.raises(ValueError, match="`steps`"):
        list(iterate_adaptation(loss_fn, params, x, y, optimizer=SGD(lr=0.1), steps=-1))


def test_iterate_adaptation_yields_steps_plus_one_param_dicts():
    net, loss_fn, params, x, y = _mlp_problem(seed=7)
    alpha, steps = 0.2, 4
    yielded = list(iterate_adaptation(loss_fn, params, x, y, optimizer=SGD(lr=alpha), steps=steps))
    assert len(yielded) == steps + 1
    torch.testing.assert_close(yielded[0][0], params)
    assert yielded[-1][1] is None
    current = dict(params)
    for k in range(steps + 1):
        p_k, loss_k = yielded[k]
        torch.testing.assert_close(p_k, current)
        if k < steps:
            torch.testing.assert_close(loss_k, plain_mse(net, current, x, y))
            grads = autograd_grad(net, current, x, y)
            current = {n: current[n] - alpha * grads[n] for n in current}
    # losses decrease along the path for a small step size
    losses = [loss for _, loss in yielded[:-1]]
    assert losses[-1] < losses[0]


def test_iterate_adaptation_zero_steps_yields_once():
    _, loss_fn, params, x, y = _mlp_problem(seed=8)
    yielded = list(iterate_adaptation(loss_fn, params, x, y, optimizer=SGD(lr=0.1), steps=0))
    assert len(yielded) == 1
    torch.testing.assert_close(yielded[0][0], params)
    assert yielded[0][1] is None


@pytest.mark.parametrize("optimizer", [SGD(lr=0.2, momentum=0.9), Adam(lr=0.05)])
def test_masked_padding_does_not_change_adaptation(optimizer):
    _, loss_fn, params, x, y = _mlp_problem(seed=9, n=5)
    torch.manual_seed(90)
    # two padded rows with arbitrary (finite) junk, interleaved with the real ones
    junk_x = torch.randn(2, 1, dtype=F64) * 10
    junk_y = torch.randn(2, 1, dtype=F64) * 10
    x_pad = torch.cat([x[:2], junk_x[:1], x[2:], junk_x[1:]])
    y_pad = torch.cat([y[:2], junk_y[:1], y[2:], junk_y[1:]])
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=F64)

    plain = adapt(loss_fn, params, x, y, optimizer=optimizer, steps=3)
    padded = adapt(loss_fn, params, x_pad, y_pad, optimizer=optimizer, steps=3, mask=mask)
    torch.testing.assert_close(padded, plain)
    # an all-ones mask over the padded data is different (the junk rows count then)
    unmasked = adapt(loss_fn, params, x_pad, y_pad, optimizer=optimizer, steps=3, mask=torch.ones(7, dtype=F64))
    assert not torch.allclose(unmasked["2.bias"], plain["2.bias"])


def test_bool_mask_and_masked_losses():
    torch.manual_seed(10)
    values = torch.randn(6, dtype=F64)
    mask = torch.tensor([True, False, True, True, False, True])
    torch.testing.assert_close(masked_mean(values, mask), values[mask].mean())
    torch.testing.assert_close(masked_mean(values, None), values.mean())

    pred = torch.randn(6, 2, dtype=F64)
    target = torch.randn(6, 2, dtype=F64)
    torch.testing.assert_close(mse_loss(pred, target, mask), ((pred - target) ** 2).mean(1)[mask].mean())

    logits = torch.randn(6, 3, dtype=F64)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    logp = torch.log_softmax(logits, dim=1)
    nll = -logp[torch.arange(6), labels]
    torch.testing.assert_close(cross_entropy_loss(logits, labels, mask), nll[mask].mean())
