"""FedRep: shared representations for personalized federated learning (Collins, Hassani, Mokhtari
& Shakkottai, 2021)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_metafed._validation import check_int
from lightning_metafed.algorithms.fedper import PersonalHeadModule
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.personalized import fedrep_update

__all__ = ["FedRep"]


class FedRep(PersonalHeadModule):
    """FedRep (Collins et al., 2021, "Exploiting Shared Representations for Personalized Federated
    Learning").

    One round: each sampled client puts its stored head ``h`` on the received body ``θ_B``; with the
    body frozen it trains the head for ``head_steps`` steps, then with that head frozen it trains
    the body for ``body_steps`` steps (:func:`~lightning_metafed.functional.fedrep_update`); it keeps
    the new head and uploads ``θ_B − b``. With server ``SGD(lr=1)`` and a mean aggregator the body
    becomes the average of the clients' trained bodies. At evaluation only the head adapts, as a
    client's first phase does: ``eval_inner_steps`` steps (default ``head_steps``) with the body
    frozen, from the client's stored head (a client never seen: the global head).

    Args:
        net: the model, a shared body and a personal head (``None``:
            :meth:`~lightning_metafed.MetaFedModule.build_net`).
        head_params: the head's parameter patterns (see
            :class:`~lightning_metafed.algorithms.fedper.PersonalHeadModule`).
        head_steps: head steps per round (``>= 1``).
        body_steps: body steps per round (``>= 0``; ``0`` uploads a zero update).
        use_query: local data is support and query (``True``) or the support set only.
        eval_inner_steps: head fine-tuning steps at evaluation (default ``head_steps``; ``0``
            reports the personal model as stored).
        max_resident_rows: see :class:`~lightning_metafed.algorithms.stateful.StatefulModule`.
        inner_steps: not used by FedRep (its local work is ``head_steps`` and ``body_steps``); a
            value other than ``None`` is rejected.

    A step budget from ``faults.step_choices`` caps each of the two loops and may not exceed the
    larger of ``head_steps`` and ``body_steps``. Every other argument is
    :class:`~lightning_metafed.MetaFedModule`'s.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        head_params: Sequence[str] | str | None = None,
        head_steps: int = 5,
        body_steps: int = 1,
        use_query: bool = True,
        eval_inner_steps: int | None = None,
        max_resident_rows: int | None = None,
        inner_steps: int | None = None,
        **kwargs: Any,
    ):
        check_int("head_steps", head_steps, minimum=1)
        check_int("body_steps", body_steps, minimum=0)
        if inner_steps is not None:
            raise ValueError(
                "FedRep trains by `head_steps` and `body_steps` and fine-tunes with `eval_inner_steps`; "
                f"`inner_steps` is not used: expected it unset (None), got {inner_steps!r}"
            )
        super().__init__(
            net=net, head_params=head_params, inner_steps=head_steps, eval_inner_steps=eval_inner_steps,
            max_resident_rows=max_resident_rows, **kwargs,
        )
        self.head_steps = head_steps
        self.body_steps = body_steps
        self.use_query = bool(use_query)

    def local_step_bound(self) -> tuple[str, int] | None:
        if self.body_steps > self.head_steps:
            return "body_steps", self.body_steps
        return "head_steps", self.head_steps

    def adaptation_kwargs(self, meta: Mapping[str, Tensor]) -> dict[str, Any]:
        return {"adapt_names": self.head_names}

    def client_update(
        self, meta: Mapping[str, Tensor], task: ClientTask, state: Mapping[str, Tensor]
    ) -> tuple[Params, Aux, Params]:
        upload, aux, head = fedrep_update(
            self.functional_loss,
            self.net_params(meta),
            state,
            task,
            optimizer=self.inner_optimizer,
            head_steps=self.head_steps,
            body_steps=self.body_steps,
            head_names=self.head_names,
            use_query=self.use_query,
        )
        return self.prefixed(upload), aux, head
