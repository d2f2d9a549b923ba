"""Client updates with a proximal term to the received model: FedProx and pFedMe, and FedBABU's
body-only local training.

Each ``*_update`` function computes ONE client's round and returns ``(upload, aux)`` like
:mod:`~lightning_metafed.functional.updates`: ``upload`` is the pseudo-gradient ``θ − θ_local`` (so
that the server step ``θ ← θ − η · aggregate(upload_i)`` is the algorithm's outer update) and
``aux`` holds detached scalar diagnostics. Local training is first-order from the received
parameters, which are detached; padding masks are honoured and ``task.num_steps`` caps the local
loop (mini-batch steps for FedProx and FedBABU, local rounds for pFedMe).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_metafed.functional.adapt import (
    InnerStep,
    LossFn,
    adapt,
    keep_after_budget,
)
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.local_training import (
    detached_params,
    fedavg_update,
    local_data,
    params_difference,
)

__all__ = ["fedbabu_update", "fedprox_update", "pfedme_personalize", "pfedme_update", "proximal_loss"]


def proximal_loss(loss_fn: LossFn, anchor: Mapping[str, Tensor], strength: float) -> LossFn:
    """``p ↦ loss_fn(p) + strength/2 · ‖p − anchor‖²`` over the entries of ``anchor`` (the anchor
    is a constant: no gradient flows to it).

    Args:
        loss_fn: the loss to regularize, ``loss_fn(params, x, y, mask) -> scalar``.
        anchor: the point the proximal term pulls towards, by parameter name.
        strength: the proximal coefficient (``μ`` or ``λ``).
    """
    anchor = detached_params(anchor)

    def regularized(p: Mapping[str, Tensor], x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
        distance = sum(((p[k] - anchor[k]) ** 2).sum() for k in anchor)
        return loss_fn(p, x, y, mask) + 0.5 * strength * distance

    return regularized


def fedprox_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    mu: float,
    local_epochs: int = 1,
    batch_size: int | None = None,
    use_query: bool = True,
) -> tuple[Params, Aux]:
    """FedProx client update (Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, 2020, "Federated
    Optimization in Heterogeneous Networks").

    The client minimizes ``h(w) = F(w) + μ/2 ‖w − θ‖²`` (``θ`` the received model) with FedAvg's
    local loop (:func:`~lightning_metafed.functional.fedavg_update`: ``local_epochs`` passes in
    mini-batches of ``batch_size``), so each SGD step is ``w ← w − lr (∇F_B(w) + μ (w − θ))``.
    Upload ``θ − w``; ``μ = 0`` is FedAvg. ``aux["support_loss"]`` is ``F`` at ``θ`` on the first
    mini-batch (the proximal term is 0 there).

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received model ``θ``, by parameter name.
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the local optimizer.
        mu: ``μ >= 0``, the proximal strength (``0``: FedAvg).
        local_epochs: passes over the local data.
        batch_size: the local mini-batch size (``None``: full batch).
        use_query: train on support and query (``True``) or on the support set only.
    """
    if not mu >= 0:
        raise ValueError(f"Expected `mu` >= 0, got {mu!r}")
    return fedavg_update(
        proximal_loss(loss_fn, params, mu), params, task, optimizer=optimizer, local_epochs=local_epochs,
        batch_size=batch_size, use_query=use_query,
    )


def fedbabu_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    head_names: Sequence[str],
    local_epochs: int = 1,
    batch_size: int | None = None,
    use_query: bool = True,
) -> tuple[Params, Aux]:
    """FedBABU client update (Oh, Kim & Yun, 2022, "FedBABU: Toward Enhanced Representation for
    Federated Image Classification").

    FedAvg's local loop with the head ``φ`` (``head_names``) frozen at the received values, which
    stay those of its initialization: only the body ``θ_B`` trains, ``b = U(θ_B; φ)``.
    Upload: ``θ_B − b`` (body entries only: the head is never uploaded or aggregated).

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received model ``θ``, by parameter name.
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the local optimizer of the body.
        head_names: the head's parameters, frozen (a non-empty proper subset of ``params``).
        local_epochs: passes over the local data.
        batch_size: the local mini-batch size (``None``: full batch).
        use_query: train on support and query (``True``) or on the support set only.
    """
    missing = [n for n in head_names if n not in params]
    if not head_names or missing or set(head_names) == set(params):
        raise ValueError(
            f"Expected `head_names` to be a non-empty proper subset of the parameters {sorted(params)}, got {list(head_names)!r}"
        )
    body = [k for k in params if k not in head_names]
    update, aux = fedavg_update(
        loss_fn, params, task, optimizer=optimizer, local_epochs=local_epochs, batch_size=batch_size,
        use_query=use_query, adapt_names=body,
    )
    return {k: update[k] for k in body}, aux


def pfedme_personalize(
    loss_fn: LossFn,
    anchor: Mapping[str, Tensor],
    start: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor | None,
    *,
    optimizer: InnerStep,
    steps: int,
    lam: float,
) -> Params:
    """pFedMe's personalized model: ``steps`` (K) steps of ``optimizer`` from ``start`` on
    ``f(θ; D) + λ/2 ‖θ − w‖²`` with ``w = anchor``: an approximate ``θ̂(w) = prox_{f/λ}(w)``. With
    ``SGD(lr=p)`` each step is the paper's ``θ ← θ − p (∇f(θ; D) + λ (θ − w))``. Detached.

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        anchor: ``w``, the local model the proximal term pulls towards.
        start: the parameters the ``K`` steps start from (a warm start).
        x: the mini-batch's inputs.
        y: the mini-batch's targets.
        mask: ``[N]``, 1 for real examples and 0 for padding (``None``: all real).
        optimizer: the optimizer of the personalization steps.
        steps: ``K``, how many steps.
        lam: ``λ``, the proximal strength.
    """
    regularized = proximal_loss(loss_fn, anchor, lam)
    final = adapt(regularized, detached_params(start), x, y, optimizer=optimizer, steps=steps, mask=mask, first_order=True)
    return detached_params(final)


def _cycled_batch(x: Tensor, y: Tensor, mask: Tensor | None, r: int, b: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Mini-batch ``r`` of ``b`` consecutive examples, cycling over the real ones only (padding sorts
    last in :func:`~lightning_metafed.functional.local_training.local_data`; the last batch may be partial)."""
    n = x.shape[0]
    if mask is None:
        start = (r % -(-n // b)) * b
        return x[start:start + b], y[start:start + b], None
    batches = torch.div(mask.sum() + b - 1, b, rounding_mode="floor").clamp_min(1).long()
    index = (r % batches) * b + torch.arange(b, device=x.device)
    valid = index < n
    index = index.clamp(max=n - 1)
    return x.index_select(0, index), y.index_select(0, index), mask.index_select(0, index) * valid


def _check_pfedme_arguments(
    *, lam: float, lr: float, beta: float, local_steps: int, personal_steps: int, batch_size: int | None
) -> None:
    """Raise ``ValueError`` naming the first of :func:`pfedme_update`'s arguments out of range: ``lam``,
    ``lr``, ``beta`` must be ``> 0``, ``local_steps`` and a ``batch_size`` ``>= 1``, ``personal_steps`` ``>= 0``."""
    for name, value in (("lam", lam), ("lr", lr), ("beta", beta)):
        if not value > 0:
            raise ValueError(f"Expected `{name}` > 0, got {value!r}")
    counts = (("local_steps", local_steps, 1), ("personal_steps", personal_steps, 0), ("batch_size", batch_size, 1))
    for name, value, least in counts:
        if value is not None and value < least:
            raise ValueError(f"Expected `{name}` >= {least}, got {value!r}")


def pfedme_update(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: ClientTask,
    *,
    optimizer: InnerStep,
    personal_steps: int,
    lam: float,
    lr: float,
    local_steps: int,
    beta: float = 1.0,
    batch_size: int | None = None,
    use_query: bool = True,
) -> tuple[Params, Aux]:
    """pFedMe client update (Dinh, Tran & Nguyen, 2020, "Personalized Federated Learning with Moreau
    Envelopes", Algorithm 1).

    From ``w_0 = θ``, each of the ``R = local_steps`` local rounds ``r`` takes mini-batch ``D_r``
    (consecutive slices of ``batch_size`` of the real local examples, cycled; ``None``: all of them):

    - ``θ_r ≈ argmin_θ f(θ; D_r) + λ/2 ‖θ − w_r‖²`` by :func:`pfedme_personalize` (``K =
      personal_steps`` steps of ``optimizer``), warm-started from ``θ_{r−1}`` (``θ_{−1} = θ``);
    - ``w_{r+1} = w_r − η λ (w_r − θ_r)`` with ``η = lr``.

    Upload ``β (θ − w_R)``: with server ``SGD(lr=1)`` and a mean aggregator the server step is the
    paper's ``θ ← (1 − β) θ + β · mean_i w_{R,i}``. ``aux["query_loss"]`` is the query loss of the
    last personalized model ``θ_{R−1}``.

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the model's loss with parameters ``params``.
        params: the received model ``θ``, by parameter name.
        task: the client's task (support and query sets, optional masks and step budget).
        optimizer: the optimizer of the personalization steps.
        personal_steps: ``K``, the personalization steps per local round (``>= 0``).
        lam: ``λ > 0``, the proximal strength.
        lr: ``η > 0``, the local model's step size.
        local_steps: ``R``, the local rounds (``>= 1``).
        beta: ``β > 0``, the scale of the upload (``1``: plain averaging of the local models).
        batch_size: the mini-batch size of each local round (``None``: every real local example).
        use_query: train on support and query (``True``) or on the support set only.
    """
    _check_pfedme_arguments(lam=lam, lr=lr, beta=beta, local_steps=local_steps, personal_steps=personal_steps, batch_size=batch_size)
    theta = detached_params(params)
    x, y, mask = local_data(task, use_query)
    b = x.shape[0] if batch_size is None else min(batch_size, x.shape[0])
    w, personal = dict(theta), dict(theta)
    for r in range(local_steps):
        stepped = pfedme_personalize(
            loss_fn, w, personal, *_cycled_batch(x, y, mask, r, b), optimizer=optimizer, steps=personal_steps, lam=lam,
        )
        moved = {k: w[k] - lr * lam * (w[k] - stepped[k]) for k in w}
        personal = keep_after_budget(task.num_steps, r, stepped, personal)
        w = keep_after_budget(task.num_steps, r, moved, w)
    aux = {
        "support_loss": loss_fn(theta, x, y, mask).detach(),
        "query_loss": loss_fn(personal, task.query_x, task.query_y, task.query_mask).detach(),
    }
    return {k: beta * v for k, v in params_difference(theta, w).items()}, aux
