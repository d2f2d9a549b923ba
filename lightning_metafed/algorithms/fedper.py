"""FedPer: federated learning with personalization layers (Arivazhagan, Aggarwal, Singh &
Choudhary, 2019).

The net is split into a shared body and a personal head. :class:`PersonalHeadModule` holds what
every such algorithm shares: which parameters form the head, the clients' heads as per-client state
and the evaluation from a client's own head. :class:`FedPer` adds its local update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_metafed._validation import check_int
from lightning_metafed.algorithms.anil import default_head
from lightning_metafed.algorithms.arguments import resolve_adapt_names
from lightning_metafed.algorithms.stateful import StatefulModule
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.personalized import fedper_update

__all__ = ["FedPer", "PersonalHeadModule"]


def resolve_head(
    net: nn.Module, head_params: Sequence[str] | str | None, owner: str,
    announce: str = "{owner} keeps the head parameters {names} on the clients",
) -> list[str]:
    """The net parameter names of the head: those matching ``head_params`` (``None``: the last
    parameterized submodule, announced with the ``announce`` format); the body (every other
    parameter) must not be empty."""
    if head_params is None:
        names = default_head(net)
        rank_zero_info(announce.format(owner=owner, names=names))
    else:
        names = resolve_adapt_names(net, head_params, "head_params") or []
    if len(names) == len(list(net.parameters())):
        raise ValueError(
            f"Expected `head_params` to leave at least one parameter in the shared body of {owner}, "
            f"got {head_params!r}, which selects every parameter: {names}"
        )
    return names


class PersonalHeadModule(StatefulModule):
    """Base class of the algorithms whose clients share a body and keep a personal head.

    A client's state row is its head, keyed by the net's own parameter names (e.g. ``"2.weight"``
    for ``net.2.weight``). A client never seen starts from a detached copy of the global head, which
    no round moves: uploads hold body entries only, so the server step gives the head no gradient,
    and communication counts the body only. At evaluation a client starts from the global body with
    its stored head (a client never seen: the global head) and then adapts ``eval_inner_steps``
    steps on its support set.

    Args:
        head_params: shell-style patterns (``fnmatch``) of the net parameters that form the head,
            e.g. ``["classifier.*"]``; ``None`` selects the net's last parameterized submodule.

    Every other argument is :class:`~lightning_metafed.algorithms.stateful.StatefulModule`'s.
    """

    def __init__(self, net: nn.Module | None = None, head_params: Sequence[str] | str | None = None, **kwargs: Any):
        super().__init__(net=net, **kwargs)
        self.head_names = resolve_head(self.net, head_params, type(self).__name__)

    def initial_state(self, key: Any) -> Params:
        """A detached copy of the current global head."""
        return {name: self.net.get_parameter(name).detach().clone() for name in self.head_names}

    def download_payload(self) -> Params:
        """The shared body: a client's head never leaves it, so the server does not send one."""
        head = set(self.prefixed({name: None for name in self.head_names}))
        return {k: v for k, v in self.meta_parameters(detach=True).items() if k not in head}

    def personal_params(self, meta: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> Params:
        """``meta`` with the head replaced by the client's stored head."""
        return {**meta, **self.prefixed({name: state[name] for name in self.head_names})}


class FedPer(PersonalHeadModule):
    """FedPer (Arivazhagan et al., 2019, "Federated Learning with Personalization Layers").

    One round: each sampled client puts its stored head ``h`` on the received body ``θ_B``, trains
    both for ``inner_steps`` steps of ``inner_optimizer`` (:func:`~lightning_metafed.functional.fedper_update`),
    keeps the trained head and uploads ``θ_B − b_K``. With server ``SGD(lr=1)`` and a mean
    aggregator the body becomes the average of the clients' trained bodies.

    Args:
        net: the model, a shared body and a personal head (``None``:
            :meth:`~lightning_metafed.MetaFedModule.build_net`).
        head_params: the head's parameter patterns (see
            :class:`~lightning_metafed.algorithms.fedper.PersonalHeadModule`).
        inner_steps: local steps per round (``>= 1``); also bounds ``faults.step_choices``.
        use_query: local data is support and query (``True``) or the support set only.
        eval_inner_steps: fine-tuning steps of body and head at evaluation from the client's
            personal model (default ``inner_steps``; ``0`` reports the personal model as stored).
        max_resident_rows: see :class:`~lightning_metafed.algorithms.stateful.StatefulModule`.

    Every other argument is :class:`~lightning_metafed.MetaFedModule`'s.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        head_params: Sequence[str] | str | None = None,
        inner_steps: int = 5,
        use_query: bool = True,
        eval_inner_steps: int | None = None,
        max_resident_rows: int | None = None,
        **kwargs: Any,
    ):
        check_int("inner_steps", inner_steps, minimum=1)
        super().__init__(
            net=net, head_params=head_params, inner_steps=inner_steps, eval_inner_steps=eval_inner_steps,
            max_resident_rows=max_resident_rows, **kwargs,
        )
        self.use_query = bool(use_query)

    def client_update(
        self, meta: Mapping[str, Tensor], task: ClientTask, state: Mapping[str, Tensor]
    ) -> tuple[Params, Aux, Params]:
        upload, aux, head = fedper_update(
            self.functional_loss,
            self.net_params(meta),
            state,
            task,
            optimizer=self.inner_optimizer,
            inner_steps=self.inner_steps,
            head_names=self.head_names,
            use_query=self.use_query,
        )
        return self.prefixed(upload), aux, head

