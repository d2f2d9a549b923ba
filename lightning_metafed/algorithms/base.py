"""``MetaFedModule``: the communication-round lifecycle every algorithm shares.

One ``training_step`` is one round::

    batch (TaskBatch of m sampled clients)
      → client_updates(batch)          per-client uploads {param: [m, *shape]}, vmapped over clients
      → aggregator(updates, weights)    weighted mean by default
      → server optimizer step          .grad = aggregate; SGD(lr=1) is plain averaging, Adam is FedAdam

Subclasses implement :meth:`client_update` (one client, pure) and, when the update is the gradient
of a per-client loss, :meth:`client_objective`, which enables the one-backward fast path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_metafed._validation import check_int
from lightning_metafed.aggregators import Aggregator, Mean, finite_clients
from lightning_metafed.communication import payload_bytes
from lightning_metafed.data.task_batch import TaskBatch
from lightning_metafed.faults import ClientFaults
from lightning_metafed.functional.adapt import iterate_adaptation, select_params
from lightning_metafed.functional.aggregate import normalize_weights
from lightning_metafed.functional.losses import accuracy, cross_entropy_loss, mse_loss
from lightning_metafed.functional.updates import ClientTask
from lightning_metafed.inner import SGD, InnerOptimizer
from lightning_metafed.metrics import (
    ClientRecords,
    client_statistics,
    curve_figure,
    format_summary,
    write_client_csv,
)
from lightning_metafed.privacy import ClientDP

__all__ = ["MetaFedModule", "check_norm_layers"]

Params = dict[str, Tensor]
NET_PREFIX = "net."


def check_norm_layers(net: nn.Module) -> None:
    """Reject normalization layers with running statistics.

    Their in-place running-stat updates cannot be vectorized with ``vmap`` and, in a loop, would
    silently mix the statistics of different clients.
    """
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            kind = type(module).__name__
            raise ValueError(
                f"`net` module {name!r} ({kind}) tracks running statistics (track_running_stats=True): "
                f"its in-place updates would mix the statistics of different clients and cannot be vectorized "
                f"with vmap. Use {kind}(..., track_running_stats=False), nn.GroupNorm or nn.LayerNorm instead."
            )


def _stack_outputs(outputs: Sequence[Any]) -> Any:
    flat = [tree_flatten(o) for o in outputs]
    spec = flat[0][1]
    leaves = [torch.stack(column) for column in zip(*(f[0] for f in flat))]
    return tree_unflatten(leaves, spec)


def _client(task: ClientTask, i: int) -> ClientTask:
    """Client ``i``'s task; its step budget as a Python int, so a loop runs exactly that many steps."""
    one = ClientTask(*(None if t is None else t[i] for t in task))
    return one if one.num_steps is None else one._replace(num_steps=int(one.num_steps))


