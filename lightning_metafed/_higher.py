"""The optional ``higher`` backend: inner loops through ``higher.innerloop_ctx`` (clients in a loop).

Any ``torch.optim`` optimizer can serve as the inner optimizer here
(:class:`lightning_metafed.inner.TorchOptimizer`). ``higher`` is imported lazily.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_metafed.functional.client_task import ClientTask

if TYPE_CHECKING:  # pragma: no cover
    from lightning_metafed.algorithms.base import MetaFedModule
    from lightning_metafed.data.task_batch import TaskBatch

__all__ = ["require_higher", "higher_maml_objective", "higher_maml_update"]


def require_higher() -> Any:
    """Import ``higher`` or raise an ``ImportError`` that says how to install it."""
    try:
        import higher
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "inner_backend='higher' needs the optional package `higher`: pip install 'lightning-metafed[higher]'"
        ) from err
    return higher


@contextmanager
def _inner_loop(module: MetaFedModule, track_higher_grads: bool):
    higher = require_higher()
    named = dict(module.net.named_parameters())
    names = getattr(module, "adapt_names", None) or list(named)
    optimizer = module.inner_optimizer.torch_optimizer([named[n] for n in names])
    with higher.innerloop_ctx(
        module.net, optimizer, copy_initial_weights=False, track_higher_grads=track_higher_grads
    ) as (fnet, diffopt):
        yield fnet, diffopt


def _run_maml(module: MetaFedModule, task: ClientTask, track_higher_grads: bool):
    with _inner_loop(module, track_higher_grads) as (fnet, diffopt):
        support_loss = None
        for _ in range(module.inner_steps):
            loss = module.compute_loss(fnet(task.support_x), task.support_y, task.support_mask)
            support_loss = loss if support_loss is None else support_loss
            diffopt.step(loss)
        if support_loss is None:
            support_loss = module.compute_loss(fnet(task.support_x), task.support_y, task.support_mask)
        query_loss = module.compute_loss(fnet(task.query_x), task.query_y, task.query_mask)
        fast = list(fnet.parameters())
    aux = {"support_loss": support_loss.detach(), "query_loss": query_loss.detach()}
    return query_loss, aux, fast


def higher_maml_objective(module: MetaFedModule, task: ClientTask) -> tuple[Tensor, dict[str, Tensor]]:
    """The query loss after the inner loop, differentiable w.r.t. ``module.net``'s live parameters."""
    loss, aux, _ = _run_maml(module, task, track_higher_grads=not module.first_order)
    return loss, aux


def higher_maml_update(module: MetaFedModule, task: ClientTask) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """MAML/FOMAML update computed with ``higher``; FOMAML differentiates at the adapted weights."""
    names = [n for n, _ in module.net.named_parameters()]
    loss, aux, fast = _run_maml(module, task, track_higher_grads=not module.first_order)
    wrt = fast if module.first_order else list(module.net.parameters())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    update = {
        "net." + n: (torch.zeros_like(p) if g is None else g)
        for n, p, g in zip(names, module.net.parameters(), grads)
    }
    return update, aux


def _clients(batch: TaskBatch):
    tasks = batch.tasks()
    for i in range(batch.num_clients):
        yield ClientTask(*(None if t is None else t[i] for t in tasks))


def higher_adaptation_curves(module: MetaFedModule, batch: TaskBatch) -> dict[str, Tensor]:
    """Per-client query metrics after ``0..eval_inner_steps`` steps, ``{metric: [m, K+1]}``."""
    per_client = []
    for task in _clients(batch):
        curves: dict[str, list[Tensor]] = {}
        with _inner_loop(module, track_higher_grads=False) as (fnet, diffopt):
            for step in range(module.eval_inner_steps + 1):
                with torch.no_grad():
                    for key, value in module.compute_metrics(fnet(task.query_x), task.query_y, task.query_mask).items():
                        curves.setdefault(key, []).append(value)
                if step < module.eval_inner_steps:
                    diffopt.step(module.compute_loss(fnet(task.support_x), task.support_y, task.support_mask))
        per_client.append({k: torch.stack(v) for k, v in curves.items()})
    return {k: torch.stack([c[k] for c in per_client]) for k in per_client[0]}


def higher_personalize(module: MetaFedModule, batch: TaskBatch, steps: int) -> dict[str, Tensor]:
    """Per-client adapted parameters ``{name: [m, *shape]}``."""
    names = [n for n, _ in module.net.named_parameters()]
    adapted = []
    for task in _clients(batch):
        with _inner_loop(module, track_higher_grads=False) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(module.compute_loss(fnet(task.support_x), task.support_y, task.support_mask))
            adapted.append([p.detach() for p in fnet.parameters()])
    return {n: torch.stack([a[i] for a in adapted]) for i, n in enumerate(names)}
