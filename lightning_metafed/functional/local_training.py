"""Client updates by local training: the client trains a copy of the received parameters ``θ`` on
its own data and uploads the parameter delta ``θ − θ_local`` (Reptile, FedAvg), with the helpers
that every rule with first-order local training shares (:mod:`~lightning_metafed.functional.proximal`,
:mod:`~lightning_metafed.functional.personalized`, Per-FedAvg in
:mod:`~lightning_metafed.functional.updates`).

Like every ``*_update`` rule, each returns ``(update, aux)`` for one client (vectorized over
clients with ``torch.func.vmap`` by the caller): ``update`` is a pseudo-gradient with the
parameters' shapes, so that the server step ``θ ← θ − η · aggregate(update_i)`` is the algorithm's
outer update, and ``aux`` holds detached scalar diagnostics. Local training is first-order: the
received parameters are detached. Every public name here is also importable from
:mod:`lightning_metafed.functional.updates`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_metafed.functional.adapt import (
    InnerStep,
    LossFn,
    iterate_adaptation,
    keep_after_budget,
    keep_where,
)
from lightning_metafed.functional.client_task import Aux, ClientTask, Params

__all__ = ["detached_params", "fedavg_update", "local_data", "params_difference", "reptile_update"]


def detached_params(params: Mapping[str, Tensor]) -> Params:
    """``params`` cut from the graph (local training is first-order from here)."""
    return {k: v.detach() for k, v in params.items()}


def params_difference(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> Params:
    """``before − after`` for every entry of ``before`` (a pseudo-gradient upload)."""
    return {k: before[k] - after[k] for k in before}


def local_data(task: ClientTask, use_query: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """A client's training data: its support set, or support and query concatenated."""
    if not use_query:
        return task.support_x, task.support_y, task.support_mask
    x = torch.cat([task.support_x, task.query_x], dim=0)
    y = torch.cat([task.support_y, task.query_y], dim=0)
    mask = None
    if task.support_mask is not None or task.query_mask is not None:
        ones = torch.ones
        sm = task.support_mask if task.support_mask is not None else ones(task.support_x.shape[0], device=x.device)
        qm = task.query_mask if task.query_mask is not None else ones(task.query_x.shape[0], device=x.device)
        mask = torch.cat([sm.float(), qm.float()], dim=0)
        # Real examples first, padding last, so mini-batches hold the same real examples as unpadded data.
        order = torch.argsort(mask, descending=True, stable=True)
        x, y, mask = x[order], y[order], mask[order]
    return x, y, mask


def reptile_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    inner_steps: int,
    use_query: bool = True,
) -> tuple[Params, Aux]:
    """Reptile client update ``θ − θ_K`` (Nichol, Achiam & Schulman, 2018, "On First-Order
    Meta-Learning Algorithms").

    ``θ_K`` is ``inner_steps`` steps of the inner optimizer on the client's data (support, plus query
    when ``use_query``). With server ``SGD(lr=ε)`` the outer step is ``θ ← θ + ε · mean_i(θ_K,i − θ)``.

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received (meta-)parameters ``θ``, by name.
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the differentiable inner optimizer (``init`` and ``step``).
        inner_steps: ``K``, how many inner steps on the client's data.
        use_query: train on support and query (``True``) or on the support set only.
    """
    theta = detached_params(params)
    x, y, mask = local_data(task, use_query)
    support_loss = None
    final: Params = theta
    for final, loss in iterate_adaptation(
        loss_fn, theta, x, y, optimizer=optimizer, steps=inner_steps, mask=mask, first_order=True, num_steps=task.num_steps
    ):
        if support_loss is None:
            support_loss = loss
    if support_loss is None:
        support_loss = loss_fn(theta, x, y, mask)
    final = detached_params(final)
    return params_difference(theta, final), {"support_loss": support_loss.detach()}


