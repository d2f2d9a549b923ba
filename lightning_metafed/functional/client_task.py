"""The types every pure function shares: a client's task and a dict of named tensors."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["Aux", "ClientTask", "Params"]

#: Named tensors: parameters, gradients, uploads or per-client state, keyed by parameter name.
Params = dict[str, Tensor]
#: Detached diagnostics of a client computation (losses), keyed by name.
Aux = dict[str, Tensor]


class ClientTask(NamedTuple):
    """One client's task (unbatched), or ``m`` clients' tasks stacked along dim 0.

    ``num_steps`` (optional) is the client's local step budget this round (heterogeneous compute):
    the update rules stop its inner/local loop after that many steps (see
    ``lightning_metafed.functional.adapt.keep_after_budget``).

    Attributes:
        support_x: the support inputs ``[N_s, ...]`` (``[m, N_s, ...]`` stacked).
        support_y: the support labels or targets.
        query_x: the query inputs ``[N_q, ...]``.
        query_y: the query labels or targets.
        support_mask: ``[N_s]``, 1 for real support examples and 0 for padding (``None``: all real).
        query_mask: ``[N_q]``, 1 for real query examples and 0 for padding (``None``: all real).
        num_steps: the client's local step budget this round (``None``: no budget).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    support_mask: Tensor | None = None
    query_mask: Tensor | None = None
    num_steps: Tensor | int | None = None
