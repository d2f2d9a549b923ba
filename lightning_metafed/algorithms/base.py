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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_metafed._validation import check_int
from lightning_metafed.aggregators import Aggregator, Mean
from lightning_metafed.communication import payload_bytes
from lightning_metafed.data.task_batch import TaskBatch
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
    return ClientTask(*(None if t is None else t[i] for t in task))


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
        return self.fast_path and self.aggregator.is_mean and self.client_objective is not None

    # ------------------------------------------------------------------------------------- lifecycle

    def configure_optimizers(self) -> Any:
        optimizer = self.server_optimizer(self.parameters())
        if self.server_lr_scheduler is None:
            return optimizer
        scheduler = self.server_lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def round_gradients(self, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """The aggregated pseudo-gradient of one round (written to ``.grad``) and mean diagnostics.

        Under DDP each process computes a disjoint, contiguous share of the round's clients; the
        result equals one process computing all of them (weights are normalized over the whole
        round, so unequal shares stay exact).
        """
        weights = batch.weight if self.aggregator.uses_weights else None
        params = dict(self.named_parameters())
        m = batch.num_clients
        world, _ = self._world()
        if m < world:
            raise ValueError(
                f"Expected `clients_per_round` >= the {world} DDP processes (each takes a share of the round's "
                f"clients), got a round of {m} clients"
            )
        lo, hi = self._share(m)
        if self._use_fast_path():
            aux = self._fast_path_backward(batch, weights, lo, hi)
            aggregate = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
            upload = payload_bytes(params)  # each client's upload is its gradient w.r.t. every parameter
        else:
            updates, aux = self.client_updates_with_aux(batch[lo:hi])
            upload = payload_bytes({k: u[0] for k, u in updates.items()})
            if world > 1:
                updates = self._gather_clients(updates, m)
            aggregate = self.aggregator(updates, weights)
        if world > 1:
            aux = self._gather_clients(aux, m)
        self._count_communication(m, download=payload_bytes(params), upload=upload)
        if not bool(torch.stack([torch.isfinite(v).all() for v in aggregate.values()]).all()):  # one sync per round
            name = next(k for k, v in aggregate.items() if not torch.isfinite(v).all())
            raise FloatingPointError(
                f"Round {self.global_step}: the aggregated update of parameter {name!r} is not finite "
                "(a client's loss diverged or its data holds NaN/inf); lower the inner or server learning rate"
            )
        for name, p in params.items():
            p.grad = aggregate[name].to(p.dtype)
        return aggregate, {k: v.mean() for k, v in aux.items()}

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

    def _fast_path_backward(self, batch: TaskBatch, weights: Tensor | None, lo: int, hi: int) -> dict[str, Tensor]:
        """``backward(Σ_i w_i L_i)`` over this process's clients ``[lo, hi)``: the weighted-mean
        meta-gradient into ``.grad`` (under DDP the processes' shares add up to it).

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
                    loss = world * loss + 0.0 * sum(p.sum() for p in self.parameters())
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
        aggregate, aux = self.round_gradients(batch)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        m = batch.num_clients
        meta_loss = aux.get("query_loss", aux.get("support_loss"))
        if meta_loss is not None:
            self.log("train/meta_loss", meta_loss, on_step=True, prog_bar=True, batch_size=m)
        self.log("round", float(self.global_step), on_step=True, prog_bar=True, logger=False, batch_size=m)
        if logging_step:  # values the logger would not write on other steps: skip their cost there
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in aggregate.values())).float()
            self.log("train/update_norm", norm, on_step=True, batch_size=m)
            self.log("train/server_lr", float(optimizer.param_groups[0]["lr"]), on_step=True, batch_size=m)
            for key, value in self._round_communication.items():
                self.log(f"comm/{key}", float(value), on_step=True, batch_size=m)
        return meta_loss.detach() if meta_loss is not None else None

    def _count_communication(self, clients: int, download: int, upload: int) -> None:
        """Bytes of this round: ``download`` (parameters) and ``upload`` (update) per client."""
        self.communication["rounds"] += 1
        self.communication["download_bytes"] += clients * download
        self.communication["upload_bytes"] += clients * upload
        self._round_communication = {
            "download_bytes": clients * download,
            "upload_bytes": clients * upload,
            "download_bytes_per_client": download,
            "upload_bytes_per_client": upload,
            "total_download_bytes": self.communication["download_bytes"],
            "total_upload_bytes": self.communication["upload_bytes"],
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["metafed_communication"] = dict(self.communication)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.communication = dict(checkpoint.get("metafed_communication", self.communication))

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
            log_dir = trainer.log_dir  # on every rank: it is a collective under DDP
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