def fedavg_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    local_epochs: int = 1,
    batch_size: int | None = None,
    use_query: bool = True,
    adapt_names: Sequence[str] | None = None,
) -> tuple[Params, Aux]:
    """FedAvg client update ``θ − θ_local`` (McMahan et al., 2017, "Communication-Efficient
    Learning of Deep Networks from Decentralized Data").

    ``θ_local``: ``local_epochs`` passes over the local data in consecutive mini-batches, one
    optimizer step each. With server ``SGD(lr=1)`` and sample-count weights the server step is
    exactly FedAvg's weighted average of ``θ_local``. A mini-batch holding only padding (mask 0;
    padding sorts last) changes neither the parameters, the optimizer state nor the step count, so
    a client's update does not depend on its padding.

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received (meta-)parameters ``θ``, by name.
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the local optimizer (its state carried across the whole local run).
        local_epochs: passes over the local data.
        batch_size: the local mini-batch size (``None``: full batch).
        use_query: train on support and query (``True``) or on the support set only.
        adapt_names: the parameters trained (``None``: all); the others stay as received, their
            upload entries zero.

    Example:
        One client fitting ``y = 3x`` with the model ``w·x``: the upload is ``θ − θ_local``.

        >>> import torch
        >>> from lightning_metafed.functional import ClientTask, fedavg_update, mse_loss
        >>> from lightning_metafed.inner import SGD
        >>> loss_fn = lambda params, x, y, mask: mse_loss(x * params["w"], y, mask)
        >>> x = torch.linspace(-1, 1, 11).unsqueeze(-1)
        >>> task = ClientTask(x[::2], 3 * x[::2], x[1::2], 3 * x[1::2])
        >>> update, aux = fedavg_update(loss_fn, {"w": torch.zeros(1)}, task, optimizer=SGD(lr=0.1),
        ...                             local_epochs=3, batch_size=4)
        >>> round(update["w"].item(), 4), round(aux["support_loss"].item(), 4)
        (-1.5564, 3.24)
    """
    x, y, mask = local_data(task, use_query)
    n = x.shape[0]
    b = n if batch_size is None else min(batch_size, n)
    theta = detached_params(params)
    trained = set(theta) if adapt_names is None else set(adapt_names)
    if not trained <= set(theta):
        raise ValueError(f"Expected `adapt_names` to name parameters among {sorted(theta)}, got {sorted(trained - set(theta))!r}")
    frozen = {k: v for k, v in theta.items() if k not in trained}
    local = {k: v for k, v in theta.items() if k in trained}
    local, first_loss = _local_run(
        loss_fn, frozen, local, (x, y, mask), optimizer=optimizer, local_epochs=local_epochs, batch_size=b, num_steps=task.num_steps
    )
    if first_loss is None:
        first_loss = loss_fn(theta, x, y, mask)
    return params_difference(theta, {**frozen, **local}), {"support_loss": first_loss.detach()}


def _local_run(
    loss_fn: LossFn,
    frozen: Params,
    local: Params,
    data: tuple[Tensor, Tensor, Tensor | None],
    *,
    optimizer: InnerStep,
    local_epochs: int,
    batch_size: int,
    num_steps: Tensor | int | None,
) -> tuple[Params, Tensor | None]:
    """FedAvg's local run: the trained entries ``local`` (``frozen`` stays) after ``local_epochs``
    passes over ``data = (x, y, mask)`` in consecutive mini-batches of ``batch_size``, one optimizer
    step each (its state carried across the run), and the first mini-batch's loss (``None``: no
    step). ``num_steps`` caps the steps; a mini-batch of padding only is no step."""
    x, y, mask = data
    n, b = x.shape[0], batch_size
    state = optimizer.init(local)
    first_loss = None
    k = done = 0  # local optimizer steps so far, and (with a mask) those on real data; ``num_steps`` caps them
    for _ in range(local_epochs):
        for start in range(0, n, b):
            sl = slice(start, start + b)
            grads, loss = torch.func.grad_and_value(
                lambda p: loss_fn({**frozen, **p}, x[sl], y[sl], None if mask is None else mask[sl])
            )(local)
            if first_loss is None:
                first_loss = loss
            stepped, stepped_state = optimizer.step(local, {n: g.detach() for n, g in grads.items()}, state)
            if mask is None:  # past the budget the state still advances, unused: the parameters stay
                local, state = keep_after_budget(num_steps, k, detached_params(stepped), local), stepped_state
            else:  # a mini-batch of padding only is no step and does not count against the budget
                active = _real_step(mask[sl], num_steps, done)
                local, state = keep_where(active, detached_params(stepped), local), keep_where(active, stepped_state, state)
                done = done + active.long()
            k += 1
    return local, first_loss


def _real_step(batch_mask: Tensor, num_steps: Tensor | int | None, done: Tensor | int) -> Tensor:
    """Whether a masked mini-batch is a local step: it holds a real example and the client's step
    budget (``num_steps``, or none) exceeds the ``done`` real steps so far."""
    active = batch_mask.sum() > 0
    if num_steps is None:
        return active
    return active & (torch.as_tensor(num_steps, device=active.device) > done)
