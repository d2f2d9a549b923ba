"""Personalized-federated client updates: one pure function per paper, with per-client state.

Each ``*_update`` function computes ONE client's round and returns ``(upload, aux, new_state)``:
``upload`` is the pseudo-gradient the client sends (``θ − θ_local`` over the shared parameters, so
that the server step ``θ ← θ − η · aggregate(upload_i)`` is the algorithm's outer update), ``aux``
holds detached scalar diagnostics, and ``new_state`` is the client's state row (a flat dict of
tensors) to store until the client is sampled again. The caller vmaps the function over clients
with the state rows stacked along dim 0.

Local training is first-order: the received parameters are detached, as in
:func:`~lightning_metafed.functional.updates.fedavg_update`. The training data is the support set,
plus the query set with ``use_query``; padding masks are honoured, and ``task.num_steps`` caps every
local loop. ``aux["support_loss"]`` is the loss of the received model on the training data;
``aux["query_loss"]`` (where present) is the query loss of the client's personalized model after
its local training.
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
)
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.proximal import proximal_loss
from lightning_metafed.functional.local_training import detached_params, local_data, params_difference

__all__ = [
    "APFL_ALPHA_KEY",
    "CONTROL_PREFIX",
    "apfl_update",
    "ditto_update",
    "fedper_update",
    "fedrep_update",
    "scaffold_server_control",
    "scaffold_update",
    "split_control",
]

#: Prefix of the control-variate delta's entries in a SCAFFOLD upload (``"control.<name>"``).
CONTROL_PREFIX = "control."
#: Key of the mixing weight ``α`` in an APFL state row (the other keys are parameter names).
APFL_ALPHA_KEY = "alpha"

Data = tuple[Tensor, Tensor, "Tensor | None"]


def _train(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    data: Data,
    *,
    optimizer: InnerStep,
    steps: int,
    names: Sequence[str] | None = None,
    num_steps: Tensor | int | None = None,
) -> tuple[Params, Tensor]:
    """``steps`` first-order steps of ``optimizer`` on ``names`` (all by default), the rest frozen.

    Returns the detached final parameters and the (detached) loss at the start.
    """
    x, y, mask = data
    first = None
    final: Params = dict(params)
    for final, loss in iterate_adaptation(
        loss_fn, params, x, y, optimizer=optimizer, steps=steps, mask=mask, first_order=True,
        adapt_names=names, num_steps=num_steps,
    ):
        if first is None:
            first = loss
    if first is None:  # steps == 0
        first = loss_fn(params, x, y, mask)
    return detached_params(final), first.detach()


def _query_loss(loss_fn: LossFn, params: Mapping[str, Tensor], task: ClientTask) -> Tensor:
    return loss_fn(params, task.query_x, task.query_y, task.query_mask).detach()


def _split_head(params: Mapping[str, Tensor], head: Mapping[str, Tensor], head_names: Sequence[str]) -> tuple[Params, Params]:
    """The shared body (``params`` without ``head_names``) and the personal head (from ``head``)."""
    missing = [n for n in head_names if n not in head]
    if not head_names or missing:
        raise ValueError(f"Expected `head_names` to be non-empty names of the head state {sorted(head)}, got {list(head_names)!r}")
    body = {k: v.detach() for k, v in params.items() if k not in head_names}
    return body, {k: head[k].detach() for k in head_names}


def fedper_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    head: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    inner_steps: int,
    head_names: Sequence[str],
    use_query: bool = True,
) -> tuple[Params, Aux, Params]:
    """FedPer client update (Arivazhagan, Aggarwal, Singh & Choudhary, 2019, "Federated Learning
    with Personalization Layers").

    The client's model is the shared body ``θ_B`` (from ``params``) with its personal head ``h``
    (state ``head``, keyed by ``head_names``). ``inner_steps`` steps of ``optimizer`` train both:
    ``(b_K, h_K) = U_K(θ_B, h)``. Upload: ``θ_B − b_K`` (body entries only); new state: ``h_K``.

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received parameters; their body entries are the shared body ``θ_B``.
        head: the client's stored head ``h`` (its state row), by parameter name.
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the local optimizer of body and head.
        inner_steps: ``K``, the local steps.
        head_names: the head's parameter names.
        use_query: train on support and query (``True``) or on the support set only.
    """
    body, personal = _split_head(params, head, head_names)
    data = local_data(task, use_query)
    final, first = _train(loss_fn, {**body, **personal}, data, optimizer=optimizer, steps=inner_steps,
                          num_steps=task.num_steps)
    new_head = {k: final[k] for k in head_names}
    aux = {"support_loss": first, "query_loss": _query_loss(loss_fn, final, task)}
    return params_difference(body, final), aux, new_head


def fedrep_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    head: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    head_steps: int,
    body_steps: int,
    head_names: Sequence[str],
    use_query: bool = True,
) -> tuple[Params, Aux, Params]:
    """FedRep client update (Collins, Hassani, Mokhtari & Shakkottai, 2021, "Exploiting Shared
    Representations for Personalized Federated Learning").

    With the body ``θ_B`` frozen, ``head_steps`` steps train the personal head:
    ``h⁺ = U_head(h; θ_B)``; then, with ``h⁺`` frozen, ``body_steps`` steps train the body:
    ``b = U_body(θ_B; h⁺)`` (each loop with a fresh ``optimizer`` state).
    Upload: ``θ_B − b`` (body entries only); new state: ``h⁺``.

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received parameters; their body entries are the shared body ``θ_B``.
        head: the client's stored head ``h`` (its state row), by parameter name.
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the local optimizer of both loops (a fresh state for each).
        head_steps: the steps that train the head, the body frozen.
        body_steps: the steps that then train the body, the head frozen.
        head_names: the head's parameter names.
        use_query: train on support and query (``True``) or on the support set only.
    """
    body, personal = _split_head(params, head, head_names)
    data = local_data(task, use_query)
    model = {**body, **personal}
    model, first = _train(loss_fn, model, data, optimizer=optimizer, steps=head_steps, names=list(head_names),
                          num_steps=task.num_steps)
    model, _ = _train(loss_fn, model, data, optimizer=optimizer, steps=body_steps, names=list(body),
                      num_steps=task.num_steps)
    aux = {"support_loss": first, "query_loss": _query_loss(loss_fn, model, task)}
    return params_difference(body, model), aux, {k: model[k] for k in head_names}


def ditto_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    personal: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    inner_steps: int,
    personal_steps: int,
    lam: float,
    personal_optimizer: InnerStep | None = None,
    use_query: bool = True,
) -> tuple[Params, Aux, Params]:
    """Ditto client update (Li, Hu, Beirami & Smith, 2021, "Ditto: Fair and Robust Federated
    Learning Through Personalization").

    Global part as FedAvg: ``w_K = U_K(θ)`` with ``optimizer``; upload ``θ − w_K``.
    Personal part: ``personal_steps`` steps of ``personal_optimizer`` (default ``optimizer``) on
    ``f(v) + λ/2 · ‖v − θ‖²`` from the stored ``v``, ``θ`` the received global parameters; with
    ``SGD(lr=η)`` each step is the paper's ``v ← v − η (∇f(v) + λ (v − θ))``. New state: ``v``.
    ``aux["personal_loss"]`` is that regularized objective at the stored ``v``.

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received global parameters ``θ``, by name.
        personal: the client's stored personal model ``v`` (its state row), by parameter name.
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the local optimizer of the global part.
        inner_steps: ``K``, the local steps of the global part.
        personal_steps: the steps of the personal model.
        lam: ``λ >= 0``, the strength of the pull towards the global model.
        personal_optimizer: the optimizer of the personal model (``None``: ``optimizer``).
        use_query: train on support and query (``True``) or on the support set only.
    """
    if not lam >= 0:
        raise ValueError(f"Expected `lam` >= 0, got {lam!r}")
    theta = detached_params(params)
    data = local_data(task, use_query)
    local, first = _train(loss_fn, theta, data, optimizer=optimizer, steps=inner_steps, num_steps=task.num_steps)

    personal_optimizer = optimizer if personal_optimizer is None else personal_optimizer
    v, personal_loss = _train(proximal_loss(loss_fn, theta, lam), {k: personal[k] for k in theta}, data, optimizer=personal_optimizer,
                              steps=personal_steps, num_steps=task.num_steps)
    aux = {"support_loss": first, "personal_loss": personal_loss, "query_loss": _query_loss(loss_fn, v, task)}
    return params_difference(theta, local), aux, v


def _effective_steps(num_steps: Tensor | int | None, steps: int) -> Tensor | int:
    """How many local steps a client with budget ``num_steps`` runs out of ``steps``."""
    if num_steps is None:
        return steps
    if isinstance(num_steps, int):
        return max(min(num_steps, steps), 0)
    return num_steps.clamp(0, steps)


def scaffold_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    control: Mapping[str, Tensor],
    task: ClientTask,
    *,
    lr: float,
    inner_steps: int,
    server_control: Mapping[str, Tensor],
    use_query: bool = True,
) -> tuple[Params, Aux, Params]:
    """SCAFFOLD client update, option II (Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, 2020,
    "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning").

    From ``y = θ``, ``K = inner_steps`` steps ``y ← y − lr · (∇f(y) − c_i + c)`` with the client's
    control variate ``c_i`` (state ``control``) and the server's ``c``; then
    ``c_i⁺ = c_i − c + (θ − y_K) / (K · lr)``. Upload: ``θ − y_K`` under the parameter names, and
    the control delta ``c_i⁺ − c_i`` under ``CONTROL_PREFIX + name`` (see :func:`split_control`);
    new state: ``c_i⁺``. A client whose step budget ``task.num_steps`` is smaller uses it as ``K``;
    with a budget of 0 its control variate is kept.

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received global parameters ``θ``, by name.
        control: the client's control variate ``c_i`` (its state row), by parameter name.
        task: the client's task (support and query sets, optional masks and step budget).
        lr: the local step size (``> 0``).
        inner_steps: ``K``, the local steps (``>= 1``).
        server_control: the server's control variate ``c``, by parameter name.
        use_query: train on support and query (``True``) or on the support set only.
    """
    if inner_steps < 1 or not lr > 0:
        raise ValueError(f"Expected `inner_steps` >= 1 and `lr` > 0, got inner_steps={inner_steps!r}, lr={lr!r}")
    theta = detached_params(params)
    x, y, mask = local_data(task, use_query)
    correction = {k: server_control[k].detach() - control[k].detach() for k in theta}
    local, first = dict(theta), None
    for k in range(inner_steps):
        grads, loss = torch.func.grad_and_value(lambda p: loss_fn(p, x, y, mask))(local)
        first = loss.detach() if first is None else first
        stepped = {n: (local[n] - lr * (grads[n].detach() + correction[n])).detach() for n in local}
        local = keep_after_budget(task.num_steps, k, stepped, local)
    update = params_difference(theta, local)
    steps = _effective_steps(task.num_steps, inner_steps)
    if isinstance(steps, int):
        active, scale = float(steps > 0), 1.0 / (max(steps, 1) * lr)
    else:  # one client's budget under vmap: a 0-d tensor
        dtype = next(iter(theta.values())).dtype
        active, scale = (steps > 0).to(dtype), 1.0 / (steps.clamp_min(1).to(dtype) * lr)
    delta = {k: active * (update[k] * scale - server_control[k].detach()) for k in theta}
    new_control = {k: control[k].detach() + delta[k] for k in theta}
    upload = {**update, **{CONTROL_PREFIX + k: delta[k] for k in theta}}
    return upload, {"support_loss": first}, new_control


def split_control(upload: Mapping[str, Tensor]) -> tuple[Params, Params]:
    """A SCAFFOLD upload (or its aggregate) split into ``(parameter update, control delta)``, both
    keyed by parameter name.

    Args:
        upload: a SCAFFOLD upload: parameter updates and ``CONTROL_PREFIX``-keyed control deltas.
    """
    update = {k: v for k, v in upload.items() if not k.startswith(CONTROL_PREFIX)}
    delta = {k[len(CONTROL_PREFIX):]: v for k, v in upload.items() if k.startswith(CONTROL_PREFIX)}
    return update, delta


def scaffold_server_control(
    control: Mapping[str, Tensor], mean_delta: Mapping[str, Tensor], sampled: int, population: int
) -> Params:
    """SCAFFOLD's server control update ``c ← c + (|S| / N) · mean_{i∈S}(c_i⁺ − c_i)``
    (Karimireddy et al., 2020), with ``|S| = sampled`` clients out of ``N = population``.

    Args:
        control: the server's control variate ``c``, by parameter name.
        mean_delta: the mean of the round's clients' control deltas ``c_i⁺ − c_i``.
        sampled: ``|S|``, the clients sampled this round.
        population: ``N``, the clients in the whole population.
    """
    if not 0 < sampled <= population:
        raise ValueError(f"Expected 0 < `sampled` <= `population`, got sampled={sampled!r}, population={population!r}")
    return {k: control[k] + (sampled / population) * mean_delta[k] for k in control}


def apfl_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    personal: Mapping[str, Tensor],
    task: ClientTask,
    *,
    lr: float,
    inner_steps: int,
    alpha_lr: float,
    use_query: bool = True,
) -> tuple[Params, Aux, Params]:
    """APFL client update (Deng, Kamani & Mahdavi, 2020, "Adaptive Personalized Federated Learning").

    State: the personal model ``v`` (parameter names) and the mixing weight ``α`` (key
    ``APFL_ALPHA_KEY``). From ``w = θ``, each of ``inner_steps`` steps, all gradients at the
    current iterates with ``v̄ = α v + (1 − α) w``:
    ``w ← w − lr ∇f(w)``, ``v ← v − lr ∇_v f(v̄)``, ``α ← clamp(α − alpha_lr ∇_α f(v̄), 0, 1)``.
    Upload: ``θ − w_K``; new state: ``(v_K, α_K)``. ``aux["query_loss"]`` is the query loss of the
    final mixed model ``v̄_K``. A stored ``α`` outside ``[0, 1]`` is clamped first.

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received global parameters ``θ``, by name.
        personal: the client's state row: its personal model ``v`` and mixing weight ``α`` (``APFL_ALPHA_KEY``).
        task: the client's task (support and query sets, optional masks and step budget).
        lr: the local step size of ``w`` and ``v``.
        inner_steps: the local steps.
        alpha_lr: the step size of the mixing weight ``α`` (``>= 0``; ``0`` keeps it fixed).
        use_query: train on support and query (``True``) or on the support set only.
    """
    if APFL_ALPHA_KEY in params:
        raise ValueError(f"Expected no parameter named {APFL_ALPHA_KEY!r} (the key of APFL's mixing weight)")
    if not alpha_lr >= 0:
        raise ValueError(f"Expected `alpha_lr` >= 0, got {alpha_lr!r}")
    theta = detached_params(params)
    x, y, mask = local_data(task, use_query)
    w, v = dict(theta), {k: personal[k].detach() for k in theta}
    alpha = personal[APFL_ALPHA_KEY].detach().clamp(0.0, 1.0)
    first = None

    def mixed_loss(v_: Params, a: Tensor, w_: Params) -> Tensor:
        return loss_fn({k: a * v_[k] + (1 - a) * w_[k] for k in w_}, x, y, mask)

    for k in range(inner_steps):
        g_w, loss = torch.func.grad_and_value(lambda p: loss_fn(p, x, y, mask))(w)
        first = loss.detach() if first is None else first
        g_v, g_a = torch.func.grad(mixed_loss, argnums=(0, 1))(v, alpha, w)
        budget = task.num_steps  # every gradient above is taken at the iterates before this step
        w = keep_after_budget(budget, k, {n: (w[n] - lr * g_w[n]).detach() for n in w}, w)
        v = keep_after_budget(budget, k, {n: (v[n] - lr * g_v[n]).detach() for n in v}, v)
        alpha = keep_after_budget(budget, k, {"a": (alpha - alpha_lr * g_a).clamp(0.0, 1.0).detach()}, {"a": alpha})["a"]
    if first is None:
        first = loss_fn(theta, x, y, mask).detach()
    mixed = {k: alpha * v[k] + (1 - alpha) * w[k] for k in w}
    aux = {"support_loss": first, "query_loss": _query_loss(loss_fn, mixed, task)}
    return params_difference(theta, w), aux, {**v, APFL_ALPHA_KEY: alpha}
