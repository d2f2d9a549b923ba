"""The server step of a round, guarded: the parameters never keep a NaN or an inf.

:func:`server_step` writes the aggregate to ``.grad`` and steps the server optimizer. It first
takes a :class:`StepSnapshot` of the parameters and of the optimizer's state; if any parameter is
non-finite after the step, both are restored and :class:`NonFiniteRoundError` names the cause that
was detected (see :func:`diagnose_server_step`). A non-finite *aggregate* is caught earlier, by the
round pipeline, with the same error type and ``stage="uploads"``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_metafed.functional.client_task import Params

__all__ = ["NonFiniteRoundError", "StepSnapshot", "diagnose_server_step", "server_step", "write_gradients"]

#: What a round does when its aggregate or the server step is not finite.
OnNonFinite = Literal["raise", "skip"]


class NonFiniteRoundError(FloatingPointError):
    """A round produced NaN/inf: in the clients' uploads (``stage="uploads"``) or in the server
    optimizer's step (``stage="server step"``). The parameters are as they were before the round.

    Args:
        message: what was non-finite and its likely cause (the exception's text).
        stage: where the round went non-finite, ``"uploads"`` or ``"server step"`` (kept as ``stage``).
    """

    def __init__(self, message: str, stage: Literal["uploads", "server step"]):
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class StepSnapshot:
    """Copies of the parameters and of the optimizer's state, taken before a step."""

    params: dict[str, Tensor]
    optimizer_state: dict[str, Any]

    @classmethod
    def take(cls, optimizer: Any, params: Mapping[str, Tensor]) -> StepSnapshot:
        saved = {k: p.detach().clone() for k, p in params.items()}
        return cls(saved, copy.deepcopy(unwrapped(optimizer).state_dict()))

    def restore(self, optimizer: Any, params: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.params[k])
        unwrapped(optimizer).load_state_dict(self.optimizer_state)


def unwrapped(optimizer: Any) -> Any:
    """The torch optimizer behind a wrapper that delegates to it (Lightning's ``LightningOptimizer``
    keeps it as ``.optimizer``; loading state into the wrapper would not reach it)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def nonfinite_names(params: Mapping[str, Tensor]) -> list[str]:
    """Names of the tensors holding NaN/inf (one host sync)."""
    names = list(params)
    if not names:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for p in params.values()]).tolist()
    return [k for k, ok in zip(names, finite) if not ok]


def diagnose_server_step(optimizer: Any, params: Mapping[str, Tensor], names: list[str]) -> str:
    """The likely cause of a server step that made ``names`` non-finite from a finite aggregate.

    Args:
        optimizer: the server optimizer (its first param group's ``eps`` and ``lr`` are read).
        params: the parameters by name, after the step.
        names: the parameters the step made non-finite.
    """
    dtype = params[names[0]].dtype
    group = optimizer.param_groups[0]
    eps, lr = group.get("eps"), group.get("lr")
    if dtype in (torch.float16, torch.bfloat16) and isinstance(eps, float) and float(torch.tensor(eps, dtype=dtype)) == 0.0:
        return (
            f"the parameters are {dtype} and the server optimizer's eps={eps} rounds to 0 in {dtype}, so its "
            "step divides by zero; keep the meta-parameters in float32 (`precision='16-mixed'` or 'bf16-mixed') "
            f"or use an eps representable in {dtype}"
        )
    if dtype in (torch.float16, torch.bfloat16):
        return (
            f"the parameters are {dtype}, whose range overflowed in the server step; keep the meta-parameters "
            "in float32 (`precision='16-mixed'` or 'bf16-mixed')"
        )
    return f"the server optimizer's step overflowed (learning rate {lr}); lower the server learning rate"


def server_step(
    optimizer: Any,
    params: Mapping[str, Tensor],
    aggregate: Params | None,
    scale: Callable[[Tensor], Tensor] | None = None,
    round_idx: int | None = None,
) -> None:
    """The server optimizer's step with ``.grad`` = the aggregate (``None``: no gradient at all, so the
    optimizer leaves every parameter and its state alone; the step still counts). Parameters that do
    not require grad (frozen) get no gradient, so no optimizer moves them.

    If the step leaves a parameter non-finite, the parameters and the optimizer's state are restored
    to before the step and :class:`NonFiniteRoundError` (``stage="server step"``) is raised.

    Args:
        optimizer: the server optimizer (or Lightning's wrapper around it).
        params: the server's parameters by name, which the step updates in place.
        aggregate: the round's aggregated update ``{name: tensor}``, or ``None`` (no client survived).
        scale: a mixed-precision gradient scaler's ``scale`` (it multiplies by the loss scale that
            the scaler divides ``.grad`` by in the step), so the parameters move by the aggregate
            itself; ``None`` without a scaler.
        round_idx: the round, named in the error (``None``: not named).
    """
    snapshot = None if aggregate is None else StepSnapshot.take(optimizer, params)
    optimizer.zero_grad(set_to_none=True)
    write_gradients(params, aggregate, scale)
    optimizer.step()
    if snapshot is None:
        return
    bad = nonfinite_names(params)
    if bad:
        already = set(nonfinite_names(snapshot.params))  # e.g. a frozen parameter: not this step's doing
        bad = [name for name in bad if name not in already]
    if bad:
        cause = diagnose_server_step(optimizer, params, bad)
        snapshot.restore(optimizer, params)
        optimizer.zero_grad(set_to_none=True)
        where = "" if round_idx is None else f"Round {round_idx}: "
        raise NonFiniteRoundError(
            f"{where}the aggregated update was finite but the server optimizer's step made {len(bad)} parameter "
            f"tensor(s) non-finite ({', '.join(repr(n) for n in bad[:3])}{', ...' if len(bad) > 3 else ''}): {cause}. "
            "The parameters and the optimizer's state were restored to before the step.",
            stage="server step",
        )


def write_gradients(
    params: Mapping[str, Tensor], aggregate: Params | None, scale: Callable[[Tensor], Tensor] | None = None
) -> None:
    """``.grad`` = the aggregate (times ``scale``) for every parameter that requires grad; ``None``
    everywhere when there is no aggregate, and for parameters the aggregate leaves out (e.g. a
    personal head that never leaves the clients), so no optimizer moves them.

    Args:
        params: the parameters by name, whose ``.grad`` is written.
        aggregate: the round's aggregated update ``{name: tensor}``, or ``None``.
        scale: multiplies each gradient (a gradient scaler's ``scale``); ``None``: unscaled.
    """
    for name, p in params.items():
        if aggregate is None or not p.requires_grad or name not in aggregate:
            p.grad = None
        else:
            grad = aggregate[name].to(p.dtype)
            p.grad = grad if scale is None else scale(grad)
