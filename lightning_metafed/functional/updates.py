"""Client-update rules, one per paper, for a single client's task: the meta-learning rules (MAML,
FOMAML, ANIL, Meta-SGD, Per-FedAvg) here, and the local-training rules (Reptile, FedAvg) in
:mod:`~lightning_metafed.functional.local_training`, re-exported here.

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
)
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.inner import LearningRate
from lightning_metafed.functional.local_training import (  # re-exported: this module is their public path
    detached_params,
    fedavg_update,
    local_data,
    params_difference,
    reptile_update,
)

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

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received (meta-)parameters ``θ``, by name.
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the differentiable inner optimizer (``init`` and ``step``).
        inner_steps: how many inner steps on the support set.
        first_order: detach the inner gradients (FOMAML).
        adapt_names: the parameters the inner loop adapts; ``None`` adapts all.
        lr: overrides the inner optimizer's learning rate (Meta-SGD's learned rates); ``None``: its own.
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

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received (meta-)parameters ``θ``, by name.
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the differentiable inner optimizer (``init`` and ``step``).
        inner_steps: how many inner steps on the support set.
        first_order: FOMAML: treat the inner gradients as constants.
        adapt_names: the parameters the inner loop adapts; ``None`` adapts all (the meta-gradient
            reaches every parameter).

    Example:
        One client fitting ``y = 3x`` with the model ``w·x``, from ``w = 0``:

        >>> import torch
        >>> from lightning_metafed.functional import ClientTask, maml_update, mse_loss
        >>> from lightning_metafed.inner import SGD
        >>> loss_fn = lambda params, x, y, mask: mse_loss(x * params["w"], y, mask)
        >>> x = torch.linspace(-1, 1, 11).unsqueeze(-1)
        >>> task = ClientTask(x[::2], 3 * x[::2], x[1::2], 3 * x[1::2])  # support, query
        >>> update, aux = maml_update(loss_fn, {"w": torch.zeros(1)}, task, optimizer=SGD(lr=0.1), inner_steps=1)
        >>> round(update["w"].item(), 4), round(aux["query_loss"].item(), 4)
        (-1.5783, 2.3675)
        >>> fomaml, _ = maml_update(loss_fn, {"w": torch.zeros(1)}, task, optimizer=SGD(lr=0.1), inner_steps=1, first_order=True)
        >>> round(fomaml["w"].item(), 4)  # without the (I − α∇²L_support) factor
        -1.7408
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

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received (meta-)parameters ``θ``, by name.
        task: the client's task (support and query sets, optional masks and step budget).
        head_names: the head's parameters, the only ones the inner loop adapts.
        optimizer: the differentiable inner optimizer (``init`` and ``step``).
        inner_steps: how many inner steps on the support set.
        first_order: treat the inner gradients as constants (first-order ANIL).
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

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received (meta-)parameters ``θ``, by name.
        lrs: the learned inner learning rates ``α``, by parameter name, shaped like the parameters (or scalars).
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the differentiable inner optimizer (``init`` and ``step``).
        inner_steps: how many inner steps on the support set.
        first_order: treat the inner gradients as constants.
        adapt_names: the parameters the inner loop adapts; ``None`` adapts all.
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


# ------------------------------------------------------------------------------------- Per-FedAvg


def hvp(loss: Callable[[Params], Tensor], params: Mapping[str, Tensor], vector: Mapping[str, Tensor]) -> Params:
    """Exact Hessian-vector product ``∇²loss(θ) · v`` (forward-over-reverse autodiff).

    Args:
        loss: the scalar function of the parameters whose Hessian is taken.
        params: the point ``θ`` the Hessian is evaluated at.
        vector: ``v``, by parameter name, shaped like ``params``.
    """
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

    Each of the ``τ = local_steps`` local steps, with batches ``D`` (support), ``D'`` and ``D''``:

    - ``θ̃ = θ − α ∇f(θ, D)``: ``inner_steps`` steps of the inner optimizer with its lr set to ``α``;
    - ``θ ← θ − β ∇f(θ̃, D')`` (FO) or ``θ ← θ − β (I − α ∇²f(θ, D'')) ∇f(θ̃, D')`` (HF).

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received (meta-)parameters ``θ``, by name.
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the inner optimizer of the ``θ̃`` step (its learning rate is set to ``alpha``).
        alpha: ``α``, the inner (personalization) step size.
        beta: ``β``, the local meta step size.
        local_steps: ``τ``, how many local meta steps.
        inner_steps: how many inner-optimizer steps make ``θ̃``.
        variant: ``"fo"`` (first-order) or ``"hf"`` (Hessian-free, with an exact Hessian-vector product).
        hessian_batch: ``D'`` and ``D''`` under HF (FO: ``D'`` is the query set): ``"query_split"``, the
            query's first and second halves (independent, as the paper requires), or ``"support"``, the
            query set and ``D'' = D`` (which makes the HF step the exact MAML meta-gradient).
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
