"""ANIL: almost no inner loop (Raghu, Raghu, Bengio & Vinyals, 2020)."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_metafed.aggregators import Aggregator
from lightning_metafed.algorithms.maml import MAML
from lightning_metafed.inner import InnerOptimizer

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
    """MAML whose inner loop adapts only the head (``anil_update``); the body is meta-learned.

    ``adapt_params=None`` selects the parameters of the net's last parameterized submodule (e.g.
    the final ``nn.Linear``); pass patterns such as ``["classifier.*"]`` to choose otherwise.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        inner_optimizer: InnerOptimizer | None = None,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        task: Literal["regression", "classification"] = "regression",
        first_order: bool = False,
        adapt_params: list[str] | None = None,
        server_optimizer: OptimizerCallable = torch.optim.Adam,
        server_lr_scheduler: LRSchedulerCallable | None = None,
        aggregator: Aggregator | None = None,
        vectorize: bool = True,
        client_chunk_size: int | None = None,
        fast_path: bool = True,
        inner_backend: Literal["func", "higher"] = "func",
        compile_clients: bool = False,
    ):
        super().__init__(
            net=net,
            inner_optimizer=inner_optimizer,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            task=task,
            first_order=first_order,
            adapt_params=adapt_params,
            server_optimizer=server_optimizer,
            server_lr_scheduler=server_lr_scheduler,
            aggregator=aggregator,
            vectorize=vectorize,
            client_chunk_size=client_chunk_size,
            compile_clients=compile_clients,
            fast_path=fast_path,
            inner_backend=inner_backend,
        )
        if adapt_params is None:
            self.adapt_names = default_head(self.net)
            rank_zero_info(f"ANIL adapts the head parameters {self.adapt_names}")
