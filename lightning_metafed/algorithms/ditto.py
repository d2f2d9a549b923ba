"""Ditto (Li, Hu, Beirami & Smith, 2021): a global FedAvg model and a regularized personal model per client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_metafed._validation import check_int, check_positive
from lightning_metafed.algorithms.stateful import StatefulModule
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.personalized import ditto_update
from lightning_metafed.inner import InnerOptimizer

__all__ = ["Ditto"]


class Ditto(StatefulModule):
    """Ditto, "Fair and Robust Federated Learning Through Personalization" (Li et al., 2021).

    One round, for each sampled client (:func:`~lightning_metafed.functional.ditto_update`): the
    global part trains ``w_K = U_K(θ)`` with ``inner_optimizer`` and uploads ``θ − w_K`` (with
    server ``SGD(lr=1)`` the server step is FedAvg); the personal part runs ``personal_steps`` steps
    on ``f(v) + λ/2 ‖v − θ‖²`` from the client's stored personal model ``v`` and stores the result.
    A client never seen starts from ``v = θ``, a copy of the current global parameters.

    Evaluation starts each client from its personal model (an unseen client from the global model)
    and adapts ``eval_inner_steps`` steps of ``inner_optimizer`` on its support set: the default
    ``0`` scores the personal model as trained, the paper's evaluation.

    Args:
        net: the global model; each client's personal model has its architecture (``None``:
            :meth:`~lightning_metafed.MetaFedModule.build_net`).
        inner_steps: local steps of the global part (``>= 0``).
        personal_steps: steps of the personal part per round (``>= 0``).
        lam: the proximal strength ``λ >= 0`` (``0``: purely local personal models).
        personal_optimizer: the personal part's inner optimizer (default ``inner_optimizer``).
        use_query: local data is support and query (``True``) or the support set only.
        eval_inner_steps: fine-tuning steps from the personal model at evaluation (default ``0``).
        max_resident_rows: see :class:`~lightning_metafed.algorithms.stateful.StatefulModule`.

    Every other argument is :class:`~lightning_metafed.MetaFedModule`'s.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        inner_steps: int = 5,
        personal_steps: int = 5,
        lam: float = 0.1,
        personal_optimizer: InnerOptimizer | None = None,
        use_query: bool = True,
        eval_inner_steps: int = 0,
        max_resident_rows: int | None = None,
        **kwargs: Any,
    ):
        check_int("personal_steps", personal_steps, minimum=0)
        lam = check_positive("lam", lam, allow_zero=True)
        super().__init__(net=net, max_resident_rows=max_resident_rows, inner_steps=inner_steps,
                         eval_inner_steps=eval_inner_steps, **kwargs)
        self.personal_steps = personal_steps
        self.lam = lam
        self.personal_optimizer = personal_optimizer
        self.use_query = bool(use_query)

    def initial_state(self, key: Any) -> Params:
        """A client never seen: its personal model is a copy of the current global parameters."""
        return {k: v.clone() for k, v in self.meta_parameters(detach=True).items()}

    def personal_params(self, meta: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> Params:
        """The client's personal model ``v``."""
        return {k: state[k] for k in meta}

    def local_step_bound(self) -> tuple[str, int] | None:
        """A step budget caps both local loops: it may not exceed the longer one."""
        if self.personal_steps > self.inner_steps:
            return "personal_steps", self.personal_steps
        return "inner_steps", self.inner_steps

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask, state: Mapping[str, Tensor]) -> tuple[Params, Aux, Params]:
        update, aux, personal = ditto_update(
            self.functional_loss,
            self.net_params(meta),
            self.net_params(state),
            task,
            optimizer=self.inner_optimizer,
            inner_steps=self.inner_steps,
            personal_steps=self.personal_steps,
            lam=self.lam,
            personal_optimizer=self.personal_optimizer,
            use_query=self.use_query,
        )
        return self.prefixed(update), aux, self.prefixed(personal)
