"""MAML and first-order MAML (Finn, Abbeel & Levine, 2017)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_metafed.aggregators import Aggregator
from lightning_metafed.algorithms.base import MetaFedModule, resolve_adapt_names
from lightning_metafed.faults import ClientFaults
from lightning_metafed.functional.updates import ClientTask, maml_objective, maml_update
from lightning_metafed.inner import InnerOptimizer
from lightning_metafed.privacy import ClientDP

__all__ = ["MAML"]


class MAML(MetaFedModule):
    """Federated MAML: each client uploads ``∇_θ L_query(U_K(θ))``.

    ``U_K`` is ``inner_steps`` steps of ``inner_optimizer`` on the client's support set; the
    meta-gradient is exact second order through every inner step (``first_order=False``), or FOMAML's
    ``∇L_query(U_K(θ))`` with inner gradients held constant (``first_order=True``). With one SGD step
    the round minimizes ``Σ_clients L_query(θ − α ∇L_support(θ))``.

    Args:
        first_order: FOMAML instead of second-order MAML.
        adapt_params: shell-style patterns (``fnmatch``) of the net parameters the inner loop adapts,
            e.g. ``["head.*"]`` (ANIL); ``None`` adapts all. The meta-update reaches every parameter.
        inner_backend: ``"func"`` (``torch.func``, vectorized) or ``"higher"`` (the ``higher``
            package, clients in a loop; accepts :class:`~lightning_metafed.inner.TorchOptimizer`).

    See :class:`~lightning_metafed.algorithms.base.MetaFedModule` for the other arguments.
    """

    supports_higher = True

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
        faults: ClientFaults | None = None,
        privacy: ClientDP | None = None,
        reject_nonfinite: bool = True,
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
            fast_path=fast_path,
            inner_backend=inner_backend,
            faults=faults,
            privacy=privacy,
            reject_nonfinite=reject_nonfinite,
        )
        self.first_order = bool(first_order)
        self.adapt_names = resolve_adapt_names(self.net, adapt_params)

    def inner_lr(self, meta: Mapping[str, Tensor]) -> Any:
        """The inner learning rate(s); ``None`` uses the inner optimizer's own ``lr``."""
        return None

    def adaptation_kwargs(self, meta: Mapping[str, Tensor]) -> dict[str, Any]:
        return {"adapt_names": self.adapt_names, "lr": self.inner_lr(meta)}

    def client_objective(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Tensor, dict[str, Tensor]]:
        """One client's ``L_query(U_K(θ))``, differentiable w.r.t. ``meta`` (the fast path's loss)."""
        if self.inner_backend == "higher":
            from lightning_metafed._higher import higher_maml_objective

            return higher_maml_objective(self, task)
        return maml_objective(
            self.functional_loss,
            self.net_params(meta),
            task,
            optimizer=self.inner_optimizer,
            inner_steps=self.inner_steps,
            first_order=self.first_order,
            **self.adaptation_kwargs(meta),
        )

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if self.inner_backend == "higher":
            from lightning_metafed._higher import higher_maml_update

            return higher_maml_update(self, task)
        grads, aux = maml_update(
            self.functional_loss,
            self.net_params(meta),
            task,
            optimizer=self.inner_optimizer,
            inner_steps=self.inner_steps,
            first_order=self.first_order,
            adapt_names=self.adapt_names,
        )
        return self.prefixed(grads), aux
