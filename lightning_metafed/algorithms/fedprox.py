"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, 2020)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_metafed._validation import check_positive
from lightning_metafed.algorithms.fedavg import FedAvg
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.proximal import fedprox_update

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """FedProx, "Federated Optimization in Heterogeneous Networks" (Li et al., 2020).

    FedAvg whose clients minimize ``F_i(w) + μ/2 ‖w − θ‖²`` (:func:`~lightning_metafed.functional.fedprox_update`):
    the proximal term keeps local models near the received ``θ`` when clients' data differ, so
    more local work does not drift. Evaluated like :class:`~lightning_metafed.FedAvg`: ``pre`` is
    the global model, ``post`` after ``eval_inner_steps`` steps of fine-tuning.

    Args:
        net: the global model the clients train (``None``: :meth:`~lightning_metafed.MetaFedModule.build_net`).
        mu: the proximal strength ``μ >= 0`` (``0``: FedAvg).

    Every other argument is :class:`~lightning_metafed.FedAvg`'s.
    """

    def __init__(self, net: nn.Module | None = None, mu: float = 0.01, **kwargs: Any):
        self.mu = check_positive("mu", mu, allow_zero=True)
        super().__init__(net=net, **kwargs)

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        update, aux = fedprox_update(
            self.functional_loss,
            self.net_params(meta),
            task,
            optimizer=self.inner_optimizer,
            mu=self.mu,
            local_epochs=self.local_epochs,
            batch_size=self.local_batch_size,
            use_query=self.use_query,
        )
        return self.prefixed(update), aux
