"""Checks a module runs when a Trainer sets it up, on every process, before any round.

Each check raises a ``ValueError`` (or returns a warning text) that names the argument, the value
and what is allowed: the precision, the DDP world size against ``clients_per_round``, aggregator
arguments that make the rule a no-op for the round size, and (on the first batch of each stage)
whether the batch fits the net: feature dtype, output shape against the targets, class labels
against the number of outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_metafed.algorithms.arguments import as_batch
from lightning_metafed.algorithms.trainer_access import attached_trainer
from lightning_metafed.data.task_batch import TaskBatch

__all__ = ["BatchProbe", "SetupError", "SetupCheckHooks", "check_batch_fits_net", "check_task", "check_labels", "check_precision", "check_world_size", "degenerate_aggregator"]

class SetupError(ValueError):
    """A configuration refused at setup; every DDP process raises the same one (``every_rank``), so
    the ``metafed`` command prints it once."""

    every_rank = True


#: Precisions that would keep the meta-parameters and the server optimizer's state in half precision.
REFUSED_PRECISIONS = {
    "16-true": (
        "it keeps the meta-parameters and the server optimizer's state in float16: Adam's default eps=1e-8 "
        "rounds to 0 (the first server step divides by zero) and second-order inner loops overflow float16's range"
    ),
    "bf16-true": (
        "it keeps the meta-parameters in bfloat16, whose 8-bit mantissa rounds away server steps smaller than "
        "1/128 of a weight (an Adam step of lr=1e-3 on a weight of 1 leaves it unchanged), so training stalls silently"
    ),
}


def check_precision(precision: str) -> None:
    """Refuse the ``*-true`` half precisions (see :data:`REFUSED_PRECISIONS`); mixed ones are fine."""
    reason = REFUSED_PRECISIONS.get(str(precision))
    if reason is not None:
        raise SetupError(
            f"Expected `precision` to be one of '32-true', '64-true', '16-mixed', 'bf16-mixed', got {precision!r}: "
            f"{reason}. Use '16-mixed' or 'bf16-mixed' (half-precision compute, float32 meta-parameters and server state)."
        )


def check_task(task: str, num_classes: int | None) -> None:
    """Class labels (a data module with ``num_classes``) need ``task="classification"``."""
    if task == "regression" and num_classes is not None:
        raise SetupError(
            f"Expected task='classification' for data with class labels (the data module has num_classes={num_classes}), "
            "got task='regression', which would fit the labels as numbers with a squared error"
        )


def check_world_size(clients_per_round: int | None, world_size: int) -> None:
    """Every DDP process takes a share of a round's clients, so a round needs at least one per process."""
    if clients_per_round is not None and world_size > 1 and clients_per_round < world_size:
        raise SetupError(
            f"Expected `clients_per_round` >= the number of DDP processes ({world_size}; each takes a share of the "
            f"round's clients), got {clients_per_round}: raise `clients_per_round` or run on at most "
            f"{clients_per_round} devices"
        )


def degenerate_aggregator(aggregator: Any, clients_per_round: int | None) -> str | None:
    """The aggregator's explanation of why it is a no-op for rounds of ``clients_per_round`` (or too
    small a round for its guarantee, for the rules that assume ``num_byzantine``), or ``None``."""
    reason = getattr(aggregator, "degenerate_reason", None)
    if clients_per_round is None or reason is None:
        return None
    return reason(clients_per_round)


@dataclass(frozen=True)
class BatchProbe:
    """How :func:`check_batch_fits_net` probes a batch: ``targets`` (the built-in losses: check the
    output against the targets), ``dtype`` (check the features' dtype; off under mixed precision,
    where autocast accepts half-precision inputs), ``query_labels`` (off at predict, whose query
    targets may be placeholders) and the ``context`` the forward runs in (e.g. autocast)."""

    targets: bool = True
    dtype: bool = True
    query_labels: bool = True
    context: Callable[[], AbstractContextManager[Any]] = nullcontext


