"""Reptile (Nichol, Achiam & Schulman, 2018)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_metafed.algorithms.base import MetaFedModule
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.updates import reptile_update

__all__ = ["Reptile"]


class Reptile(MetaFedModule):
    """Federated Reptile: each client uploads ``θ − θ_K`` after ``inner_steps`` inner steps.

    With server ``SGD(lr=ε)`` the round is Reptile's ``θ ← θ + ε · mean_i(θ_K,i − θ)``; with
    ``SGD(lr=1)`` it averages the clients' adapted weights.

    Args:
        net: the model every client adapts (``None``: :meth:`~lightning_metafed.MetaFedModule.build_net`).
        use_query: train the inner loop on support and query (all of the client's data in the
            round), else on the support set only.

    Every other argument is :class:`~lightning_metafed.MetaFedModule`'s.
    """

    def __init__(self, net: nn.Module | None = None, inner_steps: int = 5, use_query: bool = True, **kwargs: Any):
        if inner_steps == 0:
            raise ValueError(
                "Expected `inner_steps` >= 1 for Reptile: its upload θ − θ_K is zero without inner steps, so the "
                "meta-parameters would never move; got 0"
            )
        super().__init__(net=net, inner_steps=inner_steps, **kwargs)
        self.use_query = bool(use_query)

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        update, aux = reptile_update(
            self.functional_loss,
            self.net_params(meta),
            task,
            optimizer=self.inner_optimizer,
            inner_steps=self.inner_steps,
            use_query=self.use_query,
        )
        return self.prefixed(update), aux
