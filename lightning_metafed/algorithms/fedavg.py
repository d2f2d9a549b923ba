"""FedAvg (McMahan et al., 2017), evaluated as the global model and after fine-tuning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_metafed._validation import check_int
from lightning_metafed.algorithms.base import MetaFedModule
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.updates import fedavg_update

__all__ = ["FedAvg"]


class FedAvg(MetaFedModule):
    """FedAvg: each client trains ``local_epochs`` over its data and uploads ``θ − θ_local``.

    With server ``SGD(lr=1)`` and sample-count weights the round is McMahan et al.'s weighted
    average of the local models; with Adam it is FedAdam (Reddi et al., 2021). At evaluation the
    ``pre`` metrics are the global model's and ``post`` are after ``eval_inner_steps`` steps of
    fine-tuning on the support set (FedAvg + fine-tuning).

    Args:
        net: the global model the clients train (``None``: :meth:`~lightning_metafed.MetaFedModule.build_net`).
        inner_optimizer: the clients' local optimizer (default ``SGD(lr=0.01)``), also used to
            fine-tune at evaluation.
        local_epochs: passes over the local data per round.
        local_batch_size: mini-batch size of local training (``None``: full batch).
        use_query: local data is support and query (``True``) or the support set only.
        inner_steps: not used by FedAvg (training is by local epochs); a value other than ``None``/``0`` is rejected.

    Every other argument is :class:`~lightning_metafed.MetaFedModule`'s.

    Example:
        Two rounds of 5 clients with a Trainer (server ``SGD(lr=1)``: plain FedAvg), then validation
        of the global model (``pre``) and of the model fine-tuned on each held-out client (``post``).

        >>> from functools import partial
        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from torch import nn
        >>> from lightning_metafed import FedAvg
        >>> from lightning_metafed.data import SinusoidClients
        >>> _ = torch.manual_seed(0)
        >>> model = FedAvg(nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1)), local_epochs=2,
        ...                server_optimizer=partial(torch.optim.SGD, lr=1.0))
        >>> data = SinusoidClients(num_clients=100, clients_per_round=5, rounds_per_epoch=2)
        >>> trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, datamodule=data)
        >>> trainer.global_step
        2
        >>> {"train/meta_loss", "val/loss_pre", "val/loss_post"} <= set(trainer.callback_metrics)
        True
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        local_epochs: int = 1,
        local_batch_size: int | None = None,
        eval_inner_steps: int = 1,
        use_query: bool = True,
        inner_steps: int | None = None,
        **kwargs: Any,
    ):
        if inner_steps not in (None, 0):  # 0 is what FedAvg runs (and what its older checkpoints record)
            raise ValueError(
                f"FedAvg trains by `local_epochs` and `local_batch_size` and fine-tunes with `eval_inner_steps`; "
                f"`inner_steps` is not used: expected it unset (None or 0), got {inner_steps!r}"
            )
        super().__init__(net=net, inner_steps=0, eval_inner_steps=eval_inner_steps, **kwargs)
        check_int("local_epochs", local_epochs, minimum=1)
        if local_batch_size is not None:
            check_int("local_batch_size", local_batch_size, minimum=1)
        self.local_epochs = local_epochs
        self.local_batch_size = local_batch_size
        self.use_query = bool(use_query)

    def local_step_bound(self) -> tuple[str, int] | None:
        return None  # a step budget caps the local mini-batch steps

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        update, aux = fedavg_update(
            self.functional_loss,
            self.net_params(meta),
            task,
            optimizer=self.inner_optimizer,
            local_epochs=self.local_epochs,
            batch_size=self.local_batch_size,
            use_query=self.use_query,
        )
        return self.prefixed(update), aux
