"""Differentiable inner-loop optimizers as pure functions on dicts of tensors.

Every function here returns *new* tensors and never writes in place, so the optimizer state is part
of the autograd graph and second-order meta-gradients flow through it (through SGD's momentum
buffer and Adam's moment estimates alike).

The learning rate ``lr`` may be a float, a scalar tensor, or a mapping ``name -> tensor``: a tensor
broadcast against the parameter (Meta-SGD's per-coordinate rates, or per-tensor scalars). Tensor
learning rates are differentiated like any other input.

Conventions follow ``torch.optim`` exactly (coupled L2 ``weight_decay``; momentum buffer
``b ← μ b + g`` with no dampening; Adam's bias corrections), so that one step here equals one step
of ``torch.optim.SGD`` / ``torch.optim.Adam`` in the forward direction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_metafed.functional.client_task import Params
LearningRate = float | Tensor | Mapping[str, Tensor | float]

__all__ = ["sgd_init", "sgd_step", "adam_init", "adam_step", "lr_for"]


def lr_for(lr: LearningRate, name: str) -> float | Tensor:
    """The learning rate that applies to parameter ``name``."""
    if isinstance(lr, Mapping):
        return lr[name]
    return lr


def sgd_init(params: Mapping[str, Tensor], momentum: float = 0.0) -> dict[str, Any]:
    """State of (momentum) SGD: the momentum buffers, zero at the start.

    Args:
        params: the parameters the optimizer will step.
        momentum: ``μ``; ``0`` keeps no buffers (the state is empty).
    """
    if momentum == 0.0:
        return {}
    return {"momentum_buffer": {k: torch.zeros_like(p) for k, p in params.items()}}


def sgd_step(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: dict[str, Any],
    *,
    lr: LearningRate,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> tuple[Params, dict[str, Any]]:
    """One step of SGD, ``θ ← θ − lr · d`` with ``d = g`` or the momentum direction.

    With momentum ``μ``: ``b ← μ b + g``; ``d = b`` (or ``g + μ b`` with Nesterov).

    Args:
        params: the current parameters.
        grads: the gradients, one per parameter name.
        state: what :func:`sgd_init` or the previous step returned.
        lr: the learning rate: a float, a tensor broadcast against each parameter, or ``{name: rate}``.
        momentum: ``μ`` (``0``: plain SGD).
        nesterov: use the Nesterov direction ``g + μ b``.
        weight_decay: the coupled L2 penalty added to the gradient, ``g + weight_decay · θ``.
    """
    new_params: Params = {}
    new_buf: Params = {}
    for name, p in params.items():
        g = grads[name]
        if weight_decay != 0.0:
            g = g + weight_decay * p
        if momentum != 0.0:
            b = momentum * state["momentum_buffer"][name] + g
            new_buf[name] = b
            g = g + momentum * b if nesterov else b
        new_params[name] = p - lr_for(lr, name) * g
    return new_params, ({"momentum_buffer": new_buf} if momentum != 0.0 else {})


def adam_init(params: Mapping[str, Tensor]) -> dict[str, Any]:
    """State of Adam: step count and first/second moment estimates (zero at the start).

    Args:
        params: the parameters the optimizer will step.
    """
    return {
        "step": 0,
        "exp_avg": {k: torch.zeros_like(p) for k, p in params.items()},
        "exp_avg_sq": {k: torch.zeros_like(p) for k, p in params.items()},
    }


def _safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` for ``v >= 0`` whose derivative at ``v == 0`` is 0 instead of ``inf``.

    A coordinate whose gradient is exactly zero (a dead ReLU unit, an unused class) has ``v == 0``;
    the plain derivative ``1 / (2 sqrt(v))`` would turn the meta-gradient into NaN (``inf · 0``).
    The forward value is exactly ``torch.sqrt(v)``.
    """
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))


def adam_step(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: dict[str, Any],
    *,
    lr: LearningRate,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[Params, dict[str, Any]]:
    """One step of Adam (Kingma & Ba, 2015) exactly as ``torch.optim.Adam`` computes it.

    ``m ← β1 m + (1−β1) g``, ``v ← β2 v + (1−β2) g²``,
    ``θ ← θ − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)``.

    Args:
        params: the current parameters.
        grads: the gradients, one per parameter name.
        state: what :func:`adam_init` or the previous step returned.
        lr: the learning rate: a float, a tensor broadcast against each parameter, or ``{name: rate}``.
        betas: ``(β1, β2)``, the decay rates of the first and second moment estimates.
        eps: added to the denominator for numerical stability.
        weight_decay: the coupled L2 penalty added to the gradient, ``g + weight_decay · θ``.
    """
    beta1, beta2 = betas
    step = state["step"] + 1
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
    new_params: Params = {}
    exp_avg: Params = {}
    exp_avg_sq: Params = {}
    for name, p in params.items():
        g = grads[name]
        if weight_decay != 0.0:
            g = g + weight_decay * p
        m = beta1 * state["exp_avg"][name] + (1.0 - beta1) * g
        v = beta2 * state["exp_avg_sq"][name] + (1.0 - beta2) * g * g
        step_size, bc2 = lr_for(lr, name) / bias_correction1, bias_correction2_sqrt
        if isinstance(bc2, Tensor):  # a step count kept as a (float64) tensor: cast as a Python number would be,
            step_size, bc2 = step_size.to(p.dtype), bc2.to(p.dtype)  # so that a 0-d parameter is not promoted
        denom = _safe_sqrt(v) / bc2 + eps
        new_params[name] = p - step_size * m / denom
        exp_avg[name] = m
        exp_avg_sq[name] = v
    return new_params, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
