"""Run a client's inner loop: K differentiable steps of an inner optimizer on its support data.

``loss_fn(params, x, y, mask) -> scalar`` evaluates the model functionally (via
``torch.func.functional_call``) with the full parameter dict ``params``. Inner gradients are taken
with :func:`torch.func.grad`, so :func:`adapt` composes with ``torch.func.vmap`` (one call per client,
vectorized) and with outer differentiation (``torch.func.grad`` or plain autograd) to give exact
second-order meta-gradients.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_metafed.functional.client_task import Params
from lightning_metafed.functional.inner import LearningRate
LossFn = Callable[[Mapping[str, Tensor], Tensor, Tensor, "Tensor | None"], Tensor]

__all__ = ["InnerStep", "adapt", "iterate_adaptation", "keep_after_budget", "keep_where", "select_params"]


class InnerStep(Protocol):
    """What :func:`~lightning_metafed.functional.adapt` needs of an inner optimizer (see
    :mod:`lightning_metafed.inner`)."""

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Any]: ...

    def step(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: dict[str, Any], lr: Any = None
    ) -> tuple[Params, dict[str, Any]]: ...


def select_params(names: Iterable[str], patterns: Sequence[str] | str | None, argument: str = "adapt_params") -> list[str]:
    """Names matching any of the shell-style ``patterns`` (``fnmatch``; ``None`` selects all).

    Raises ``ValueError`` naming ``argument`` when a pattern matches no parameter.

    Args:
        names: the parameter names to select from.
        patterns: shell-style patterns; a string is one pattern, ``None`` selects every name.
        argument: the argument the patterns came from, named in the error.
    """
    names = list(names)
    if patterns is None:
        return names
    if isinstance(patterns, str):
        patterns = [patterns]
    if len(patterns) == 0:
        raise ValueError(f"Expected `{argument}` to hold at least one pattern, got {list(patterns)!r}")
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(
                f"Pattern {pattern!r} in `{argument}` matches no parameter; parameters are {names}"
            )
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def keep_after_budget(num_steps: Tensor | int | None, k: int, stepped: Params, current: Params) -> Params:
    """Parameters after local step ``k`` (0-based) of a client allowed ``num_steps`` steps.

    ``stepped`` while ``k < num_steps`` (or with no budget), else ``current``. A tensor budget (one
    client under ``vmap``) selects with ``torch.where``, so every client runs the same number of
    steps and a stopped client's parameters, and their gradients, stay those of its last step.
    """
    if num_steps is None:
        return stepped
    if isinstance(num_steps, int):
        return stepped if k < num_steps else current
    active = num_steps > k
    return {n: torch.where(active, stepped[n], current[n]) for n in stepped}


def keep_where(active: Tensor, new: Any, old: Any) -> Any:
    """``new`` where the 0-d bool ``active`` holds, else ``old``, leaf by leaf through nested dicts
    (parameters or an inner optimizer's state; a number such as Adam's step count becomes a float64
    tensor)."""
    if isinstance(new, Mapping):
        return {k: keep_where(active, new[k], old[k]) for k in new}
    if not isinstance(new, Tensor):  # float64 (where the device has it): Adam's bias correction stays as exact as with an int
        new = torch.as_tensor(new, device=active.device, dtype=torch.float32 if active.device.type == "mps" else torch.float64)
    return torch.where(active, new, torch.as_tensor(old, device=active.device, dtype=new.dtype))


def _split_adapted(params: Mapping[str, Tensor], adapt_names: Sequence[str] | None) -> tuple[Params, Params]:
    """``(adapted, frozen)``: the entries of ``params`` named in ``adapt_names`` (``None``: all), in
    that order, and the other entries."""
    params = dict(params)
    names = list(params) if adapt_names is None else list(adapt_names)
    fast = {k: params[k] for k in names}
    return fast, {k: v for k, v in params.items() if k not in fast}


def iterate_adaptation(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    optimizer: InnerStep,
    steps: int,
    mask: Tensor | None = None,
    lr: LearningRate | None = None,
    first_order: bool = False,
    adapt_names: Sequence[str] | None = None,
    num_steps: Tensor | int | None = None,
) -> Iterator[tuple[Params, Tensor | None]]:
    """Yield ``(params_k, support_loss_k)`` for ``k = 0..steps``: the full parameter dict after ``k``
    inner steps, and the (detached) support loss at ``params_k`` computed for step ``k+1`` (``None``
    for the last yield).

    Each step: ``g = ∇_φ L_support(φ)`` over the adapted subset ``φ`` (``adapt_names``; all by
    default); with ``first_order`` the gradient is detached (``stop_gradient``), which makes
    ``dφ_K/dθ = I`` for SGD (FOMAML); then ``φ, state = optimizer.step(φ, g, state, lr)``.

    ``num_steps`` (heterogeneous compute): an ``int`` runs ``min(num_steps, steps)`` steps; a 0-d tensor
    (one client under ``vmap``, not a Python int there) runs all ``steps`` but keeps the parameters of
    step ``num_steps`` from then on (``torch.where``): the same parameters and gradients as stopping early.

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the loss of the model with parameters ``params``.
        params: the full parameter dict to start from.
        x: the support inputs.
        y: the support targets.
        optimizer: the differentiable inner optimizer (``init`` and ``step``).
        steps: how many inner steps (``>= 0``).
        mask: ``[N]``, 1 for real support examples and 0 for padding (``None``: all real).
        lr: overrides the optimizer's learning rate (e.g. Meta-SGD's learned rates); ``None``: its own.
        first_order: detach the inner gradients (FOMAML).
        adapt_names: the parameters the inner loop adapts; ``None`` adapts all, the others stay fixed.
        num_steps: this client's step budget (heterogeneous compute); ``None``: ``steps``.
    """
    if steps < 0:
        raise ValueError(f"Expected `steps` >= 0, got {steps!r}")
    if isinstance(num_steps, int):
        steps, num_steps = min(steps, max(num_steps, 0)), None
    fast, frozen = _split_adapted(params, adapt_names)

    def inner_loss(fast_params: Params) -> Tensor:
        return loss_fn({**frozen, **fast_params}, x, y, mask)

    state = optimizer.init(fast)
    for k in range(steps):
        grads, loss = torch.func.grad_and_value(inner_loss)(fast)
        # The loss is a diagnostic: detached, so its forward graph is not kept alive into the next step.
        loss = loss.detach()
        yield {**frozen, **fast}, loss
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        stepped, state = optimizer.step(fast, grads, state, lr)
        # A client past its step budget keeps its parameters (its optimizer state is never used again).
        fast = keep_after_budget(num_steps, k, stepped, fast)
    yield {**frozen, **fast}, None


def adapt(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    optimizer: InnerStep,
    steps: int,
    mask: Tensor | None = None,
    lr: LearningRate | None = None,
    first_order: bool = False,
    adapt_names: Sequence[str] | None = None,
    num_steps: Tensor | int | None = None,
) -> Params:
    """Parameters after ``steps`` inner steps on ``(x, y)``; see :func:`iterate_adaptation`.

    The result stays a differentiable function of ``params`` (and of a tensor ``lr``).

    Args:
        loss_fn: ``loss_fn(params, x, y, mask) -> scalar``, the loss of the model with parameters ``params``.
        params: the full parameter dict to start from.
        x: the support inputs.
        y: the support targets.
        optimizer: the differentiable inner optimizer (``init`` and ``step``).
        steps: how many inner steps (``>= 0``).
        mask: ``[N]``, 1 for real support examples and 0 for padding (``None``: all real).
        lr: overrides the optimizer's learning rate (e.g. Meta-SGD's learned rates); ``None``: its own.
        first_order: detach the inner gradients (FOMAML).
        adapt_names: the parameters the inner loop adapts; ``None`` adapts all, the others stay fixed.
        num_steps: this client's step budget (heterogeneous compute); ``None``: ``steps``.

    Example:
        Five SGD steps fit ``y = 3x`` with the one-parameter model ``w·x``; the result stays
        differentiable with respect to the starting parameters (what MAML backpropagates through):

        >>> import torch
        >>> from lightning_metafed.functional import adapt, mse_loss
        >>> from lightning_metafed.inner import SGD
        >>> def loss_fn(params, x, y, mask):
        ...     return mse_loss(x * params["w"], y, mask)
        >>> x = torch.linspace(-1, 1, 11).unsqueeze(-1)
        >>> w0 = torch.zeros(1, requires_grad=True)
        >>> adapted = adapt(loss_fn, {"w": w0}, x, 3 * x, optimizer=SGD(lr=0.5), steps=5)
        >>> round(adapted["w"].item(), 4), adapted["w"].requires_grad
        (2.7667, True)
    """
    adapted: Params = dict(params)
    for adapted, _ in iterate_adaptation(
        loss_fn, params, x, y, optimizer=optimizer, steps=steps, mask=mask, lr=lr, first_order=first_order,
        adapt_names=adapt_names, num_steps=num_steps,
    ):
        pass
    return adapted
