"""``MetaFedModule``: the Lightning shell every algorithm shares.

One ``training_step`` is one communication round::

    batch (TaskBatch of m sampled clients)
      → round pipeline (lightning_metafed.round): faults → client computation → screening
        → aggregation or DP → RoundResult
      → server optimizer step          .grad = aggregate; SGD(lr=1) is plain averaging, Adam is FedAdam
      → ledgers (communication, faults, privacy) record the result; metrics are logged

Subclasses implement :meth:`client_update` (one client, pure) and, when the update is the gradient
of a per-client loss, :meth:`client_objective` (the one-backward fast path). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_metafed.aggregators import Aggregator, Mean
from lightning_metafed.algorithms import evaluation
from lightning_metafed.algorithms.arguments import as_batch, check_common_arguments, check_net, check_norm_layers, resolve_adapt_names
from lightning_metafed.algorithms.backends import make_backend
from lightning_metafed.algorithms.bookkeeping import LedgerHooks
from lightning_metafed.algorithms.setup_checks import SetupCheckHooks
from lightning_metafed.algorithms.trainer_access import (
    attached_trainer,
    count_step_without_update,
    grad_scaler,
    is_logging_step,
    round_world,
)
from lightning_metafed.compression import Compressor
from lightning_metafed.data.task_batch import TaskBatch
from lightning_metafed.faults import ClientFaults
from lightning_metafed.functional.adapt import iterate_adaptation
from lightning_metafed.functional.client_task import Aux, ClientTask, Params
from lightning_metafed.functional.losses import accuracy, cross_entropy_loss, mse_loss
from lightning_metafed.inner import SGD, InnerOptimizer
from lightning_metafed.privacy import ClientDP
from lightning_metafed.resume import ResumeCheck
from lightning_metafed.round import Aggregation, ClientComputation, ClientRunner, ClientStateStore, ResidualStore, RoundLedgers, UploadCompression
from lightning_metafed.round import NonFiniteRoundError, RoundPipeline, RoundResult, UploadScreen, server_step, write_gradients

__all__ = ["MetaFedModule", "check_norm_layers", "resolve_adapt_names"]

NET_PREFIX = "net."


class MetaFedModule(LedgerHooks, SetupCheckHooks, evaluation.EvaluationHooks, pl.LightningModule):
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
        inner_backend: ``"func"`` (``torch.func``, vectorized) or ``"higher"`` (the ``higher``
            package, clients in a loop); see ``lightning_metafed.algorithms.backends``.
        compile_clients: ``torch.compile`` the vectorized per-client training computation (2-3x
            faster per round on the sinusoid benchmark after a one-off compilation of about half a
            minute; recompiles when batch shapes change). Off by default. A string is
            ``torch.compile``'s ``mode``: ``"reduce-overhead"`` adds CUDA graphs on a GPU.
        faults: simulated dropout, heterogeneous compute and Byzantine clients
            (:class:`~lightning_metafed.faults.ClientFaults`).
        privacy: client-level differential privacy of the aggregate
            (:class:`~lightning_metafed.privacy.ClientDP`); it replaces the aggregator, which must be
            the default ``Mean``, and every client counts equally.
        reject_nonfinite: drop a client's upload that holds NaN/inf before aggregation (counted,
            logged as ``robust/rejected``); a round where every upload is non-finite still raises.
        on_nonfinite: what a round does when its aggregate is non-finite or the server step would
            leave a parameter non-finite (the parameters and the server optimizer's state are then
            restored to before the step): ``"raise"`` a ``NonFiniteRoundError`` naming the cause
            (default), or ``"skip"`` the round with a warning (counted as ``robust/nonfinite_rounds``).
        compressor: what each client uploads instead of its full-precision update
            (:mod:`lightning_metafed.compression`; the communication meter counts the encoded bytes);
            ``None`` uploads full precision. No fast path with a compressor.
    """

    #: Whether this algorithm can run its inner loop through ``higher``.
    supports_higher: bool = False
    #: Per-client loss whose gradient is the upload, or ``None`` (see :meth:`MAML.client_objective`).
    client_objective: Callable[[Mapping[str, Tensor], ClientTask], tuple[Tensor, Aux]] | None = None
    #: Per-client state store; when set, :meth:`client_update` takes and returns a state row.
    client_state: ClientStateStore | None = None

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
        compile_clients: bool | str = False,
        faults: ClientFaults | None = None,
        privacy: ClientDP | None = None,
        reject_nonfinite: bool = True,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        compressor: Compressor | None = None,
    ):
        super().__init__()
        # `net` is saved in the state dict; the optimizer callables are code, not data (the CLI config keeps them).
        self.save_hyperparameters(ignore=["net", "server_optimizer", "server_lr_scheduler"])
        self.automatic_optimization = False
        inner_optimizer = SGD(lr=0.01) if inner_optimizer is None else inner_optimizer
        aggregator = Mean() if aggregator is None else aggregator
        check_common_arguments(inner_steps, eval_inner_steps, task, client_chunk_size, inner_optimizer, aggregator, faults, privacy, compressor)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"Expected `on_nonfinite` to be 'raise' or 'skip', got {on_nonfinite!r}")
        self.backend = make_backend(inner_backend)
        self.backend.check(type(self).__name__, self.supports_higher, inner_optimizer, vectorize, faults)
        self.net = check_net(self.build_net() if net is None else net)
        self.inner_optimizer = inner_optimizer
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.task = task
        self.server_optimizer = server_optimizer
        self.server_lr_scheduler = server_lr_scheduler
        self.aggregator = aggregator
        self.fast_path = fast_path
        self.inner_backend = inner_backend
        self.faults = faults
        self.privacy = privacy
        self.reject_nonfinite = bool(reject_nonfinite)
        self.on_nonfinite = on_nonfinite
        self.compressor = compressor
        #: Error-feedback residuals by client id (with a compressor's ``error_feedback``; checkpointed).
        self.upload_residuals = ResidualStore() if compressor is not None and compressor.error_feedback else None
        vectorized = vectorize and self.backend.vectorizable
        self.runner = ClientRunner(type(self).__name__, vectorized, client_chunk_size, compile_clients, rank_zero_warn)
        self.ledgers = RoundLedgers(faults, self.reject_nonfinite, privacy)
        self.evaluator = evaluation.Evaluator()

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

    def uses_builtin_loss(self) -> bool:
        """Whether :meth:`compute_loss` is the built-in MSE / cross-entropy (then the first batch's
        targets are checked against the net's output shape)."""
        return type(self).compute_loss is MetaFedModule.compute_loss and self.uses_builtin_forward()

    def uses_builtin_forward(self) -> bool:
        """Whether :meth:`functional_loss` feeds the features to the net unchanged (then the first
        batch of each stage is probed with one forward; see ``algorithms/setup_checks.py``)."""
        return type(self).functional_loss is MetaFedModule.functional_loss

    def client_update(self, meta: Mapping[str, Tensor], task: ClientTask) -> tuple[Params, Aux]:
        """One client's upload ``{module param name: tensor}`` and detached diagnostics.

        ``meta`` maps this module's parameter names (``named_parameters()``) to tensors; ``task`` is
        one client's (unbatched) task. Must be a pure function so it can be vmapped. With a
        ``client_state`` store it takes the client's state row as a third argument and returns its
        new row as a third output.
        """
        raise NotImplementedError

    def adaptation_kwargs(self, meta: Mapping[str, Tensor]) -> dict[str, Any]:
        """Extra keyword arguments for evaluation-time adaptation (``lr``, ``adapt_names``)."""
        return {}

    def evaluation_params(self, batch: TaskBatch) -> Params | None:
        """Each evaluated client's starting parameters ``{module param name: [m, ...]}`` before its
        adaptation, or ``None``: every client starts from the meta-parameters. A module with
        per-client state returns the clients' own (their stored rows, or the initial rows of
        clients it never saw)."""
        return None

    def download_payload(self) -> Params | None:
        """What the server sends each sampled client, for accounting; ``None``: the parameters."""
        return None

    def server_aggregate(self, aggregate: Params) -> Params:
        """The part of a round's aggregate that the server optimizer applies to the parameters. A
        module with server state (e.g. a control variate uploaded beside the update) leaves its own
        entries out here and applies them in :meth:`after_server_step`."""
        return aggregate

    def after_server_step(self, aggregate: Params) -> None:
        """Called with the whole aggregate once the server step succeeded (server state updates)."""

    def local_step_bound(self) -> tuple[str, int] | None:
        """The argument and value that bound a client's local steps (``faults.step_choices`` may not
        exceed it); ``None`` when any budget is allowed."""
        return "inner_steps", self.inner_steps

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

    def map_clients(self, fn: Callable[..., Any], shared: Sequence[Any], tasks: ClientTask, chunked: bool = True, compiled: bool = False) -> Any:
        """``fn(*shared, task_i)`` for every client, outputs stacked along dim 0 (see :class:`~lightning_metafed.round.ClientRunner`)."""
        return self.runner.map(fn, shared, (tasks,), chunked=chunked, compiled=compiled)

    def adapt_client(self, meta: Mapping[str, Tensor], task: ClientTask, steps: int | None = None) -> Iterator[Params]:
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

    # ------------------------------------------------------------------------------------- the round

    def client_updates_with_aux(self, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """Per-client uploads ``{name: [m, *shape]}`` and per-client diagnostics ``{name: [m]}``."""
        computation = ClientComputation(self.client_update, self.runner, state_store=self.client_state)
        uploads = computation.uploads(self.meta_parameters(detach=True), as_batch(batch), None)  # the store is only read
        return uploads.updates, uploads.aux

    def client_updates(self, batch: TaskBatch) -> Params:
        """What each of the batch's clients uploads: ``{module param name: [m, *param.shape]}``.

        With a mean aggregator and server ``SGD(lr=1)``, a training step sets
        ``θ ← θ − mean_i(update_i)``.
        """
        return self.client_updates_with_aux(batch)[0]

    def _use_fast_path(self) -> bool:
        explicit = self.privacy is not None or self.compressor is not None or (self.faults is not None and self.faults.byzantine_fraction > 0)
        return self.fast_path and self.aggregator.is_mean and self.client_objective is not None and not explicit and self.client_state is None

    def round_pipeline(self) -> RoundPipeline:
        """The stages of this module's round (see :mod:`lightning_metafed.round.pipeline`)."""
        privacy, scaler = self.ledgers.privacy, grad_scaler(attached_trainer(self))
        computation = ClientComputation(self.client_update, self.runner, round_world(self), self.client_objective, self.client_state)
        first_rejection = self.fault_counts["rejected_uploads"] == 0
        return RoundPipeline(
            computation=computation,
            screen=UploadScreen(self.faults, self.reject_nonfinite, warn_rejections=first_rejection, warn=rank_zero_warn),
            aggregation=Aggregation(
                self.aggregator, self.privacy, None if privacy is None else privacy.seed(), None if privacy is None else privacy.clip_norm
            ),
            faults=self.faults,
            step_bound=self.local_step_bound(),
            fast_path=self._use_fast_path(),
            loss_scale=1.0 if scaler is None else float(scaler.get_scale()),
            download=self.download_payload(),
            compression=None if self.compressor is None else UploadCompression(self.compressor, self.upload_residuals),
        )

    def run_round(self, batch: TaskBatch, round_idx: int | None = None) -> RoundResult:
        """One round's result from the current meta-parameters, its random draws indexed by ``round_idx``
        (default the Trainer's ``global_step``); parameters, optimizer, ledgers and client state are
        left as they were (the owner applies the result)."""
        round_idx = self.global_step if round_idx is None else round_idx
        return self.round_pipeline().run(as_batch(batch), dict(self.named_parameters()), round_idx)

    def round_gradients(self, batch: TaskBatch) -> tuple[Params | None, dict[str, Tensor]]:
        """For loops outside a Trainer: run a round (indexed by the rounds counted so far, so each one
        draws its faults, noise and compression anew), count its communication, write the aggregate to
        ``.grad``; returns ``(aggregate, mean diagnostics)`` (``(None, {})`` when no client survived).
        The privacy accountant is not stepped here: ``Trainer.fit`` accounts for DP."""
        result = self.run_round(batch, self.ledgers.communication.totals["rounds"])
        self.ledgers.communication.record(result)
        aggregate = None if result.aggregate is None else self.server_aggregate(result.aggregate)
        write_gradients(dict(self.named_parameters()), aggregate)
        if aggregate is not None:
            self.after_server_step(result.aggregate)
        self.write_client_rows(result)
        return result.aggregate, result.diagnostics

    # ------------------------------------------------------------------------------------- lifecycle

    def configure_callbacks(self) -> list[pl.Callback]:
        """A :class:`~lightning_metafed.resume.ResumeCheck` unless the Trainer has one: a resumed fit
        whose configuration differs from its checkpoint stops and lists the differences."""
        trainer = attached_trainer(self)
        if trainer is not None and any(isinstance(c, ResumeCheck) for c in trainer.callbacks):
            return []
        return [ResumeCheck()]

    def configure_optimizers(self) -> Any:
        optimizer = self.server_optimizer(self.parameters())
        if self.server_lr_scheduler is None:
            return optimizer
        scheduler = self.server_lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """One communication round: the round pipeline → server optimizer step → ledgers.

        Logged every round: ``train/meta_loss`` (the clients' mean objective, e.g. MAML's post-adaptation
        query loss; Reptile/FedAvg: the support loss before local training); at Lightning's logging
        steps also ``train/update_norm`` (of the aggregated update), ``train/server_lr``,
        ``train/loss_{support,query}_{pre,post}`` and the ledgers' ``comm/*``, ``faults/*``,
        ``robust/*`` and ``privacy/*``.
        """
        batch = as_batch(batch)
        logging_step = is_logging_step(attached_trainer(self))
        if logging_step:  # before the update, from the same meta-parameters the clients start from
            for key, value in self.backend.round_diagnostics(self, batch).items():
                self.log(f"train/{key}", value, on_step=True, batch_size=batch.num_clients)
        optimizer, scaler = self.optimizers(), grad_scaler(self.trainer)
        result = None
        try:
            result = self.run_round(batch)
            if result.aggregate is None:
                rank_zero_info(f"Round {self.global_step}: all {batch.num_clients} sampled clients dropped out; server step skipped")
            self._server_step(optimizer, scaler, result.aggregate)
        except NonFiniteRoundError as error:
            if self.on_nonfinite == "raise":
                raise
            self._skip_nonfinite_round(error, optimizer, scaler, result)
            return None
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.ledgers.record(result)
        self.write_client_rows(result)
        self.log_round(result, batch.num_clients, logging_step, optimizer)
        meta_loss = result.diagnostics.get("query_loss", result.diagnostics.get("support_loss"))
        return meta_loss.detach() if meta_loss is not None else None

    def _server_step(self, optimizer: Any, scaler: Any, aggregate: Params | None) -> None:
        """The guarded server step (then :meth:`after_server_step`); without an aggregate under a
        gradient scaler (which cannot step without gradients), the step is only counted."""
        if aggregate is None and scaler is not None:
            count_step_without_update(optimizer)
            return
        step = None if aggregate is None else self.server_aggregate(aggregate)
        server_step(optimizer, dict(self.named_parameters()), step, None if scaler is None else scaler.scale, self.global_step)
        if aggregate is not None:
            self.after_server_step(aggregate)

    def _skip_nonfinite_round(self, error: NonFiniteRoundError, optimizer: Any, scaler: Any, result: RoundResult | None) -> None:
        """``on_nonfinite="skip"``: the parameters and the server optimizer stay as they were; the round
        still counts as a step (an empty one when the uploads failed), steps the scheduler and spends
        its privacy."""
        if error.stage == "uploads":
            self._server_step(optimizer, scaler, None)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        total = self.ledgers.record_nonfinite(result if error.stage == "server step" else None)
        rank_zero_warn(f"{error} Skipping the round (`on_nonfinite='skip'`).")
        self.log("robust/nonfinite_rounds", float(total), on_step=True, batch_size=1)
