"""The client computation of a round: every surviving client's upload, or (fast path) their mean.

:meth:`ClientComputation.uploads` runs the one-client update function over this process's share
of the clients and gathers every share, so each process ends with all ``m`` uploads.
:meth:`ClientComputation.mean_gradient` is the fast path for updates that are the gradient of a
per-client loss: the weighted mean of the uploads is the gradient of the weighted mean loss, one
backward instead of ``m`` per-client gradients. Per-client state (when a store is given) is one
more input and output of the client function: rows gathered for the clients' ids, new rows returned
with the uploads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from lightning_metafed.communication import payload_bytes
from lightning_metafed.data.task_batch import TaskBatch
from lightning_metafed.functional.aggregate import normalize_weights
from lightning_metafed.functional.client_task import Aux, Params
from lightning_metafed.round.clients import ClientRunner, World, client_slice
from lightning_metafed.round.state import ClientStateStore

__all__ = ["ClientComputation", "Uploads"]


@dataclass(frozen=True)
class Uploads:
    """What a round's clients send, one row per client in client order.

    Attributes:
        updates: ``{name: [m, *shape]}`` the uploads.
        aux: ``{name: [m]}`` detached per-client diagnostics (losses).
        weights: ``[m]`` aggregation weights, or ``None`` (unweighted).
        client_id: the clients' ids (a ``[m]`` tensor, a sequence, or ``None``).
        state: ``{name: [m, ...]}`` the clients' new per-client state, or ``None``.
        bytes_per_client: the size of one upload (encoded, when the uploads were compressed).
        residual: ``{name: [m, ...]}`` the clients' new error-feedback residuals, or ``None``.
    """

    updates: Params
    aux: Aux
    weights: Tensor | None
    client_id: Any
    bytes_per_client: int
    state: Params | None = None
    residual: Params | None = None

    @property
    def num_clients(self) -> int:
        return next(iter(self.updates.values())).shape[0]

    def keep(self, mask: Tensor) -> Uploads:
        """Only the clients where ``mask`` (``[m]`` bool) is true."""
        ids = self.client_id
        if isinstance(ids, Tensor):
            ids = ids[mask.to(ids.device)]
        elif ids is not None:
            ids = [c for c, ok in zip(ids, mask.tolist()) if ok]
        rows = lambda d: None if d is None else {k: v[mask.to(v.device)] for k, v in d.items()}  # noqa: E731
        weights = None if self.weights is None else self.weights[mask.to(self.weights.device)]
        return replace(
            self, updates=rows(self.updates), aux=rows(self.aux), weights=weights, client_id=ids, state=rows(self.state),
            residual=rows(self.residual),
        )


@dataclass(frozen=True)
class ClientComputation:
    """The clients' side of a round, run by whoever holds the meta-parameters.

    Args:
        update: ``update(meta, task) -> (upload, aux)`` for one client; with ``state``,
            ``update(meta, task, state_row) -> (upload, aux, new_state_row)``.
        runner: how the function is mapped over clients (vmap, loop, chunks, compile).
        world: the processes sharing the round (each computes a share).
        objective: ``objective(meta, task) -> (loss, aux)`` whose gradient is the upload (enables
            :meth:`mean_gradient`), or ``None``.
        state_store: the per-client state store, or ``None`` for stateless clients.
    """

    update: Callable[..., tuple[Any, ...]]
    runner: ClientRunner
    world: World = World()
    objective: Callable[..., tuple[Tensor, Aux]] | None = None
    state_store: ClientStateStore | None = None

    def uploads(self, meta: Mapping[str, Tensor], batch: TaskBatch, weights: Tensor | None) -> Uploads:
        """Every client's upload (this process computes its share; the shares are gathered)."""
        m = batch.num_clients
        lo, hi = self.world.share(m)
        part = batch[lo:hi]
        per_client: tuple[Any, ...] = (part.tasks(),)
        if self.state_store is not None:
            per_client += (self.state_store.gather(part.client_id),)
        out = self.runner.map(self.update, (dict(meta),), per_client, compiled=True)
        updates, aux = out[0], out[1]
        upload = payload_bytes({k: u[0] for k, u in updates.items()})
        state = None if self.state_store is None else self.world.gather_rows(out[2], m)
        return Uploads(
            updates=self.world.gather_rows(updates, m),
            aux=self.world.gather_rows(aux, m),
            weights=weights,
            client_id=batch.client_id,
            bytes_per_client=upload,
            state=state,
        )

    def mean_gradient(
        self, params: Mapping[str, Tensor], batch: TaskBatch, weights: Tensor | None, loss_scale: float = 1.0
    ) -> tuple[Params, Aux]:
        """``Σ_i w_i ∇L_i`` (weights normalized over all ``m`` clients) and per-client diagnostics.

        With ``runner.chunk_size`` the clients are differentiated a chunk at a time, so only one
        chunk's graph is alive at once; the chunks' gradients add up to the same sum. Under DDP each
        process differentiates its share and the partial sums are added across processes.
        Parameters that do not require grad get zeros. ``loss_scale`` (a mixed-precision loss scale)
        multiplies the loss before the backward and divides the gradients after it, so small fp16
        gradients do not underflow.
        """
        tasks, m = batch.tasks(), batch.num_clients
        lo, hi = self.world.share(m)
        names = list(params)
        chunk = self.runner.chunk_size or max(hi - lo, 1)
        total: list[Tensor] | None = None
        w_all, aux_parts = None, []
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            losses, aux = self.runner.map(
                self.objective, (dict(params),), (client_slice(tasks, slice(start, stop)),), chunked=False, compiled=True
            )
            if w_all is None:
                w_all = normalize_weights(weights, m, like=losses)
            grads = _gradients((w_all[start:stop] * losses).sum(), list(params.values()), loss_scale)
            total = grads if total is None else [a + g for a, g in zip(total, grads)]
            aux_parts.append(aux)
        aux = {k: torch.cat([a[k] for a in aux_parts]) for k in aux_parts[0]}
        return self.world.sum_shares(dict(zip(names, total)), m), self.world.gather_rows(aux, m)


def _gradients(loss: Tensor, params: list[Tensor], loss_scale: float) -> list[Tensor]:
    """``∇ loss`` w.r.t. each of ``params`` in the parameter's dtype (zeros where a parameter is frozen
    or unused), taken on ``loss · loss_scale`` and divided back (the scaled loss in at least float32)."""
    live = [p for p in params if p.requires_grad]
    if loss_scale != 1.0:
        loss = loss.to(torch.promote_types(loss.dtype, torch.float32)) * loss_scale
    found = iter(torch.autograd.grad(loss, live, allow_unused=True) if live else ())
    grads = [next(found) if p.requires_grad else None for p in params]
    grads = [torch.zeros_like(p) if g is None else g.to(p.dtype) for p, g in zip(params, grads)]
    return [g / loss_scale for g in grads] if loss_scale != 1.0 else grads
