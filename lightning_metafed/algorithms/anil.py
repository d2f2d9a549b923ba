"""ANIL: almost no inner loop (Raghu, Raghu, Bengio & Vinyals, 2020)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_metafed.algorithms.maml import MAML
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.updates import anil_update

__all__ = ["ANIL", "default_head"]


def default_head(net: nn.Module) -> list[str]:
    """Parameter names of the last submodule (in registration order) that owns parameters."""
    head: list[str] = []
    for module_name, module in net.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            head = [f"{module_name}.{n}" if module_name else n for n in own]
    if not head:
        raise ValueError("`net` has no parameters, so ANIL has no head to adapt")
    return head


class ANIL(MAML):
    """MAML whose inner loop adapts only the head (:func:`~lightning_metafed.functional.anil_update`);
    the body is meta-learned.

    Args:
        net: the model every client adapts (``None``: :meth:`~lightning_metafed.MetaFedModule.build_net`).
        adapt_params: shell-style patterns of the head, the parameters the inner loop adapts;
            ``None`` selects the parameters of the net's last parameterized submodule (e.g. the final
            ``nn.Linear``); pass patterns such as ``["classifier.*"]`` to choose otherwise.

    Every other argument is :class:`~lightning_metafed.MAML`'s.
    """

    def __init__(self, net: nn.Module | None = None, adapt_params: list[str] | None = None, **kwargs: Any):
        super().__init__(net=net, adapt_params=adapt_params, **kwargs)
        if adapt_params is None:
            self.adapt_names = default_head(self.net)
            rank_zero_info(f"ANIL adapts the head parameters {self.adapt_names}")

    def functional_update(self, params: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        return anil_update(
            self.functional_loss,
            params,
            task,
            head_names=self.adapt_names,
            optimizer=self.inner_optimizer,
            inner_steps=self.inner_steps,
            first_order=self.first_order,
        )