class MetaFedModule(pl.LightningModule):
    """Base LightningModule: one ``training_step`` is one round of federated (meta-)learning.

    Args:
        net: the model every client adapts. ``None`` calls :meth:`build_net` (override it in a
            subclass to fix an architecture).
        inner_optimizer: the clients' differentiable inner optimizer (:mod:`lightning_metafed.inner`);
            default ``SGD(lr=0.01)``.
        inner_steps: inner steps per client during training (``>= 0``).
        eval_inner_steps: adaptation steps at validation/test/predict (default: ``inner_steps``).
        task: ``"regression"`` (MSE) or ``"classification"`` (cross-entropy; accuracy is reported).
        server_optimizer: the server optimizer, a callable ``params -> Optimizer`` (LightningCLI:
            ``class_path: torch.optim.Adam``). Its state persists across rounds and in checkpoints.
        server_lr_scheduler: optional scheduler callable, stepped once per round.
        aggregator: how client updates are combined; default ``Mean(weighted=True)``.
        vectorize: run clients with ``torch.func.vmap`` (``False``: a Python loop, same results).
        client_chunk_size: vmap at most this many clients at once (bounds memory; same results).
        fast_path: when the update is a loss gradient and the aggregator a mean, get the aggregate
            with one backward of the weighted mean loss instead of per-client gradients.
        compile_clients: ``torch.compile`` the vectorized per-client training computation (2-3x
            faster per round on the sinusoid benchmark after a one-off compilation of about half a
            minute; recompiles when batch shapes change). Off by default.
        faults: simulated dropout, heterogeneous compute and Byzantine clients
            (:class:`~lightning_metafed.faults.ClientFaults`).
        privacy: client-level differential privacy of the aggregate
            (:class:`~lightning_metafed.privacy.ClientDP`); it replaces the aggregator, which must be
            the default ``Mean``, and every client counts equally.
        reject_nonfinite: drop a client's upload that holds NaN/inf before aggregation (counted,
            logged as ``robust/rejected``); a round where every upload is non-finite still raises.
    """

    #: Whether this algorithm can run its inner loop through ``higher``.
    supports_higher: bool = False

    def __init__(
        self,
        net: nn.Module | None = None,
        inner_optimizer: InnerOptimizer | None = None,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        task: Literal["regression", "classification"] = "regression",
        server_optimizer: OptimizerCallable = torch.optim.Adam,
        server_lr_scheduler: LRSchedulerCallable | None = None,
        aggregator: Aggregator | None = None,
        vectorize: bool = True,
        client_chunk_size: int | None = None,
        fast_path: bool = True,
        inner_backend: Literal["func", "higher"] = "func",
        compile_clients: bool = False,
        faults: ClientFaults | None = None,
        privacy: ClientDP | None = None,
        reject_nonfinite: bool = True,
    ):
        super().__init__()
        # `net` is saved in the state dict; the optimizer callables are code, not data (the CLI config keeps them).
        self.save_hyperparameters(ignore=["net", "server_optimizer", "server_lr_scheduler"])
        self.automatic_optimization = False
        check_int("inner_steps", inner_steps, minimum=0)
        if eval_inner_steps is not None:
            check_int("eval_inner_steps", eval_inner_steps, minimum=0)
        if task not in ("regression", "classification"):
            raise ValueError(f"Expected `task` to be 'regression' or 'classification', got {task!r}")
        if client_chunk_size is not None:
            check_int("client_chunk_size", client_chunk_size, minimum=1)
        if inner_backend not in ("func", "higher"):
            raise ValueError(f"Expected `inner_backend` to be 'func' or 'higher', got {inner_backend!r}")
        inner_optimizer = SGD(lr=0.01) if inner_optimizer is None else inner_optimizer
        if not isinstance(inner_optimizer, InnerOptimizer):
            raise ValueError(
                "Expected `inner_optimizer` to be a lightning_metafed.inner.InnerOptimizer (SGD, Adam, "
                f"TorchOptimizer), got {type(inner_optimizer).__name__}"
            )
        if inner_backend == "higher":
            if not self.supports_higher:
                raise ValueError(
                    f"`inner_backend='higher'` is not supported by {type(self).__name__}; use inner_backend='func'"
                )
            from lightning_metafed._higher import require_higher

            require_higher()
            if vectorize:
                rank_zero_warn(
                    "inner_backend='higher' runs clients in a Python loop: higher rebinds module parameters per "
                    "client, which torch.func.vmap cannot vectorize."
                )
        elif not inner_optimizer.functional:
            raise ValueError(
                f"`inner_optimizer` {inner_optimizer!r} only works with inner_backend='higher'; "
                "with inner_backend='func' use lightning_metafed.inner.SGD or Adam"
            )
        aggregator = Mean() if aggregator is None else aggregator
        if not isinstance(aggregator, Aggregator):
            raise ValueError(
                f"Expected `aggregator` to be a lightning_metafed.aggregators.Aggregator, got {type(aggregator).__name__}"
            )
        if faults is not None and not isinstance(faults, ClientFaults):
            raise ValueError(f"Expected `faults` to be a lightning_metafed.faults.ClientFaults, got {type(faults).__name__}")
        if privacy is not None:
            if not isinstance(privacy, ClientDP):
                raise ValueError(f"Expected `privacy` to be a lightning_metafed.privacy.ClientDP, got {type(privacy).__name__}")
            if not isinstance(aggregator, Mean):
                raise ValueError(
                    f"`privacy` ({privacy!r}) aggregates by clipping, summing and adding noise, so `aggregator` must be "
                    f"the default Mean, got {aggregator!r}"
                )
        if faults is not None and faults.step_choices is not None and inner_backend == "higher":
            raise ValueError("`faults.step_choices` (per-client step budgets) needs inner_backend='func'")
        self.net = self.build_net() if net is None else net
        if not isinstance(self.net, nn.Module):
            raise ValueError(f"Expected `net` to be a torch.nn.Module, got {type(self.net).__name__}")
        check_norm_layers(self.net)
        self.inner_optimizer = inner_optimizer
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.task = task
        self.server_optimizer = server_optimizer
        self.server_lr_scheduler = server_lr_scheduler
        self.aggregator = aggregator
        self.vectorize = vectorize
        self.client_chunk_size = client_chunk_size
        self.fast_path = fast_path
        self.inner_backend = inner_backend
        self.compile_clients = bool(compile_clients)
        self.faults = faults
        self.privacy = privacy
        self.reject_nonfinite = bool(reject_nonfinite)
        #: Cumulative fault and robustness counts, saved in checkpoints.
        self.fault_counts = {"dropped_clients": 0, "byzantine_uploads": 0, "rejected_uploads": 0, "skipped_rounds": 0}
        self._round_faults: dict[str, int] = {}
        self._accountant = privacy.make_accountant() if privacy is not None else None
        self._dp_sample_rate: float | None = None if privacy is None else privacy.sample_rate
        self._dp_seed: int | None = None
        self._compiled: dict[Any, Callable[..., Any]] = {}
        self._vmap_error: str | None = None
        self.eval_records = nn.ModuleDict({"val": ClientRecords(), "test": ClientRecords()})
        self._eval_position = 0
        #: Cumulative communication (bytes), saved in checkpoints.
        self.communication = {"rounds": 0, "download_bytes": 0, "upload_bytes": 0}
        self._round_communication: dict[str, int] = {}

    # ------------------------------------------------------------------------------- extension points

    def build_net(self) -> nn.Module:
        """Build the network when none is passed; override in a subclass for a fixed architecture."""
        raise ValueError(f"Expected `net` (a torch.nn.Module) or a {type(self).__name__} subclass overriding build_net()")

    def compute_loss(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """The task loss of one client's predictions (MSE or cross-entropy); override for others."""
        if self.task == "classification":
            return cross_entropy_loss(pred, target, mask)
        return mse_loss(pred, target, mask)

    def compute_metrics(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Metrics reported at evaluation: ``loss`` (and ``acc`` for classification)."""
        metrics = {"loss": self.compute_loss(pred, target, mask)}
        if self.task == "classification":
            metrics["acc"] = accuracy(pred, target, mask)
        return metrics

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, dict[str, Tensor]]:
        """One client's upload ``{module param name: tensor}`` and detached diagnostics.

        ``meta`` maps this module's parameter names (``named_parameters()``) to tensors; ``task`` is
        one client's (unbatched) task. Must be a pure function so it can be vmapped.
        """
        raise NotImplementedError

    #: Per-client loss whose gradient is the upload, or ``None`` (see :meth:`MAML.client_objective`).
    client_objective: Callable[[Mapping[str, Tensor], ClientTask], tuple[Tensor, dict[str, Tensor]]] | None = None

    def adaptation_kwargs(self, meta: Mapping[str, Tensor]) -> dict[str, Any]:
        """Extra keyword arguments for evaluation-time adaptation (``lr``, ``adapt_names``)."""
        return {}

    # --------------------------------------------------------------------------------------- helpers

    def functional_loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
        """``loss_fn(params, x, y, mask)`` of the functional core: ``net`` evaluated with ``params``."""
        return self.compute_loss(torch.func.functional_call(self.net, dict(params), (x,)), y, mask)

    def meta_parameters(self, detach: bool = False) -> Params:
        """This module's parameters by name (``net.*`` and any learned extras such as inner LRs)."""
        return {k: (p.detach() if detach else p) for k, p in self.named_parameters()}

    @staticmethod
    def net_params(meta: Mapping[str, Tensor]) -> Params:
        """The ``net.*`` entries of ``meta``, keyed by the net's own parameter names."""
        return {k[len(NET_PREFIX) :]: v for k, v in meta.items() if k.startswith(NET_PREFIX)}

    @staticmethod
    def prefixed(params: Mapping[str, Tensor], prefix: str = NET_PREFIX) -> Params:
        return {prefix + k: v for k, v in params.items()}

    def _vectorized(self) -> bool:
        return self.vectorize and self.inner_backend == "func" and self._vmap_error is None

    def map_clients(
        self, fn: Callable[..., Any], shared: Sequence[Any], tasks: ClientTask, chunked: bool = True, compiled: bool = False
    ) -> Any:
        """``fn(*shared, task_i)`` for every client, outputs stacked along dim 0.

        Vectorized with ``torch.func.vmap`` (``randomness="different"``, chunked by
        ``client_chunk_size``) unless ``vectorize=False``. If vmap fails and the loop succeeds, the
        module warns once with vmap's error and keeps using the loop.
        """
        m = tasks.support_x.shape[0]
        vmap_error = None
        if self._vectorized():
            in_dims = (None,) * len(shared) + (ClientTask(*(None if t is None else 0 for t in tasks)),)
            chunk_size = self.client_chunk_size if chunked else None
            try:
                if compiled and self.compile_clients:
                    key = (getattr(fn, "__func__", fn), repr(in_dims), chunk_size)
                    if key not in self._compiled:
                        self._compiled[key] = torch.compile(
                            torch.func.vmap(fn, in_dims=in_dims, randomness="different", chunk_size=chunk_size)
                        )
                    return self._compiled[key](*shared, tasks)
                return torch.func.vmap(fn, in_dims=in_dims, randomness="different", chunk_size=chunk_size)(*shared, tasks)
            except Exception as err:  # noqa: BLE001 - the loop below re-raises real errors
                vmap_error = f"{type(err).__name__}: {err}"
        outputs = _stack_outputs([fn(*shared, _client(tasks, i)) for i in range(m)])
        if vmap_error is not None:
            self._vmap_error = vmap_error
            rank_zero_warn(
                f"torch.func.vmap could not vectorize {type(self).__name__}'s clients ({vmap_error.splitlines()[0]}); "
                "falling back to a per-client loop, which gives the same results more slowly."
            )
        return outputs

    def _check_batch(self, batch: Any) -> TaskBatch:
        if isinstance(batch, TaskBatch):
            return batch
        if isinstance(batch, Mapping):
            return TaskBatch(**batch)
        raise ValueError(f"Expected `batch` to be a lightning_metafed.TaskBatch (or a dict of its fields), got {type(batch).__name__}")

    # -------------------------------------------------------------------------------- client updates

    def client_updates_with_aux(self, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """Per-client uploads ``{name: [m, *shape]}`` and per-client diagnostics ``{name: [m]}``."""
        batch = self._check_batch(batch)
        return self.map_clients(self.client_update, (self.meta_parameters(detach=True),), batch.tasks(), compiled=True)

    def client_updates(self, batch: TaskBatch) -> Params:
        """What each of the batch's clients uploads: ``{module param name: [m, *param.shape]}``.

        With a mean aggregator and server ``SGD(lr=1)``, a training step sets
        ``θ ← θ − mean_i(update_i)``.
        """
        return self.client_updates_with_aux(batch)[0]

    def _use_fast_path(self) -> bool:
        explicit = self.privacy is not None or (self.faults is not None and self.faults.byzantine_fraction > 0)
        return self.fast_path and self.aggregator.is_mean and self.client_objective is not None and not explicit

    def local_step_bound(self) -> tuple[str, int] | None:
        """The argument and value that bound a client's local steps (``faults.step_choices`` may not
        exceed it); ``None`` when any budget is allowed."""
        return "inner_steps", self.inner_steps

    # ------------------------------------------------------------------------------------- lifecycle

    def configure_optimizers(self) -> Any:
        optimizer = self.server_optimizer(self.parameters())
        if self.server_lr_scheduler is None:
            return optimizer
        scheduler = self.server_lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def round_gradients(self, batch: TaskBatch) -> tuple[Params | None, dict[str, Tensor]]:
        """The aggregated pseudo-gradient of one round (written to ``.grad``) and mean diagnostics.

        The round's sampled clients first go through ``faults`` (dropouts removed, step budgets
        attached); the survivors' uploads are attacked if Byzantine, screened for NaN/inf, then
        aggregated (or privatized). Returns ``(None, {})`` when no client survived: the caller skips
        the server step.

        Under DDP each process computes a disjoint, contiguous share of the round's clients; the
        result equals one process computing all of them (weights are normalized over the whole
        round, so unequal shares stay exact). When fewer clients survive than there are processes,
        every process computes all of them.
        """
        params = dict(self.named_parameters())
        sampled = batch.num_clients
        world, _ = self._world()
        if sampled < world:
            raise ValueError(
                f"Expected `clients_per_round` >= the {world} DDP processes (each takes a share of the round's "
                f"clients), got a round of {sampled} clients"
            )
        download = payload_bytes(params)  # every sampled client receives the parameters
        survivors = self._apply_faults(batch)
        m = 0 if survivors is None else survivors.num_clients
        self._round_faults = {"dropped": sampled - m, "byzantine": 0, "rejected": 0}
        if survivors is None:
            self._count_communication(sampled, 0, download=download, upload=0)
            return None, {}
        batch = survivors
        weights = batch.weight if self.aggregator.uses_weights else None
        split = m >= world  # else every process computes every survivor
        lo, hi = self._share(m) if split else (0, m)
        gather = world > 1 and split
        aggregate = None
        if self._use_fast_path():
            aux = self._fast_path_backward(batch, weights, lo, hi, scale=world if split else 1)
            aggregate = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
            upload = download  # each client's upload is its gradient w.r.t. every parameter
            if self.reject_nonfinite and not self._all_finite(aggregate):
                # A client diverged: redo the round client by client to find and drop it.
                for p in params.values():
                    p.grad = None
                aggregate = None
            elif gather:
                aux = self._gather_clients(aux, m)
        if aggregate is None:
            updates, aux = self.client_updates_with_aux(batch[lo:hi])
            upload = payload_bytes({k: u[0] for k, u in updates.items()})
            if gather:
                updates, aux = self._gather_clients(updates, m), self._gather_clients(aux, m)
            updates, aux, weights = self._screen_uploads(updates, aux, weights, batch)
            if self.privacy is not None:
                aggregate, norms = self.privacy.aggregate(updates, sampled, self._noise_seed(), self.global_step)
                self._round_faults["clipped"] = int((norms > self.privacy.clip_norm).sum())
            else:
                aggregate = self.aggregator(updates, weights)
        self._count_communication(sampled, m, download=download, upload=upload)
        if not self._all_finite(aggregate):
            name = next(k for k, v in aggregate.items() if not torch.isfinite(v).all())
            raise FloatingPointError(
                f"Round {self.global_step}: the aggregated update of parameter {name!r} is not finite "
                "(a client's loss diverged or its data holds NaN/inf); lower the inner or server learning rate"
            )
        for name, p in params.items():
            p.grad = aggregate[name].to(p.dtype)
        return aggregate, {k: v.mean() for k, v in aux.items()}

    @staticmethod
    def _all_finite(values: Mapping[str, Tensor]) -> bool:
        return bool(torch.stack([torch.isfinite(v).all() for v in values.values()]).all())  # one sync

    def _apply_faults(self, batch: TaskBatch) -> TaskBatch | None:
        """The round's surviving clients with their step budgets (``faults``; else ``batch``);
        ``None`` when every client dropped out."""
        faults = self.faults
        if faults is None:
            return batch
        round_idx, m = self.global_step, batch.num_clients
        if faults.step_choices is not None:
            bound = self.local_step_bound()
            if bound is not None and faults.max_steps > bound[1]:
                raise ValueError(
                    f"Expected every `faults.step_choices` value <= `{bound[0]}` = {bound[1]} (the full local work), "
                    f"got {faults.step_choices}"
                )
            batch = replace(batch, num_steps=faults.num_steps(round_idx, m).to(batch.support_x.device))
        dropped = faults.dropped(round_idx, m)
        if dropped.all():
            return None
        if dropped.any():
            batch = batch[~dropped]
        return batch

    def _screen_uploads(
        self, updates: Params, aux: dict[str, Tensor], weights: Tensor | None, batch: TaskBatch
    ) -> tuple[Params, dict[str, Tensor], Tensor | None]:
        """Byzantine clients' uploads replaced by their attack; non-finite uploads dropped."""
        m = batch.num_clients
        if self.faults is not None and self.faults.byzantine_fraction > 0:
            bad = self.faults.byzantine(self.global_step, batch.client_id, m)
            self._round_faults["byzantine"] = int(bad.sum())
            updates = self.faults.attack(updates, bad, self.global_step)
        if not self.reject_nonfinite:
            return updates, aux, weights
        finite = finite_clients(updates)
        rejected = m - int(finite.sum())
        if rejected == 0:
            return updates, aux, weights
        if rejected == m:
            raise FloatingPointError(
                f"Round {self.global_step}: every one of the {m} client uploads holds NaN/inf (the clients' inner "
                "loops diverged or their data holds NaN/inf); lower the inner or server learning rate"
            )
        if self.fault_counts["rejected_uploads"] == 0:
            rank_zero_warn(
                f"Round {self.global_step}: rejected {rejected} of {m} client uploads holding NaN/inf; rejections "
                "are counted in `robust/rejected` and `robust/rejected_total`."
            )
        self._round_faults["rejected"] = rejected
        updates = {k: u[finite] for k, u in updates.items()}
        aux = {k: v[finite] for k, v in aux.items()}
        return updates, aux, None if weights is None else weights[finite.to(weights.device)]

    def _noise_seed(self) -> int:
        if self._dp_seed is None:
            self._dp_seed = self.privacy.resolve_seed()
        return self._dp_seed

    def _world(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the running Trainer (``(1, 0)`` outside one)."""
        trainer = self._trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _share(self, m: int) -> tuple[int, int]:
        """This process's contiguous share ``[lo, hi)`` of a round's ``m`` clients."""
        world, rank = self._world()
        return m * rank // world, m * (rank + 1) // world

    def _gather_clients(self, values: Mapping[str, Tensor], m: int) -> dict[str, Tensor]:
        """Every process's per-client rows, in client order: ``{name: [m, ...]}`` on every process."""
        world, _ = self._world()
        bounds = [m * r // world for r in range(world + 1)]
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        padded = {k: torch.cat([v, v.new_zeros((longest - v.shape[0], *v.shape[1:]))]) for k, v in values.items()}
        gathered = self.all_gather(padded)  # {name: [world, longest, ...]}
        return {
            k: torch.cat([g[r, : bounds[r + 1] - bounds[r]] for r in range(world)]) for k, g in gathered.items()
        }

    def _fast_path_backward(
        self, batch: TaskBatch, weights: Tensor | None, lo: int, hi: int, scale: int = 1
    ) -> dict[str, Tensor]:
        """``backward(Σ_i w_i L_i)`` over this process's clients ``[lo, hi)``: the weighted-mean
        meta-gradient into ``.grad`` (under DDP the processes' shares add up to it: ``scale`` is the
        number of processes sharing the round, undoing DDP's gradient averaging).

        With ``client_chunk_size`` the clients are processed (and back-propagated) a chunk at a
        time, so only one chunk's graph is alive at once; gradients accumulate to the same sum.
        """
        tasks, m = batch.tasks(), batch.num_clients
        world, _ = self._world()
        chunk = self.client_chunk_size or max(hi - lo, 1)
        starts = list(range(lo, hi, chunk))
        w_all = None
        aux_parts = []
        for j, start in enumerate(starts):
            stop = min(start + chunk, hi)
            part = ClientTask(*(None if t is None else t[start:stop] for t in tasks))
            losses, aux = self.map_clients(self.client_objective, (self.meta_parameters(),), part, chunked=False, compiled=True)
            if w_all is None:
                w_all = normalize_weights(weights, m, like=losses)
            loss = (w_all[start:stop] * losses).sum()
            if self._trainer is None:  # used directly, outside a Trainer
                loss.backward()
            else:
                if world > 1:
                    # DDP averages gradients over processes; the shares must add up instead. The zero
                    # term makes every parameter take part in every process's backward.
                    loss = scale * loss + 0.0 * sum(p.sum() for p in self.parameters())
                model = self.trainer.model
                last = j == len(starts) - 1
                sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:  # one gradient all-reduce per round, after the last chunk
                    self.manual_backward(loss)
            aux_parts.append(aux)
        return {k: torch.cat([a[k] for a in aux_parts]) for k in aux_parts[0]}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One communication round: client updates → aggregation → server optimizer step.

        Logged every round: ``train/meta_loss`` (the clients' mean objective, e.g. MAML's post-adaptation
        query loss; Reptile/FedAvg: the support loss before local training), ``train/update_norm`` (of
        the aggregated update) and ``train/server_lr``; at Lightning's logging steps also
        ``train/loss_{support,query}_{pre,post}`` from :meth:`round_diagnostics`.
        """
        batch = self._check_batch(batch)
        logging_step = self._logging_step()
        if logging_step:
            # Before the update, from the same meta-parameters the clients start from.
            for key, value in self.round_diagnostics(batch).items():
                self.log(f"train/{key}", value, on_step=True, batch_size=batch.num_clients)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        round_idx = self.global_step
        aggregate, aux = self.round_gradients(batch)
        if aggregate is None:
            # No survivors: no parameter has a gradient, so the optimizer leaves every parameter and
            # its state alone; the step still counts, keeping rounds and data sampling aligned.
            optimizer.zero_grad(set_to_none=True)
            rank_zero_info(f"Round {round_idx}: all {batch.num_clients} sampled clients dropped out; server step skipped")
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self._record_round(aggregate is None)
        m = batch.num_clients
        meta_loss = aux.get("query_loss", aux.get("support_loss"))
        if meta_loss is not None:
            self.log("train/meta_loss", meta_loss, on_step=True, prog_bar=True, batch_size=m)
        self.log("round", float(self.global_step), on_step=True, prog_bar=True, logger=False, batch_size=m)
        if logging_step:  # values the logger would not write on other steps: skip their cost there
            if aggregate is not None:
                norm = torch.sqrt(sum((g.double() ** 2).sum() for g in aggregate.values())).float()
                self.log("train/update_norm", norm, on_step=True, batch_size=m)
            self.log("train/server_lr", float(optimizer.param_groups[0]["lr"]), on_step=True, batch_size=m)
            for key, value in {**self._round_communication, **self._fault_metrics()}.items():
                self.log(key if "/" in key else f"comm/{key}", float(value), on_step=True, batch_size=m)
        return meta_loss.detach() if meta_loss is not None else None

    def _record_round(self, skipped: bool) -> None:
        """Add the round's fault counts to the totals; one accountant step under ``privacy``."""
        counts, last = self.fault_counts, self._round_faults
        counts["dropped_clients"] += last.get("dropped", 0)
        counts["byzantine_uploads"] += last.get("byzantine", 0)
        counts["rejected_uploads"] += last.get("rejected", 0)
        counts["skipped_rounds"] += int(skipped)
        if self._accountant is not None:
            # Every round counts, skipped ones included (conservative: skipping depends on no data).
            self._accountant.step(noise_multiplier=self.privacy.noise_multiplier, sample_rate=self._sample_rate())

    def _fault_metrics(self) -> dict[str, float]:
        """What ``faults``, rejection and ``privacy`` did: this round's counts and the totals."""
        out: dict[str, float] = {}
        last, counts = self._round_faults, self.fault_counts
        if self.faults is not None:
            out.update({
                "faults/dropped": last.get("dropped", 0),
                "faults/dropped_total": counts["dropped_clients"],
                "faults/skipped_rounds": counts["skipped_rounds"],
            })
            if self.faults.byzantine_fraction > 0:
                out.update({"faults/byzantine": last.get("byzantine", 0), "faults/byzantine_total": counts["byzantine_uploads"]})
        if self.reject_nonfinite:
            out.update({"robust/rejected": last.get("rejected", 0), "robust/rejected_total": counts["rejected_uploads"]})
        if self._accountant is not None:
            out.update({"privacy/epsilon": self.privacy_spent(), "privacy/clipped": last.get("clipped", 0)})
        return out

    def privacy_spent(self) -> float:
        """``ε`` at ``privacy.delta`` after the rounds so far (Opacus accountant); ``0`` before any."""
        if self._accountant is None:
            raise ValueError("`privacy_spent()` needs the module's `privacy` (a ClientDP)")
        if not self._accountant.history:
            return 0.0
        if self.privacy.noise_multiplier == 0:  # no noise, no privacy (the PRV accountant cannot say so itself)
            return math.inf
        return float(self._accountant.get_epsilon(delta=self.privacy.delta))

    def _sample_rate(self) -> float:
        """``q``: ``privacy.sample_rate``, else clients per round / train clients of the datamodule."""
        if self._dp_sample_rate is not None:
            return self._dp_sample_rate
        from lightning_metafed.data.datamodule import FederatedDataModule

        trainer = self._trainer
        data = getattr(trainer, "datamodule", None) if trainer is not None else None
        if not isinstance(data, FederatedDataModule):
            raise ValueError(
                "`privacy` needs the client sampling rate: pass ClientDP(sample_rate=...) or fit with a "
                f"lightning_metafed FederatedDataModule, got {type(data).__name__}"
            )
        if data.client_sampling != "uniform":
            raise ValueError(
                f"`privacy` assumes uniform client sampling; the datamodule has client_sampling={data.client_sampling!r}"
            )
        self._dp_sample_rate = data.clients_per_round / len(data.population("train"))
        return self._dp_sample_rate

    def on_fit_start(self) -> None:
        if self.privacy is not None:
            self._sample_rate()  # fail before the first round when q is unknown
            seed = self.privacy.resolve_seed()
            trainer = self._trainer
            # Every DDP process must add the same noise.
            self._dp_seed = int(trainer.strategy.broadcast(seed)) if trainer is not None else seed

    def _count_communication(self, downloads: int, uploads: int, download: int, upload: int) -> None:
        """Bytes of this round: ``downloads`` clients receive ``download`` bytes (the parameters),
        ``uploads`` clients send ``upload`` bytes (their update; dropped clients send nothing)."""
        self.communication["rounds"] += 1
        self.communication["download_bytes"] += downloads * download
        self.communication["upload_bytes"] += uploads * upload
        self._round_communication = {
            "download_bytes": downloads * download,
            "upload_bytes": uploads * upload,
            "download_bytes_per_client": download,
            "upload_bytes_per_client": upload,
            "total_download_bytes": self.communication["download_bytes"],
            "total_upload_bytes": self.communication["upload_bytes"],
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["metafed_communication"] = dict(self.communication)
        checkpoint["metafed_faults"] = dict(self.fault_counts)
        if self._accountant is not None:
            # The accountant's history only: a drawn noise seed must never be written anywhere, or
            # whoever reads the checkpoint could regenerate and subtract the noise.
            checkpoint["metafed_privacy"] = {"accountant": self._accountant.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            # Evaluating a checkpoint (e.g. test of the best one after fit) loads its weights only:
            # the run's communication, fault counts and privacy spent so far must not roll back.
            return
        self.communication = dict(checkpoint.get("metafed_communication", self.communication))
        self.fault_counts = {**self.fault_counts, **checkpoint.get("metafed_faults", {})}
        privacy = checkpoint.get("metafed_privacy")
        if privacy is not None and self._accountant is not None:
            self._accountant.load_state_dict(privacy["accountant"])

    def on_fit_end(self) -> None:
        c = self.communication
        if c["rounds"]:
            last = self._round_communication  # empty when a resumed fit had no rounds left to run
            per_client = (
                f" (per client per round: {last['download_bytes_per_client'] / 1e3:.2f} kB down, "
                f"{last['upload_bytes_per_client'] / 1e3:.2f} kB up)"
                if last
                else ""
            )
            _print(
                f"Communication over {c['rounds']} rounds: {c['download_bytes'] / 1e6:.3f} MB downloaded, "
                f"{c['upload_bytes'] / 1e6:.3f} MB uploaded{per_client}"
            )
        f = self.fault_counts
        if self.faults is not None or any(f.values()):
            _print(
                f"Faults: {f['dropped_clients']} client dropouts, {f['skipped_rounds']} rounds skipped, "
                f"{f['byzantine_uploads']} Byzantine uploads, {f['rejected_uploads']} non-finite uploads rejected"
            )
        if self._accountant is not None and self._accountant.history:
            p = self.privacy
            _print(
                f"Privacy: client-level ({self.privacy_spent():.3g}, {p.delta:g})-DP after {sum(h[-1] for h in self._accountant.history)} rounds "
                f"({p.accountant.upper()} accountant, sampling rate q={self._sample_rate():.4g}, noise multiplier "
                f"{p.noise_multiplier:g}, clip norm {p.clip_norm:g})"
            )

    def _logging_step(self) -> bool:
        trainer = self._trainer
        if trainer is None or trainer.logger is None:
            return False
        return bool(trainer._logger_connector.should_update_logs)

    def round_diagnostics(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Mean support and query losses of the batch's clients before (``pre``) and after
        (``post``) ``inner_steps`` evaluation-style adaptation on their support sets.

        No graph to the meta-parameters is built; it runs only at logging steps.
        """
        steps = self.inner_steps

        def one(meta: Mapping[str, Tensor], task: ClientTask) -> dict[str, Tensor]:
            first = last = None
            for params in self.adapt_client(meta, task, steps):
                first = params if first is None else first
                last = params
            out = {}
            for stage, params in (("pre", first), ("post", last)):
                out[f"loss_support_{stage}"] = self.functional_loss(params, task.support_x, task.support_y, task.support_mask).detach()
                out[f"loss_query_{stage}"] = self.functional_loss(params, task.query_x, task.query_y, task.query_mask).detach()
            return out

        if self.inner_backend == "higher":  # evaluation-style adaptation through higher, one client at a time
            return {}
        values = self.map_clients(one, (self.meta_parameters(detach=True),), batch.tasks())
        return {k: v.mean() for k, v in values.items()}

    # ------------------------------------------------------------------------------------ evaluation

    def adapt_client(
        self, meta: Mapping[str, Tensor], task: ClientTask, steps: int | None = None
    ) -> Iterator[Params]:
        """One client's net parameters after ``0, 1, ..., steps`` (default ``eval_inner_steps``)
        evaluation-time inner steps on its support set (no graph to the meta-parameters)."""
        for params, _ in iterate_adaptation(
            self.functional_loss,
            self.net_params(meta),
            task.support_x,
            task.support_y,
            optimizer=self.inner_optimizer,
            steps=self.eval_inner_steps if steps is None else steps,
            mask=task.support_mask,
            first_order=True,
            **self.adaptation_kwargs(meta),
        ):
            yield params

    def _eval_client(self, meta: Mapping[str, Tensor], task: ClientTask) -> dict[str, Tensor]:
        curves: dict[str, list[Tensor]] = {}
        for params in self.adapt_client(meta, task):
            pred = torch.func.functional_call(self.net, params, (task.query_x,))
            for key, value in self.compute_metrics(pred, task.query_y, task.query_mask).items():
                curves.setdefault(key, []).append(value.detach())
        return {k: torch.stack(v) for k, v in curves.items()}

    def adaptation_curves(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Query metrics of every client after ``0..eval_inner_steps`` adaptation steps: ``{metric: [m, K+1]}``.

        Adaptation starts from the meta-parameters and sees the support set only. Works under
        Lightning's inference mode (it is switched off locally for the inner loop's gradients).
        """
        batch = self._check_batch(batch)
        with torch.inference_mode(False), torch.enable_grad():
            batch = batch.map_tensors(lambda t: t.clone() if t.is_inference() else t)
            if self.inner_backend == "higher":
                from lightning_metafed._higher import higher_adaptation_curves

                return higher_adaptation_curves(self, batch)
            return self.map_clients(self._eval_client, (self.meta_parameters(detach=True),), batch.tasks())

    def _evaluate(self, batch: Any, stage: str) -> dict[str, Tensor]:
        batch = self._check_batch(batch)
        curves = self.adaptation_curves(batch)
        diverged = int((~torch.isfinite(curves["loss"])).any(dim=1).sum())
        if diverged:
            rank_zero_warn(
                f"{stage}: adaptation diverged (non-finite loss) for {diverged} of {batch.num_clients} clients within "
                f"{self.eval_inner_steps} steps; their metrics are NaN. Lower the inner learning rate or `eval_inner_steps`."
            )
        m = batch.num_clients
        device = batch.support_x.device

        def count(mask: Tensor | None, n: int) -> Tensor:
            return torch.full((m,), n, device=device) if mask is None else mask.sum(1)

        if isinstance(batch.client_id, Tensor):
            ids = batch.client_id.to(device)
        else:  # no integer ids: number clients by their position in the epoch
            ids = torch.arange(self._eval_position, self._eval_position + m, device=device)
        self._eval_position += m
        self.eval_records[stage].update(
            ids, count(batch.support_mask, batch.support_x.shape[1]), count(batch.query_mask, batch.query_x.shape[1]), curves
        )
        return {f"{stage}/{k}_{s}": c[:, i].mean() for k, c in curves.items() for s, i in (("pre", 0), ("post", -1))}

    def _start_evaluation(self, stage: str) -> None:
        self.eval_records[stage].reset()
        self._eval_position = 0

    def _summarize_evaluation(self, stage: str) -> dict[str, dict[str, Tensor]]:
        """Log adaptation curves and per-client statistics of the epoch's held-out clients.

        Logged: ``{stage}/{metric}_{pre,post}`` (means over clients), ``_post_weighted`` (weighted
        by query size), ``_post_std``, ``_post_worst10``, ``{stage}/{metric}_step{k}`` (the curve),
        ``{stage}/improved`` (fraction of clients whose loss fell); in TensorBoard also a histogram of
        per-client post metrics and the curve figure; a per-client CSV in the run's log directory.
        """
        records = self.eval_records[stage]
        if not records.rows.update_called:
            return {}
        ids, n_support, n_query, curves = records.compute()
        records.reset()
        stats = {k: client_statistics(c[:, 0], c[:, -1], n_query, k) for k, c in curves.items()}
        for metric, values in stats.items():
            for name, value in values.items():
                if name == "improved":
                    if metric == "loss":
                        self.log(f"{stage}/improved", value.float())
                    continue
                self.log(f"{stage}/{metric}_{name}", value.float(), prog_bar=name == "post")
            for k in range(curves[metric].shape[1]):
                self.log(f"{stage}/{metric}_step{k}", curves[metric][:, k].mean().float())
        trainer = self._trainer
        if trainer is not None and not trainer.sanity_checking:
            # On every rank: it is a collective under DDP. Without a logger nothing is written (not even to the cwd).
            log_dir = trainer.log_dir if trainer.loggers else None
            self._write_evaluation_artifacts(stage, log_dir, ids, n_support, n_query, curves)
            if stage == "test":
                _print(format_summary(stats, stage, len(ids)))
        return stats

    @rank_zero_only
    def _write_evaluation_artifacts(self, stage, log_dir, ids, n_support, n_query, curves) -> None:
        if log_dir is not None:
            write_client_csv(Path(log_dir) / f"{stage}_clients.csv", ids, n_support, n_query, curves)
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                for metric, curve in curves.items():
                    writer.add_histogram(f"{stage}/{metric}_post_per_client", curve[:, -1].float().cpu(), self.global_step)
                figure = curve_figure(curves, f"{stage}: held-out clients, step {self.global_step}")
                if figure is not None:
                    writer.add_figure(f"{stage}/adaptation_curve", figure, self.global_step)

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def on_validation_epoch_end(self) -> None:
        self._summarize_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._summarize_evaluation("test")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Adapt each held-out client on its support set; log query metrics ``val/{loss,acc}_{pre,post}``."""
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """As :meth:`validation_step`, logged as ``test/{loss,acc}_{pre,post}``."""
        return self._evaluate(batch, "test")

    def personalize(self, batch: TaskBatch, steps: int | None = None) -> Params:
        """Each client's adapted net parameters ``{name: [m, *shape]}`` after ``steps`` (default
        ``eval_inner_steps``) inner steps on its support set."""
        batch = self._check_batch(batch)

        def last(meta: Mapping[str, Tensor], task: ClientTask) -> Params:
            params: Params = {}
            for params in self.adapt_client(meta, task, steps):
                pass
            return {k: v.detach() for k, v in params.items()}

        with torch.inference_mode(False), torch.enable_grad():
            batch = batch.map_tensors(lambda t: t.clone() if t.is_inference() else t)
            if self.inner_backend == "higher":
                from lightning_metafed._higher import higher_personalize

                return higher_personalize(self, batch, self.eval_inner_steps if steps is None else steps)
            return self.map_clients(last, (self.meta_parameters(detach=True),), batch.tasks())

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Personalize to each client in the batch and return its query predictions ``[m, Q, ...]``."""
        batch = self._check_batch(batch)
        adapted = self.personalize(batch)
        with torch.inference_mode(False), torch.no_grad():
            return torch.stack(
                [
                    torch.func.functional_call(self.net, {k: v[i] for k, v in adapted.items()}, (batch.query_x[i].clone(),))
                    for i in range(batch.num_clients)
                ]
            )


_print = rank_zero_only(print)


def resolve_adapt_names(net: nn.Module, patterns: Sequence[str] | str | None, argument: str = "adapt_params") -> list[str] | None:
    """The net parameter names an inner loop adapts (``None``: all of them)."""
    if patterns is None:
        return None
    return select_params([n for n, _ in net.named_parameters()], patterns, argument)
