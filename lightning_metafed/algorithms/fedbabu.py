"""FedBABU (Oh, Kim & Yun, 2022): train and average the body, keep the head at its initialization."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_metafed.algorithms.fedavg import FedAvg
from lightning_metafed.algorithms.fedper import resolve_head
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.proximal import fedbabu_update

__all__ = ["FedBABU"]


class FedBABU(FedAvg):
    """FedBABU, "Toward Enhanced Representation for Federated Image Classification" (Oh et al., 2022).

    Training: FedAvg on the body only (:func:`~lightning_metafed.functional.fedbabu_update`); the
    head keeps its random initialization on every client and in every round, so the clients learn a
    body for one shared, fixed head. Uploads hold the body only (the head has no gradient and is
    never aggregated; communication counts the body up and the whole model down). Evaluation:
    ``pre`` is the global model (body with the initial head); ``post`` fine-tunes the whole model,
    body and head, for ``eval_inner_steps`` steps on the client's support set, as the paper
    personalizes.

    Args:
        net: the model, a body and a head (``None``: :meth:`~lightning_metafed.MetaFedModule.build_net`).
        head_params: shell-style patterns of the head's parameters (``None``: the net's last
            parameterized submodule); the body may not be empty.

    Every other argument is :class:`~lightning_metafed.FedAvg`'s.
    """

    def __init__(self, net: nn.Module | None = None, head_params: Sequence[str] | str | None = None, **kwargs: Any):
        super().__init__(net=net, **kwargs)
        self.head_names = resolve_head(
            self.net, head_params, type(self).__name__, "{owner} freezes the head parameters {names} at their initialization"
        )

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        update, aux = fedbabu_update(
            self.functional_loss,
            self.net_params(meta),
            task,
            optimizer=self.inner_optimizer,
            head_names=self.head_names,
            local_epochs=self.local_epochs,
            batch_size=self.local_batch_size,
            use_query=self.use_query,
        )
        return self.prefixed(update), aux
