"""Evaluation of personalization: adapt each held-out client on its support set, score its query set.

:func:`adaptation_curves`, :func:`personalize` and :func:`predict` work on any module (inside or
outside a Trainer, under Lightning's inference mode too: gradients are switched back on locally
for the inner loop). :class:`Evaluator` collects one row per client over a validation/test epoch
and, at its end, logs the summary statistics and writes the per-client CSV, the TensorBoard
histogram and the adaptation-curve figure. The module's Lightning hooks only delegate here.

Clients whose adaptation diverges (NaN or infinite metrics) keep their non-finite values in the
logged statistics; the epoch warns once, and the artifacts are written from what is finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from lightning_metafed.algorithms.arguments import as_batch
from lightning_metafed.data.task_batch import TaskBatch
from lightning_metafed.functional.client_task import Params
from lightning_metafed.metrics import (
    ClientRecords,
    client_statistics,
    curve_figure,
    divergence,
    format_summary,
    write_client_csv,
)

if TYPE_CHECKING:  # pragma: no cover
    from lightning_metafed.algorithms.base import MetaFedModule

__all__ = ["EvaluationHooks", "Evaluator", "adaptation_curves", "divergence_message", "personalize", "predict"]


def _with_grad(batch: TaskBatch) -> TaskBatch:
    """``batch`` with tensors made outside inference mode cloned, so the inner loop can use them."""
    return batch.map_tensors(lambda t: t.clone() if t.is_inference() else t)


def adaptation_curves(module: MetaFedModule, batch: TaskBatch) -> dict[str, Tensor]:
    """Query metrics of every client after ``0..eval_inner_steps`` adaptation steps: ``{metric: [m, K+1]}``."""
    with torch.inference_mode(False), torch.enable_grad():
        return module.backend.adaptation_curves(module, _with_grad(batch))


def personalize(module: MetaFedModule, batch: TaskBatch, steps: int | None = None) -> Params:
    """Each client's adapted net parameters ``{name: [m, *shape]}`` after ``steps`` steps."""
    with torch.inference_mode(False), torch.enable_grad():
        return module.backend.personalize(module, _with_grad(batch), module.eval_inner_steps if steps is None else steps)


def predict(module: MetaFedModule, batch: TaskBatch) -> Tensor:
    """Each client's query predictions ``[m, Q, ...]`` after personalization."""
    adapted = personalize(module, batch)
    with torch.inference_mode(False), torch.no_grad():
        return torch.stack(
            [
                torch.func.functional_call(module.net, {k: v[i] for k, v in adapted.items()}, (batch.query_x[i].clone(),))
                for i in range(batch.num_clients)
            ]
        )


def _sizes(mask: Tensor | None, m: int, n: int, device: torch.device) -> Tensor:
    return torch.full((m,), n, device=device) if mask is None else mask.sum(1)


class Evaluator(nn.Module):
    """Per-client evaluation rows of the current validation/test epoch and their summary."""

    def __init__(self) -> None:
        super().__init__()
        self.records = nn.ModuleDict({"val": ClientRecords(), "test": ClientRecords()})
        self.position = 0

    def start(self, stage: str) -> None:
        self.records[stage].reset()
        self.position = 0

    def step(self, module: MetaFedModule, batch: TaskBatch, stage: str) -> dict[str, Tensor]:
        """Adapt and score the batch's clients; record their rows; the batch means ``{stage}/{metric}_{pre,post}``."""
        curves = adaptation_curves(module, batch)
        m, device = batch.num_clients, batch.support_x.device
        if isinstance(batch.client_id, Tensor):
            ids = batch.client_id.to(device)
        else:  # no integer ids: number clients by their position in the epoch
            ids = torch.arange(self.position, self.position + m, device=device)
        self.position += m
        n_support = _sizes(batch.support_mask, m, batch.support_x.shape[1], device)
        n_query = _sizes(batch.query_mask, m, batch.query_x.shape[1], device)
        self.records[stage].update(ids, n_support, n_query, curves)
        return {f"{stage}/{k}_{s}": c[:, i].mean() for k, c in curves.items() for s, i in (("pre", 0), ("post", -1))}

    def summarize(self, module: MetaFedModule, stage: str) -> dict[str, dict[str, Tensor]]:
        """Log adaptation curves and per-client statistics of the epoch's held-out clients.

        Logged: ``{stage}/{metric}_{pre,post}`` (means over clients), ``_post_weighted`` (weighted
        by query size), ``_post_std``, ``_post_worst10``, ``{stage}/{metric}_step{k}`` (the curve),
        ``{stage}/improved`` (fraction of clients whose loss fell), ``{stage}/diverged`` (fraction of
        clients with a non-finite metric); in TensorBoard also a histogram of per-client post metrics
        and the curve figure; a per-client CSV in the run's log directory. When clients diverged, one
        warning (:func:`divergence_message`) says how many and from which adaptation step.
        """
        records = self.records[stage]
        if not records.rows.update_called:
            return {}
        ids, n_support, n_query, curves = records.compute()
        records.reset()
        stats = {k: client_statistics(c[:, 0], c[:, -1], n_query, k) for k, c in curves.items()}
        diverged, first_step = divergence(curves)
        if first_step is not None:
            steps = next(iter(curves.values())).shape[1] - 1
            rank_zero_warn(divergence_message(stage, int(diverged.sum()), len(ids), first_step, steps))
        module.log(f"{stage}/diverged", diverged.float().mean())
        for metric, values in stats.items():
            for name, value in values.items():
                if name != "improved":
                    module.log(f"{stage}/{metric}_{name}", value.float(), prog_bar=name == "post")
                elif metric == "loss":
                    module.log(f"{stage}/improved", value.float())
            for k in range(curves[metric].shape[1]):
                module.log(f"{stage}/{metric}_step{k}", curves[metric][:, k].mean().float())
        trainer = module.trainer
        if not trainer.sanity_checking:
            # On every rank: it is a collective under DDP. Without a logger nothing is written (not even to the cwd).
            log_dir = trainer.log_dir if trainer.loggers else None
            write_artifacts(trainer.loggers, module.global_step, stage, log_dir, (ids, n_support, n_query, curves))
            if stage == "test":
                rank_zero_info(format_summary(stats, stage, len(ids), int(diverged.sum())))
        return stats


