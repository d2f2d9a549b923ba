"""Client-update rules, one per paper, for a single client's task.

Each ``*_update`` function returns ``(update, aux)`` where ``update`` is the dict of tensors the
client uploads — a *pseudo-gradient* with the meta-parameters' shapes, so that the server step
``θ ← θ − η · aggregate(update_i)`` is the algorithm's outer update — and ``aux`` holds detached
scalar diagnostics (losses). Functions are written for one client and vectorized over clients with
``torch.func.vmap`` by the caller; they never touch ``.data`` and never write in place.

``loss_fn(params, x, y, mask) -> scalar`` evaluates the model functionally; see
:mod:`lightning_metafed.functional.adapt`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

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
from lightning_metafed.functional.inner import LearningRate

__all__ = [
    "maml_objective",
    "maml_update",
    "meta_sgd_update",
    "anil_update",
    "reptile_update",
    "per_fedavg_update",
    "fedavg_update",
    "hvp",
    "detached_params",
    "local_data",
    "params_difference",
]


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


# --------------------------------------------------------------------------------------------- MAML


def maml_objective(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    inner_steps: int,
    first_order: bool = False,
    adapt_names: Sequence[str] | None = None,
    lr: LearningRate | None = None,
) -> tuple[Tensor, Aux]:
    """MAML's per-client objective ``L_query(U_K(θ))`` and diagnostics.

    ``U_K`` is ``inner_steps`` steps of the differentiable inner optimizer on the support set
    (Finn, Abbeel & Levine, 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks"; for one SGD step ``U_1(θ) = θ − α ∇L_support(θ)``). Returns ``(loss, aux)`` with
    ``aux = {"support_loss": L_support(θ), "query_loss": L_query(U_K(θ))}`` (detached).
    """
    support_loss = None
    adapted: Params = dict(params)
    for adapted, loss in iterate_adaptation(
        loss_fn,
        params,
        task.support_x,
        task.support_y,
        optimizer=optimizer,
        steps=inner_steps,
        mask=task.support_mask,
        lr=lr,
        first_order=first_order,
        adapt_names=adapt_names,
        num_steps=task.num_steps,
    ):
        if support_loss is None:
            support_loss = loss
    if support_loss is None:  # inner_steps == 0
        support_loss = loss_fn(params, task.support_x, task.support_y, task.support_mask)
    query_loss = loss_fn(adapted, task.query_x, task.query_y, task.query_mask)
    return query_loss, {"support_loss": support_loss.detach(), "query_loss": query_loss.detach()}


def maml_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    inner_steps: int,
    first_order: bool = False,
    adapt_names: Sequence[str] | None = None,
) -> tuple[Params, Aux]:
    """MAML / FOMAML client update: the meta-gradient ``∇_θ L_query(U_K(θ))``.

    Second-order (default): for one SGD step the exact
    ``(I − α ∇²L_support(θ)) ∇L_query(θ − α ∇L_support(θ))``, differentiating through every
    inner step and the inner optimizer's state (Finn et al., 2017).
    ``first_order=True`` (FOMAML, same paper, Sec. 5.2): inner gradients are treated as constants,
    so the update is ``∇L_query`` evaluated at the adapted parameters.
    """
    return torch.func.grad(
        lambda p: maml_objective(
            loss_fn,
            p,
            task,
            optimizer=optimizer,
            inner_steps=inner_steps,
            first_order=first_order,
            adapt_names=adapt_names,
        ),
        has_aux=True,
    )(dict(params))


def anil_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: ClientTask,
    *,
    head_names: Sequence[str],
    optimizer: InnerStep,
    inner_steps: int,
    first_order: bool = False,
) -> tuple[Params, Aux]:
    """ANIL client update (Raghu et al., 2020, "Rapid Learning or Feature Reuse?").

    MAML whose inner loop adapts only the head ``φ ⊂ θ``; the meta-gradient still reaches the body
    through the query loss: ``∇_θ L_query(θ_body, U_K(φ))``.
    """
    return maml_update(
        loss_fn,
        params,
        task,
        optimizer=optimizer,
        inner_steps=inner_steps,
        first_order=first_order,
        adapt_names=head_names,
    )


def meta_sgd_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    lrs: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    inner_steps: int,
    first_order: bool = False,
    adapt_names: Sequence[str] | None = None,
) -> tuple[tuple[Params, Params], Aux]:
    """Meta-SGD client update (Li, Zhou, Chen & Li, 2017, "Meta-SGD: Learning to Learn Quickly").

    The inner step is ``θ' = θ − α ∘ ∇L_support(θ)`` with a learned learning rate ``α`` of the
    parameters' shape (``lrs``). Both the initialization and ``α`` are meta-learned with their true
    gradients ``(∇_θ, ∇_α) L_query(θ')`` — for one step ``∇_α = −∇L_support(θ) ∘ ∇L_query(θ')``.
    Returns ``((grad_params, grad_lrs), aux)``.
    """
    return torch.func.grad(
        lambda p, a: maml_objective(
            loss_fn,
            p,
            task,
            optimizer=optimizer,
            inner_steps=inner_steps,
            first_order=first_order,
            adapt_names=adapt_names,
            lr=a,
        ),
        argnums=(0, 1),
        has_aux=True,
    )(dict(params), dict(lrs))


# ------------------------------------------------------------------------- parameter-delta rules


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

    ``θ_local``: ``local_epochs`` passes over all local data (support and, with ``use_query``,
    query) in consecutive mini-batches of ``batch_size`` (``None``: full batch), one inner-optimizer
    step each, the optimizer state carried across the local run. With server ``SGD(lr=1)`` and
    sample-count weights the server step is exactly FedAvg's weighted average of ``θ_local``.
    ``adapt_names`` (default: all) are the entries trained; the others stay as received (their
    upload entries are zero). A mini-batch holding only padding (mask 0; padding sorts last) changes
    neither the parameters, the optimizer state nor the step count, so a client's update does not
    depend on its padding.
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
    state = optimizer.init(local)
    first_loss = None
    k = done = 0  # local optimizer steps so far, and (with a mask) those on real data; ``task.num_steps`` caps them
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
                local, state = keep_after_budget(task.num_steps, k, detached_params(stepped), local), stepped_state
            else:  # a mini-batch of padding only is no step and does not count against the budget
                active = _real_step(mask[sl], task.num_steps, done)
                local, state = keep_where(active, detached_params(stepped), local), keep_where(active, stepped_state, state)
                done = done + active.long()
            k += 1
    if first_loss is None:
        first_loss = loss_fn(theta, x, y, mask)
    return params_difference(theta, {**frozen, **local}), {"support_loss": first_loss.detach()}


def _real_step(batch_mask: Tensor, num_steps: Tensor | int | None, done: Tensor | int) -> Tensor:
    """Whether a masked mini-batch is a local step: it holds a real example and the client's step
    budget (``num_steps``, or none) exceeds the ``done`` real steps so far."""
    active = batch_mask.sum() > 0
    if num_steps is None:
        return active
    return active & (torch.as_tensor(num_steps, device=active.device) > done)


def hvp(loss: Callable[[Params], Tensor], params: Mapping[str, Tensor], vector: Mapping[str, Tensor]) -> Params:
    """Exact Hessian-vector product ``∇²loss(θ) · v`` (forward-over-reverse autodiff)."""
    return torch.func.jvp(torch.func.grad(loss), (dict(params),), (dict(vector),))[1]


Batch = tuple[Tensor | None, Tensor | None, Tensor | None]


def _per_fedavg_batches(task: ClientTask, variant: str, hessian_batch: str) -> tuple[Batch, Batch]:
    """Per-FedAvg's ``D'`` and (HF only) ``D''``: the query's halves, or the query and the support."""
    q = (task.query_x, task.query_y, task.query_mask)
    if variant != "hf":
        return q, (None, None, None)
    if hessian_batch == "support":
        return q, (task.support_x, task.support_y, task.support_mask)
    half = task.query_x.shape[0] // 2
    first = tuple(None if t is None else t[:half] for t in q)
    second = tuple(None if t is None else t[half:] for t in q)
    return first, second


def per_fedavg_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    alpha: float,
    beta: float,
    local_steps: int = 1,
    inner_steps: int = 1,
    variant: Literal["fo", "hf"] = "fo",
    hessian_batch: Literal["query_split", "support"] = "query_split",
) -> tuple[Params, Aux]:
    """Per-FedAvg client update ``θ − θ_local`` (Fallah, Mokhtari & Ozdaglar, 2020, "Personalized
    Federated Learning with Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach").

    Each of ``local_steps`` (τ) local steps, with batches ``D`` (support), ``D'`` and ``D''``:

    - ``θ̃ = θ − α ∇f(θ, D)`` (``inner_steps`` steps of the inner optimizer with its lr set to ``α``);
    - FO: ``θ ← θ − β ∇f(θ̃, D')``;
    - HF: ``θ ← θ − β (I − α ∇²f(θ, D'')) ∇f(θ̃, D')`` with an exact Hessian-vector product.

    ``D'`` is the query set. For HF, ``hessian_batch="query_split"`` uses the query's first half as
    ``D'`` and its second half as the independent ``D''`` (as the paper requires);
    ``"support"`` uses ``D'' = D``, which makes the HF step equal the exact MAML meta-gradient.
    """
    theta = detached_params(params)
    sx, sy, sm = task.support_x, task.support_y, task.support_mask
    (qx, qy, qm), (hx, hy, hm) = _per_fedavg_batches(task, variant, hessian_batch)
    local = dict(theta)
    support_loss = query_loss = None
    for t in range(local_steps):  # ``task.num_steps`` caps the local steps
        tilde = None
        for tilde, loss in iterate_adaptation(
            loss_fn, local, sx, sy, optimizer=optimizer, steps=inner_steps, mask=sm, lr=alpha, first_order=True
        ):
            if support_loss is None:
                support_loss = loss
        g, q_loss = torch.func.grad_and_value(lambda p: loss_fn(p, qx, qy, qm))(detached_params(tilde))
        if query_loss is None:
            query_loss = q_loss
        if variant == "hf":
            hv = hvp(lambda p: loss_fn(p, hx, hy, hm), local, g)
            g = {k: g[k] - alpha * hv[k] for k in g}
        local = keep_after_budget(task.num_steps, t, {k: (local[k] - beta * g[k]).detach() for k in local}, local)
    if support_loss is None:
        support_loss = loss_fn(theta, sx, sy, sm)
    aux = {"support_loss": support_loss.detach()}
    if query_loss is not None:
        aux["query_loss"] = query_loss.detach()
    return params_difference(theta, local), aux
