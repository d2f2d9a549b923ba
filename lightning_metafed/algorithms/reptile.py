"""Reptile (Nichol, Achiam & Schulman, 2018)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_metafed.aggregators import Aggregator
from lightning_metafed.algorithms.base import MetaFedModule
from lightning_metafed.functional.updates import ClientTask, reptile_update
from lightning_metafed.inner import InnerOptimizer

__all__ = ["Reptile"]


class Reptile(MetaFedModule):
    """Federated Reptile: each client uploads ``θ − θ_K`` after ``inner_steps`` inner steps.

    With server ``SGD(lr=ε)`` the round is Reptile's ``θ ← θ + ε · mean_i(θ_K,i − θ)``; with
    ``SGD(lr=1)`` it averages the clients' adapted weights.

    Args:
        use_query: train the inner loop on support and query (all of the client's data in the
            round), else on the support set only.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        inner_optimizer: InnerOptimizer | None = None,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        task: Literal["regression", "classification"] = "regression",
        use_query: bool = True,
        server_optimizer: OptimizerCallable = torch.optim.Adam,
        server_lr_scheduler: LRSchedulerCallable | None = None,
        aggregator: Aggregator | None = None,
        vectorize: bool = True,
        client_chunk_size: int | None = None,
        compile_clients: bool = False,
    ):
        super().__init__(
            net=net,
            inner_optimizer=inner_optimizer,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            task=task,
            server_optimizer=server_optimizer,
            server_lr_scheduler=server_lr_scheduler,
            aggregator=aggregator,
            vectorize=vectorize,
            client_chunk_size=client_chunk_size,
            compile_clients=compile_clients,
        )
        self.use_query = bool(use_query)

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        update, aux = reptile_update(
            self.functional_loss,
            self.net_params(meta),
            task,
            optimizer=self.inner_optimizer,
            inner_steps=self.inner_steps,
            use_query=self.use_query,
        )
        return self.prefixed(update), aux
