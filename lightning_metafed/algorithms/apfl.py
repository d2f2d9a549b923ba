"""APFL (Deng, Kamani & Mahdavi, 2020): each client mixes a personal model with the global one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_metafed._validation import check_int, check_positive, check_range
from lightning_metafed.algorithms.stateful import StatefulModule
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.personalized import APFL_ALPHA_KEY, apfl_update
from lightning_metafed.inner import SGD, InnerOptimizer

__all__ = ["APFL"]


class APFL(StatefulModule):
    """APFL, "Adaptive Personalized Federated Learning" (Deng, Kamani & Mahdavi, 2020).

    One round, for each sampled client (:func:`~lightning_metafed.functional.apfl_update`): from
    ``w = θ``, ``inner_steps`` steps update the local copy ``w ← w − local_lr ∇f(w)``, the personal
    model ``v ← v − local_lr ∇_v f(v̄)`` and the mixing weight ``α ← clamp(α − alpha_lr ∇_α f(v̄), 0, 1)``
    with ``v̄ = α v + (1 − α) w``. The client uploads ``θ − w_K`` (server ``SGD(lr=1)``: FedAvg) and
    stores ``(v_K, α_K)``. A client never seen starts from ``v = θ`` (a copy of the current global
    parameters) and ``α = alpha_init``.

    Evaluation starts each client from its mixed model ``α v + (1 − α) θ`` (an unseen client: ``θ``)
    and adapts ``eval_inner_steps`` steps of ``inner_optimizer`` on its support set: the default
    ``0`` scores the mixed model as trained, the paper's evaluation.

    Args:
        net: the global model; each client's personal model has its architecture (``None``:
            :meth:`~lightning_metafed.MetaFedModule.build_net`).
        local_lr: the clients' local step size for ``w`` and ``v`` (``> 0``).
        inner_steps: local steps per round (``>= 0``).
        alpha_lr: step size of ``α`` (``>= 0``; ``0`` keeps ``α = alpha_init``).
        alpha_init: ``α`` of a client never seen, in ``[0, 1]``.
        use_query: local data is support and query (``True``) or the support set only.
        inner_optimizer: fine-tuning at evaluation (default ``SGD(lr=local_lr)``).
        eval_inner_steps: fine-tuning steps from the mixed model at evaluation (default ``0``).
        max_resident_rows: see :class:`~lightning_metafed.algorithms.stateful.StatefulModule`.

    Every other argument is :class:`~lightning_metafed.MetaFedModule`'s.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        local_lr: float = 0.01,
        inner_steps: int = 5,
        alpha_lr: float = 0.01,
        alpha_init: float = 0.5,
        use_query: bool = True,
        inner_optimizer: InnerOptimizer | None = None,
        eval_inner_steps: int = 0,
        max_resident_rows: int | None = None,
        **kwargs: Any,
    ):
        local_lr = check_positive("local_lr", local_lr)
        alpha_lr = check_positive("alpha_lr", alpha_lr, allow_zero=True)
        alpha_init = check_range("alpha_init", alpha_init, 0.0, 1.0, high_open=False)
        check_int("inner_steps", inner_steps, minimum=0)
        inner_optimizer = SGD(lr=local_lr) if inner_optimizer is None else inner_optimizer
        super().__init__(net=net, max_resident_rows=max_resident_rows, inner_steps=inner_steps,
                         inner_optimizer=inner_optimizer, eval_inner_steps=eval_inner_steps, **kwargs)
        self.local_lr = local_lr
        self.alpha_lr = alpha_lr
        self.alpha_init = alpha_init
        self.use_query = bool(use_query)

    def initial_state(self, key: Any) -> Params:
        """A client never seen: ``v`` a copy of the current global parameters, ``α = alpha_init``."""
        meta = self.meta_parameters(detach=True)
        dtype = next(iter(meta.values())).dtype
        alpha = torch.tensor(self.alpha_init, dtype=dtype, device=self.device)
        return {**{k: v.clone() for k, v in meta.items()}, APFL_ALPHA_KEY: alpha}

    def personal_params(self, meta: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> Params:
        """The mixed model ``α v + (1 − α) θ``."""
        alpha = state[APFL_ALPHA_KEY].clamp(0.0, 1.0)
        return {k: alpha * state[k] + (1 - alpha) * meta[k] for k in meta}

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask, state: Mapping[str, Tensor]) -> tuple[Params, Aux, Params]:
        personal = {**self.net_params(state), APFL_ALPHA_KEY: state[APFL_ALPHA_KEY]}
        update, aux, new = apfl_update(
            self.functional_loss,
            self.net_params(meta),
            personal,
            task,
            lr=self.local_lr,
            inner_steps=self.inner_steps,
            alpha_lr=self.alpha_lr,
            use_query=self.use_query,
        )
        alpha = new.pop(APFL_ALPHA_KEY)
        return self.prefixed(update), aux, {**self.prefixed(new), APFL_ALPHA_KEY: alpha}