def divergence_message(stage: str, diverged: int, total: int, first_step: int, steps: int) -> str:
    """The warning for an evaluation epoch in which ``diverged`` of ``total`` held-out clients got a
    non-finite metric, the first of them at adaptation step ``first_step`` of ``steps``."""
    if first_step == 0:
        cause = (
            "before any adaptation step: the meta-parameters or these clients' data are already non-finite "
            "(or so large that the query loss overflows)"
        )
    else:
        cause = (
            f"at adaptation step {first_step} of {steps}: the inner learning rate or `eval_inner_steps` is likely too "
            "large for these clients; lower either"
        )
    return (
        f"{stage}: adaptation diverged (non-finite metrics) for {diverged} of {total} clients, first {cause}. Their "
        f"NaN/inf values are kept in the logged statistics (e.g. `{stage}/loss_post`) and the per-client CSV, and left "
        "out of the histogram and the curve figure."
    )


@rank_zero_only
def write_artifacts(loggers: list[Any], step: int, stage: str, log_dir: str | None, rows: tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]) -> None:
    """The per-client CSV in ``log_dir``; per-client histograms (of the finite values; none when no
    value is finite) and the curve figure in TensorBoard."""
    ids, n_support, n_query, curves = rows
    if log_dir is not None:
        write_client_csv(Path(log_dir) / f"{stage}_clients.csv", ids, n_support, n_query, curves)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            for metric, curve in curves.items():
                post = curve[:, -1].float().cpu()
                if bool(torch.isfinite(post).any()):  # TensorBoard rejects a histogram of no finite value
                    writer.add_histogram(f"{stage}/{metric}_post_per_client", post[torch.isfinite(post)], step)
            figure = curve_figure(curves, f"{stage}: held-out clients, step {step}")
            if figure is not None:
                writer.add_figure(f"{stage}/adaptation_curve", figure, step)


class EvaluationHooks:
    """Mixin for :class:`~lightning_metafed.MetaFedModule`: its evaluation API and Lightning hooks,
    each delegating to this module's functions and its ``evaluator``."""

    evaluator: Evaluator

    def adaptation_curves(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Query metrics of every client after ``0..eval_inner_steps`` adaptation steps: ``{metric: [m, K+1]}``.

        Adaptation starts from the meta-parameters and sees the support set only. Works under
        Lightning's inference mode (it is switched off locally for the inner loop's gradients).
        """
        return adaptation_curves(self, as_batch(batch))

    def personalize(self, batch: TaskBatch, steps: int | None = None) -> Params:
        """Each client's adapted net parameters ``{name: [m, *shape]}`` after ``steps`` (default
        ``eval_inner_steps``) inner steps on its support set."""
        return personalize(self, as_batch(batch), steps)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Adapt each held-out client on its support set; log query metrics ``val/{loss,acc}_{pre,post}``."""
        return self.evaluator.step(self, as_batch(batch), "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """As :meth:`validation_step`, logged as ``test/{loss,acc}_{pre,post}``."""
        return self.evaluator.step(self, as_batch(batch), "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Personalize to each client in the batch and return its query predictions ``[m, Q, ...]``."""
        return predict(self, as_batch(batch))

    def on_validation_epoch_start(self) -> None:
        self.evaluator.start("val")

    def on_test_epoch_start(self) -> None:
        self.evaluator.start("test")

    def on_validation_epoch_end(self) -> None:
        self.evaluator.summarize(self, "val")

    def on_test_epoch_end(self) -> None:
        self.evaluator.summarize(self, "test")
