"""Meta-SGD (Li, Zhou, Chen & Li, 2017): meta-learned initialization and inner learning rates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_metafed.algorithms.maml import MAML
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.updates import meta_sgd_update

__all__ = ["MetaSGD"]

LR_PREFIX = "inner_lrs."


def lr_key(name: str) -> str:
    """ParameterDict key of a net parameter's learned learning rate (dots are not allowed in keys)."""
    return name.replace(".", "__")


class MetaSGD(MAML):
    """Meta-SGD: ``θ' = θ − α ∘ ∇L_support(θ)`` with ``α`` meta-learned beside ``θ``.

    The learned rates live in ``self.inner_lrs`` (one tensor per adapted parameter, initialized to
    the inner optimizer's ``lr``) and are uploaded by clients with their true meta-gradients, under
    the keys ``inner_lrs.<name with dots as __>``.

    Args:
        net: the model every client adapts (``None``: :meth:`~lightning_metafed.MetaFedModule.build_net`).
        lr_granularity: ``"element"`` (the paper: one rate per coordinate, shaped like the
            parameter) or ``"tensor"`` (one scalar rate per parameter tensor).

    Every other argument is :class:`~lightning_metafed.MAML`'s (``inner_backend`` must stay ``"func"``).
    """

    supports_higher = False

    def __init__(
        self,
        net: nn.Module | None = None,
        lr_granularity: Literal["element", "tensor"] = "element",
        **kwargs: Any,
    ):
        super().__init__(net=net, **kwargs)
        if lr_granularity not in ("element", "tensor"):
            raise ValueError(f"Expected `lr_granularity` to be 'element' or 'tensor', got {lr_granularity!r}")
        named = dict(self.net.named_parameters())
        names = self.adapt_names if self.adapt_names is not None else list(named)
        lr = self.inner_optimizer.lr
        self.inner_lrs = nn.ParameterDict(
            {
                lr_key(n): nn.Parameter(
                    torch.full_like(named[n].detach(), lr)
                    if lr_granularity == "element"
                    else torch.tensor(lr, dtype=named[n].dtype, device=named[n].device)
                )
                for n in names
            }
        )
        self._lr_names = names

    def inner_lr(self, meta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: meta[LR_PREFIX + lr_key(n)] for n in self._lr_names}

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        (grad_params, grad_lrs), aux = meta_sgd_update(
            self.functional_loss,
            self.net_params(meta),
            self.inner_lr(meta),
            task,
            optimizer=self.inner_optimizer,
            inner_steps=self.inner_steps,
            first_order=self.first_order,
            adapt_names=self.adapt_names,
        )
        return {**self.prefixed(grad_params), **{LR_PREFIX + lr_key(n): g for n, g in grad_lrs.items()}}, aux
