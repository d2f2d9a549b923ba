"""Inner-loop backends: how a module runs its clients' inner loops, for training and evaluation.

- :class:`FuncBackend` (``inner_backend="func"``, the default): pure ``torch.func`` inner loops on
  dicts of tensors, vectorized over clients with ``vmap``.
- :class:`HigherBackend` (``inner_backend="higher"``): ``higher.innerloop_ctx`` over the module's
  net, one client at a time; accepts any ``torch.optim`` optimizer
  (:class:`~lightning_metafed.inner.TorchOptimizer`). An optional oracle and a migration path.

A module holds one backend object (``module.backend``) and calls it instead of branching on the
backend's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_metafed.data.task_batch import TaskBatch
from lightning_metafed.faults import ClientFaults
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.updates import maml_objective
from lightning_metafed.inner import InnerOptimizer

if TYPE_CHECKING:  # pragma: no cover
    from lightning_metafed.algorithms.base import MetaFedModule

__all__ = ["BACKENDS", "FuncBackend", "HigherBackend", "InnerBackend", "make_backend"]


class InnerBackend:
    """The operations that depend on how inner loops run."""

    name: str
    #: Whether clients can be vectorized with ``torch.func.vmap``.
    vectorizable: bool

    def check(self, owner: str, supported: bool, optimizer: InnerOptimizer, vectorize: bool, faults: ClientFaults | None) -> None:
        """Reject a module configuration this backend cannot run (before any training)."""
        raise NotImplementedError

    def maml_objective(self, module: Any, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Tensor, Aux]:
        """One client's ``L_query(U_K(θ))``, differentiable w.r.t. the meta-parameters."""
        raise NotImplementedError

    def maml_update(self, module: Any, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        """One client's MAML/FOMAML upload ``{module param name: gradient}``."""
        raise NotImplementedError

    def adaptation_curves(self, module: MetaFedModule, batch: TaskBatch) -> dict[str, Tensor]:
        """Query metrics of every client after ``0..eval_inner_steps`` steps: ``{metric: [m, K+1]}``."""
        raise NotImplementedError

    def personalize(self, module: MetaFedModule, batch: TaskBatch, steps: int) -> Params:
        """Each client's adapted net parameters ``{name: [m, *shape]}`` after ``steps`` steps."""
        raise NotImplementedError

    def round_diagnostics(self, module: MetaFedModule, batch: TaskBatch) -> dict[str, Tensor]:
        """Mean support/query losses before and after ``inner_steps`` adaptation (``{}``: none)."""
        raise NotImplementedError


class FuncBackend(InnerBackend):
    name = "func"
    vectorizable = True

    def check(self, owner: str, supported: bool, optimizer: InnerOptimizer, vectorize: bool, faults: ClientFaults | None) -> None:
        if not optimizer.functional:
            raise ValueError(
                f"`inner_optimizer` {optimizer!r} only works with inner_backend='higher'; "
                "with inner_backend='func' use lightning_metafed.inner.SGD or Adam"
            )

    def maml_objective(self, module: Any, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Tensor, Aux]:
        return maml_objective(
            module.functional_loss,
            module.net_params(meta),
            task,
            optimizer=module.inner_optimizer,
            inner_steps=module.inner_steps,
            first_order=module.first_order,
            **module.adaptation_kwargs(meta),
        )

    def maml_update(self, module: Any, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        grads, aux = module.functional_update(module.net_params(meta), task)
        return module.prefixed(grads), aux

    def adaptation_curves(self, module: MetaFedModule, batch: TaskBatch) -> dict[str, Tensor]:
        def one(meta: Mapping[str, Tensor], task: ClientTask) -> dict[str, Tensor]:
            curves: dict[str, list[Tensor]] = {}
            for params in module.adapt_client(meta, task):
                pred = torch.func.functional_call(module.net, params, (task.query_x,))
                for key, value in module.compute_metrics(pred, task.query_y, task.query_mask).items():
                    curves.setdefault(key, []).append(value.detach())
            return {k: torch.stack(v) for k, v in curves.items()}

        return _map_evaluation(module, one, batch)

    def personalize(self, module: MetaFedModule, batch: TaskBatch, steps: int) -> Params:
        def last(meta: Mapping[str, Tensor], task: ClientTask) -> Params:
            params: Params = {}
            for params in module.adapt_client(meta, task, steps):
                pass
            return {k: v.detach() for k, v in params.items()}

        return _map_evaluation(module, last, batch)

    def round_diagnostics(self, module: MetaFedModule, batch: TaskBatch) -> dict[str, Tensor]:
        def one(meta: Mapping[str, Tensor], task: ClientTask) -> dict[str, Tensor]:
            first = last = None
            for params in module.adapt_client(meta, task, module.inner_steps):
                first = params if first is None else first
                last = params
            out = {}
            for stage, params in (("pre", first), ("post", last)):
                out[f"loss_support_{stage}"] = module.functional_loss(params, task.support_x, task.support_y, task.support_mask).detach()
                out[f"loss_query_{stage}"] = module.functional_loss(params, task.query_x, task.query_y, task.query_mask).detach()
            return out

        values = module.map_clients(one, (module.meta_parameters(detach=True),), batch.tasks())
        return {k: v.mean() for k, v in values.items()}


def _map_evaluation(module: MetaFedModule, fn: Any, batch: TaskBatch) -> Any:
    """``fn(meta, task_i)`` for every client, from the meta-parameters or, for a module with
    per-client state, from each client's own starting point (:meth:`MetaFedModule.evaluation_params`)."""
    rows = module.evaluation_params(batch)
    if rows is None:
        return module.map_clients(fn, (module.meta_parameters(detach=True),), batch.tasks())
    return module.runner.map(fn, (), (rows, batch.tasks()))


class HigherBackend(InnerBackend):
    name = "higher"
    vectorizable = False

    def check(self, owner: str, supported: bool, optimizer: InnerOptimizer, vectorize: bool, faults: ClientFaults | None) -> None:
        if not supported:
            raise ValueError(f"`inner_backend='higher'` is not supported by {owner}; use inner_backend='func'")
        from lightning_metafed._higher import require_higher

        require_higher()
        if vectorize:
            rank_zero_warn(
                "inner_backend='higher' runs clients in a Python loop: higher rebinds module parameters per "
                "client, which torch.func.vmap cannot vectorize."
            )
        if faults is not None and faults.step_choices is not None:
            raise ValueError("`faults.step_choices` (per-client step budgets) needs inner_backend='func'")

    def maml_objective(self, module: Any, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Tensor, Aux]:
        from lightning_metafed._higher import higher_maml_objective

        return higher_maml_objective(module, task)

    def maml_update(self, module: Any, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        from lightning_metafed._higher import higher_maml_update

        return higher_maml_update(module, task)

    def adaptation_curves(self, module: MetaFedModule, batch: TaskBatch) -> dict[str, Tensor]:
        from lightning_metafed._higher import higher_adaptation_curves

        return higher_adaptation_curves(module, batch)

    def personalize(self, module: MetaFedModule, batch: TaskBatch, steps: int) -> Params:
        from lightning_metafed._higher import higher_personalize

        return higher_personalize(module, batch, steps)

    def round_diagnostics(self, module: MetaFedModule, batch: TaskBatch) -> dict[str, Tensor]:
        return {}  # evaluation-style adaptation through higher runs one client at a time: not worth it per round


BACKENDS: dict[str, type[InnerBackend]] = {"func": FuncBackend, "higher": HigherBackend}


def make_backend(name: str) -> InnerBackend:
    """The backend called ``name`` (``"func"`` or ``"higher"``)."""
    if name not in BACKENDS:
        raise ValueError(f"Expected `inner_backend` to be 'func' or 'higher', got {name!r}")
    return BACKENDS[name]()