def check_batch_fits_net(net: nn.Module, batch: TaskBatch, task: str, probe: BatchProbe = BatchProbe()) -> None:
    """One forward (eval mode, no gradient) of the first client's support examples: the feature
    dtype equals the net's, and the output fits the targets (regression: one output per target
    value; classification: the real (unmasked) labels integral and in ``[0, number of outputs)``)."""
    x, y = batch.support_x[0], batch.support_y[0]
    dtypes = {p.dtype for p in net.parameters() if p.is_floating_point()}
    if probe.dtype and x.is_floating_point() and dtypes and x.dtype not in dtypes:
        raise ValueError(
            f"Expected the clients' features to have the net's dtype {sorted(map(str, dtypes))}, got {x.dtype}: "
            f"convert the data (e.g. `x.to({next(iter(dtypes))})`) or the net (`net.to(dtype)`)"
        )
    training = net.training
    try:
        with torch.no_grad(), probe.context():
            pred = net.eval()(x)
    except Exception as error:
        raise ValueError(f"The net cannot run on a client's support features (shape {tuple(x.shape)}, {x.dtype}): {error}") from error
    finally:
        net.train(training)
    if not probe.targets:
        return
    if task == "classification":
        labels = [_real(batch.support_y, batch.support_mask)]
        labels += [_real(batch.query_y, batch.query_mask)] if probe.query_labels else []
        check_labels(pred, torch.cat(labels))
    elif pred.numel() != y.numel():
        raise ValueError(
            f"Expected the net's output to hold one value per regression target: the net maps features "
            f"{tuple(x.shape)} to {tuple(pred.shape)}, but the targets have shape {tuple(y.shape)}; "
            "fix the net's output size (or use task='classification' for class labels)"
        )


def _real(y: Tensor, mask: Tensor | None) -> Tensor:
    """The targets of real examples (padding, where ``mask`` is 0, left out), flattened."""
    return (y if mask is None else y[mask.bool()]).flatten()


def check_labels(logits: Tensor, y: Tensor) -> None:
    """Classification targets: integral labels in ``[0, C)`` for ``C`` = the net's outputs."""
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise ValueError(
            f"Expected integer class labels for task='classification', got {y.dtype} targets with non-integral "
            f"values (e.g. {float(y[y != y.round()][0])}); use task='regression' for continuous targets"
        )
    classes = logits.shape[-1] if logits.dim() > 1 else 1
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        raise ValueError(
            f"Expected class labels in [0, {classes}) (the net has {classes} outputs), got labels from {low} to {high}: "
            "set the net's output size to the number of classes"
        )


class SetupCheckHooks:
    """Mixin for :class:`~lightning_metafed.MetaFedModule`: the checks above, at ``setup`` (every
    process) and on the first batch of each stage (before the first round or evaluation)."""

    net: nn.Module
    task: str
    aggregator: Any
    uses_builtin_loss: Callable[[], bool]
    uses_builtin_forward: Callable[[], bool]

    def setup(self, stage: str) -> None:
        trainer = attached_trainer(self)
        if trainer is None:
            return
        if stage == "fit":  # the refusal is about the meta-parameters and the server step
            check_precision(trainer.precision)
        clients_per_round = getattr(trainer.datamodule, "clients_per_round", None)
        builtin_loss = self.uses_builtin_loss()
        spec = getattr(trainer.datamodule, "data_spec", None)
        if stage == "fit" and builtin_loss and spec is not None:
            check_task(self.task, spec().num_classes)
        if stage == "fit":
            check_world_size(clients_per_round, trainer.world_size)
            reason = degenerate_aggregator(self.aggregator, clients_per_round)
            if reason is not None:
                rank_zero_warn(reason)
        self._batches_checked: set[str] = set()

    def _check_first_batch(self, batch: Any, stage: str) -> None:
        checked = getattr(self, "_batches_checked", None)
        if checked is None or stage in checked:
            return
        checked.add(stage)
        if not self.uses_builtin_forward():
            return  # a custom functional_loss may transform the features: no probe can stand for it
        trainer = attached_trainer(self)
        mixed = trainer is not None and str(trainer.precision).endswith("-mixed")
        probe = BatchProbe(
            targets=self.uses_builtin_loss(),
            dtype=not mixed,
            query_labels=stage != "predict",
            context=trainer.precision_plugin.forward_context if trainer is not None else nullcontext,
        )
        check_batch_fits_net(self.net, as_batch(batch), self.task, probe)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._check_first_batch(batch, "train")

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch(batch, "validation")

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch(batch, "test")

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch(batch, "predict")
