"""MAML and first-order MAML (Finn, Abbeel & Levine, 2017)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_metafed.algorithms.arguments import resolve_adapt_names
from lightning_metafed.algorithms.base import MetaFedModule
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.updates import maml_update

__all__ = ["MAML"]


class MAML(MetaFedModule):
    """Federated MAML: each client uploads ``∇_θ L_query(U_K(θ))``.

    ``U_K`` is ``inner_steps`` steps of ``inner_optimizer`` on the client's support set; the
    meta-gradient is exact second order through every inner step (``first_order=False``), or FOMAML's
    ``∇L_query(U_K(θ))`` with inner gradients held constant (``first_order=True``). With one SGD step
    the round minimizes ``Σ_clients L_query(θ − α ∇L_support(θ))``.

    Args:
        net: the model every client adapts (``None``: :meth:`~lightning_metafed.MetaFedModule.build_net`).
        first_order: FOMAML instead of second-order MAML.
        adapt_params: shell-style patterns (``fnmatch``) of the net parameters the inner loop adapts,
            e.g. ``["head.*"]`` (ANIL); ``None`` adapts all. The meta-update reaches every parameter.

    Every other argument is :class:`~lightning_metafed.MetaFedModule`'s; ``inner_backend="higher"``
    runs the inner loop through the ``higher`` package (clients in a loop; accepts
    :class:`~lightning_metafed.inner.TorchOptimizer`).

    Example:
        A round by hand (a Trainer runs the same in ``training_step``): each sampled client uploads
        its meta-gradient, and the round's mean lands in ``.grad`` for the server optimizer.

        >>> import torch
        >>> from torch import nn
        >>> from lightning_metafed import MAML
        >>> from lightning_metafed.data import SinusoidClients
        >>> from lightning_metafed.inner import SGD
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1))
        >>> model = MAML(net, inner_optimizer=SGD(lr=0.01), inner_steps=1)
        >>> data = SinusoidClients(num_clients=100, clients_per_round=4, support_size=5, query_size=5)
        >>> data.setup("fit")
        >>> uploads = model.client_updates(data.round_batch(0))  # {parameter: [clients, *shape]}
        >>> tuple(uploads["net.0.weight"].shape)
        (4, 32, 1)
        >>> aggregate, diagnostics = model.round_gradients(data.round_batch(0))
        >>> torch.allclose(model.net[0].weight.grad, uploads["net.0.weight"].mean(0), atol=1e-6)
        True
    """

    supports_higher = True

    def __init__(
        self,
        net: nn.Module | None = None,
        first_order: bool = False,
        adapt_params: list[str] | None = None,
        **kwargs: Any,
    ):
        super().__init__(net=net, **kwargs)
        self.first_order = bool(first_order)
        self.adapt_names = resolve_adapt_names(self.net, adapt_params)

    def inner_lr(self, meta: Mapping[str, Tensor]) -> Any:
        """The inner learning rate(s); ``None`` uses the inner optimizer's own ``lr``."""
        return None

    def adaptation_kwargs(self, meta: Mapping[str, Tensor]) -> dict[str, Any]:
        return {"adapt_names": self.adapt_names, "lr": self.inner_lr(meta)}

    def client_objective(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Tensor, Aux]:
        """One client's ``L_query(U_K(θ))``, differentiable w.r.t. ``meta`` (the fast path's loss)."""
        return self.backend.maml_objective(self, meta, task)

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        return self.backend.maml_update(self, meta, task)

    def functional_update(self, params: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        """The paper's rule on the net's own parameters (the ``func`` backend's client update)."""
        return maml_update(
            self.functional_loss,
            params,
            task,
            optimizer=self.inner_optimizer,
            inner_steps=self.inner_steps,
            first_order=self.first_order,
            adapt_names=self.adapt_names,
        )
