"""SCAFFOLD (Karimireddy et al., 2020): local SGD corrected by client and server control variates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_metafed._validation import check_int, check_positive
from lightning_metafed.algorithms.base import NET_PREFIX
from lightning_metafed.algorithms.stateful import StatefulModule
from lightning_metafed.algorithms.trainer_access import attached_trainer, round_sizes
from lightning_metafed.data.task_batch import TaskBatch
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.personalized import (
    CONTROL_PREFIX,
    scaffold_server_control,
    scaffold_update,
    split_control,
)
from lightning_metafed.inner import SGD, InnerOptimizer

__all__ = ["SCAFFOLD"]


def _buffer_name(name: str) -> str:
    return name.replace(".", ":")  # buffer names may not hold dots


class SCAFFOLD(StatefulModule):
    """SCAFFOLD, "Stochastic Controlled Averaging for Federated Learning" (Karimireddy, Kale, Mohri,
    Reddi, Stich & Suresh, 2020), option II.

    One round (:func:`~lightning_metafed.functional.scaffold_update`): each sampled client runs
    ``inner_steps`` steps ``y ← y − local_lr (∇f(y) − c_i + c)`` from ``θ`` with its control variate
    ``c_i`` (its state; zeros for a client never seen) and the server's ``c``, then sets
    ``c_i⁺ = c_i − c + (θ − y_K) / (K · local_lr)``. It uploads ``θ − y_K`` and ``c_i⁺ − c_i`` (under
    ``control.*``). The server optimizer applies the mean parameter update (``SGD(lr=η_g)`` is the
    paper's global step) and the server sets ``c ← c + (|S| / N) · mean(c_i⁺ − c_i)``, the mean taken
    by the aggregator over the accepted uploads, ``|S|`` the clients sampled per round and ``N`` the
    train clients. ``c`` is kept in buffers (``server_control.*``), so checkpoints carry it; the upload
    is twice the parameters' size. Evaluation starts from the global model.

    Args:
        net: the global model the clients train (``None``: :meth:`~lightning_metafed.MetaFedModule.build_net`).
        local_lr: the clients' local step size (``> 0``).
        inner_steps: local steps per round (``>= 1``).
        use_query: local data is support and query (``True``) or the support set only.
        population: ``N``; by default the train clients of the Trainer's data module.
        sampled_per_round: ``|S|``; by default the data module's ``clients_per_round``.
        inner_optimizer: fine-tuning at evaluation (default ``SGD(lr=local_lr)``).
        max_resident_rows: see :class:`~lightning_metafed.algorithms.stateful.StatefulModule`.

    Every other argument is :class:`~lightning_metafed.MetaFedModule`'s.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        local_lr: float = 0.01,
        inner_steps: int = 5,
        use_query: bool = True,
        population: int | None = None,
        sampled_per_round: int | None = None,
        inner_optimizer: InnerOptimizer | None = None,
        max_resident_rows: int | None = None,
        **kwargs: Any,
    ):
        local_lr = check_positive("local_lr", local_lr)
        check_int("inner_steps", inner_steps, minimum=1)
        for name, value in (("population", population), ("sampled_per_round", sampled_per_round)):
            if value is not None:
                check_int(name, value, minimum=1)
        if population is not None and sampled_per_round is not None and sampled_per_round > population:
            raise ValueError(f"Expected `sampled_per_round` <= `population` = {population}, got {sampled_per_round}")
        inner_optimizer = inner_optimizer or SGD(lr=local_lr)
        super().__init__(net=net, max_resident_rows=max_resident_rows, inner_steps=inner_steps, inner_optimizer=inner_optimizer, **kwargs)
        self.local_lr = local_lr
        self.use_query = bool(use_query)
        self.population = population
        self.sampled_per_round = sampled_per_round
        self.server_control = nn.Module()
        for name, value in self.named_parameters():
            self.server_control.register_buffer(_buffer_name(name), torch.zeros_like(value.detach()))

    def control(self) -> Params:
        """The server control variate ``c`` by module parameter name."""
        return {n: self.server_control.get_buffer(_buffer_name(n)) for n, _ in self.named_parameters()}

    def download_payload(self) -> Params:
        """The parameters and the server control variate ``c``."""
        return {**self.meta_parameters(detach=True), **{CONTROL_PREFIX + k: v for k, v in self.control().items()}}

    def initial_state(self, key: Any) -> Params:
        """A client never seen: ``c_i = 0``."""
        return {k: torch.zeros_like(v) for k, v in self.meta_parameters(detach=True).items()}

    def evaluation_params(self, batch: TaskBatch) -> None:
        """Every evaluated client starts from the global model (a control variate is no model)."""
        return None

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask, state: Mapping[str, Tensor]) -> tuple[Params, Aux, Params]:
        upload, aux, control = scaffold_update(
            self.functional_loss,
            self.net_params(meta),
            self.net_params(state),
            task,
            lr=self.local_lr,
            inner_steps=self.inner_steps,
            server_control=self.net_params(self.control()),
            use_query=self.use_query,
        )
        update, delta = split_control(upload)
        return {**self.prefixed(update), **self.prefixed(delta, CONTROL_PREFIX + NET_PREFIX)}, aux, self.prefixed(control)

    def server_aggregate(self, aggregate: Params) -> Params:
        """The parameter part of the aggregate (the control delta is applied in :meth:`after_server_step`)."""
        return split_control(aggregate)[0]

    def after_server_step(self, aggregate: Params) -> None:
        """``c ← c + (|S| / N) · mean(c_i⁺ − c_i)``."""
        sampled, population = self.round_sizes()
        new = scaffold_server_control(self.control(), split_control(aggregate)[1], sampled=sampled, population=population)
        for name, value in new.items():
            self.server_control.get_buffer(_buffer_name(name)).copy_(value)

    def round_sizes(self) -> tuple[int, int]:
        """``(|S|, N)``: clients sampled per round and train clients (see :func:`round_sizes`)."""
        return round_sizes(attached_trainer(self), self.sampled_per_round, self.population, "SCAFFOLD's server control")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.round_sizes()  # fail before the first round when |S| or N is unknown
