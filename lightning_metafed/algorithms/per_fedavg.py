"""Per-FedAvg (Fallah, Mokhtari & Ozdaglar, 2020), first-order and Hessian-free variants."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor, nn

from lightning_metafed._validation import check_int, check_positive
from lightning_metafed.algorithms.base import MetaFedModule
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.updates import per_fedavg_update
from lightning_metafed.inner import SGD

__all__ = ["PerFedAvg"]


class PerFedAvg(MetaFedModule):
    """Per-FedAvg: clients run ``local_steps`` local meta-steps and upload ``θ − θ_local``.

    Each local step: ``θ̃ = θ − α ∇f(θ, D)`` on the support set ``D`` (``α`` is the inner
    optimizer's ``lr``), then ``θ ← θ − β ∇f(θ̃, D')`` (``β`` = ``outer_lr``) (``variant="fo"``) or
    ``θ ← θ − β (I − α ∇²f(θ, D'')) ∇f(θ̃, D')`` (``variant="hf"``, exact Hessian-vector product).
    ``D'`` is the query set; see :func:`~lightning_metafed.functional.updates.per_fedavg_update` for
    ``hessian_batch``. Evaluation personalizes with ``eval_inner_steps`` steps of the inner optimizer.

    Args:
        net: the model every client adapts (``None``: :meth:`~lightning_metafed.MetaFedModule.build_net`).
        variant: ``"fo"`` or ``"hf"``.
        outer_lr: the local meta step size ``β`` of the paper (named so that it cannot clash with
            Synthetic(α, β)'s ``beta`` in the merged hyperparameters).
        local_steps: ``τ``, local meta-steps per round.
        hessian_batch: HF's ``D''``: ``"query_split"`` (second half of the query; ``D'`` is the first
            half) or ``"support"``.

    Every other argument is :class:`~lightning_metafed.MetaFedModule`'s.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        variant: Literal["fo", "hf"] = "fo",
        outer_lr: float = 0.01,
        local_steps: int = 1,
        hessian_batch: Literal["query_split", "support"] = "query_split",
        **kwargs: Any,
    ):
        super().__init__(net=net, **kwargs)
        inner_steps = self.inner_steps
        if variant not in ("fo", "hf"):
            raise ValueError(f"Expected `variant` to be 'fo' or 'hf', got {variant!r}")
        if hessian_batch not in ("query_split", "support"):
            raise ValueError(f"Expected `hessian_batch` to be 'query_split' or 'support', got {hessian_batch!r}")
        check_positive("outer_lr", outer_lr)
        check_int("local_steps", local_steps, minimum=1)
        if variant == "hf":
            opt = self.inner_optimizer
            if not (isinstance(opt, SGD) and opt.momentum == 0.0 and opt.weight_decay == 0.0):
                raise ValueError(
                    "Per-FedAvg HF's Hessian term (I - α∇²f) assumes a plain gradient step: expected "
                    f"`inner_optimizer` to be SGD without momentum or weight decay, got {opt!r}"
                )
            if inner_steps != 1:
                raise ValueError(f"Per-FedAvg HF takes exactly one inner step: expected `inner_steps` = 1, got {inner_steps!r}")
        self.variant = variant
        self.outer_lr = float(outer_lr)
        self.local_steps = local_steps
        self.hessian_batch = hessian_batch

    def local_step_bound(self) -> tuple[str, int] | None:
        return "local_steps", self.local_steps

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        if self.variant == "hf" and self.hessian_batch == "query_split" and task.query_x.shape[0] < 2:
            raise ValueError(
                "Per-FedAvg HF with hessian_batch='query_split' needs at least 2 query examples per client, "
                f"got {task.query_x.shape[0]}"
            )
        update, aux = per_fedavg_update(
            self.functional_loss,
            self.net_params(meta),
            task,
            optimizer=self.inner_optimizer,
            alpha=self.inner_optimizer.lr,
            beta=self.outer_lr,
            local_steps=self.local_steps,
            inner_steps=self.inner_steps,
            variant=self.variant,
            hessian_batch=self.hessian_batch,
        )
        return self.prefixed(update), aux
