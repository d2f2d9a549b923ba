"""One communication round, server side, as a pipeline of small stages:

    sample survivors (faults) → client computation (fast path or uploads, DDP shares)
      → compression (clients encode, the server decodes) → attack injection and screening
      → aggregation or DP → RoundResult → server step

:meth:`RoundPipeline.run` reads top to bottom; each stage is a function or a small frozen object
with typed inputs and outputs. The round returns a :class:`RoundResult` value; the owner (the
Lightning module, or the Flower server) records it in its ledgers and takes the server step with
:func:`~lightning_metafed.round.server.server_step`. The Flower server runs the same :class:`UploadScreen`, :class:`Aggregation`
and :func:`server_step` on the uploads it receives.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from lightning_metafed.aggregators import Aggregator
from lightning_metafed.communication import payload_bytes
from lightning_metafed.data.task_batch import TaskBatch
from lightning_metafed.faults import ClientFaults
from lightning_metafed.functional.aggregate import finite_clients
from lightning_metafed.functional.client_task import Aux, Params
from lightning_metafed.privacy import ClientDP
from lightning_metafed.round.compression import UploadCompression
from lightning_metafed.round.computation import ClientComputation, Uploads
from lightning_metafed.round.server import NonFiniteRoundError, server_step, write_gradients

__all__ = [
    "Aggregation", "RoundCounts", "RoundPipeline", "RoundResult", "StateRows", "UploadScreen",
    "sample_survivors", "screen_and_aggregate", "server_step", "write_gradients",  # the last two from round.server
]


def python_warning(message: str) -> None:
    """The default way a stage warns (the Lightning module passes ``rank_zero_warn`` instead)."""
    warnings.warn(message, UserWarning, stacklevel=3)


@dataclass(frozen=True)
class RoundCounts:
    """How many clients a round sampled, kept, saw attack, rejected, and (under DP) clipped; under DP
    also the clip norm the next round uses (``next_clip_norm``: changed only by adaptive clipping).

    Attributes:
        sampled: the clients the round sampled.
        survivors: the sampled clients that did not drop out.
        byzantine: the survivors whose upload was replaced by an attack.
        rejected: the uploads dropped for holding NaN/inf.
        clipped: under DP, the uploads whose norm exceeded the clip norm.
        next_clip_norm: under DP, the clip norm of the next round (``None``: unchanged).
    """

    sampled: int
    survivors: int
    byzantine: int = 0
    rejected: int = 0
    clipped: int = 0
    next_clip_norm: float | None = None

    @property
    def dropped(self) -> int:
        return self.sampled - self.survivors


@dataclass(frozen=True)
class StateRows:
    """New per-client state rows ``{name: [k, ...]}`` of the clients ``client_id`` (in row order).

    Attributes:
        client_id: the ``k`` clients' ids, in row order.
        rows: their new rows, ``{name: [k, ...]}``.
    """

    client_id: Any
    rows: Params


@dataclass(frozen=True)
class RoundResult:
    """What one round produced.

    Attributes:
        aggregate: the server pseudo-gradient ``{name: tensor}``; ``None`` when no client survived
            (the server step is skipped).
        diagnostics: the means over clients of their diagnostics (e.g. ``query_loss``).
        counts: the round's client counts.
        download_bytes: what one client receives (the parameters, or the pipeline's ``download``).
        upload_bytes: what one client sends (its update); ``0`` when nobody uploaded.
        new_state: the accepted clients' new per-client state, for the owner of the store to write
            back; ``None`` without state.
        new_residuals: the accepted clients' new error-feedback residuals (compression), for the
            owner of the residual store to write back; ``None`` without error feedback.
    """

    aggregate: Params | None
    diagnostics: dict[str, Tensor]
    counts: RoundCounts
    download_bytes: int
    upload_bytes: int
    new_state: StateRows | None = None
    new_residuals: StateRows | None = None


def sample_survivors(
    batch: TaskBatch, faults: ClientFaults | None, round_idx: int, step_bound: tuple[str, int] | None
) -> TaskBatch | None:
    """The round's surviving clients with their step budgets; ``None`` when every client dropped out.

    Args:
        batch: the round's sampled clients.
        faults: the simulated dropout and heterogeneous compute (``None``: every client survives
            with no step budget).
        round_idx: the round (the faults are a pure function of it).
        step_bound: ``(argument, value)`` that a step budget may not exceed (``None``: any).
    """
    if faults is None:
        return batch
    m = batch.num_clients
    if faults.step_choices is not None:
        if step_bound is not None and faults.max_steps > step_bound[1]:
            raise ValueError(
                f"Expected every `faults.step_choices` value <= `{step_bound[0]}` = {step_bound[1]} (the full local work), "
                f"got {faults.step_choices}"
            )
        batch = replace(batch, num_steps=faults.num_steps(round_idx, m).to(batch.support_x.device))
    dropped = faults.dropped(round_idx, m)
    if dropped.all():
        return None
    return batch[~dropped] if dropped.any() else batch


@dataclass(frozen=True)
class UploadScreen:
    """Byzantine clients' uploads replaced by their attack (``faults``); non-finite uploads dropped
    (``reject_nonfinite``). A round where every upload is non-finite raises.

    ``warn_rejections``: warn (through ``warn``) when an upload is rejected; the module does so at
    the first rejection of a run only.
    """

    faults: ClientFaults | None = None
    reject_nonfinite: bool = True
    warn_rejections: bool = True
    warn: Callable[[str], None] = python_warning

    def __call__(self, uploads: Uploads, round_idx: int, counts: RoundCounts) -> tuple[Uploads, RoundCounts]:
        m = uploads.num_clients
        if self.faults is not None and self.faults.byzantine_fraction > 0:
            bad = self.faults.byzantine(round_idx, uploads.client_id, m)
            counts = replace(counts, byzantine=int(bad.sum()))
            uploads = replace(uploads, updates=self.faults.attack(uploads.updates, bad, round_idx))
        if not self.reject_nonfinite:
            return uploads, counts
        finite = finite_clients(uploads.updates)
        rejected = m - int(finite.sum())
        if rejected == 0:
            return uploads, counts
        if rejected == m:
            raise NonFiniteRoundError(
                f"Round {round_idx}: every one of the {m} client uploads holds NaN/inf (the clients' inner "
                "loops diverged or their data holds NaN/inf); lower the inner or server learning rate",
                stage="uploads",
            )
        if self.warn_rejections:
            self.warn(
                f"Round {round_idx}: rejected {rejected} of {m} client uploads holding NaN/inf; rejections "
                "are counted in `robust/rejected` and `robust/rejected_total`."
            )
        return uploads.keep(finite), replace(counts, rejected=rejected)


@dataclass(frozen=True)
class Aggregation:
    """The screened uploads combined: the ``aggregator``, or client-level DP (``privacy``, with
    the fit's ``noise_seed`` and this round's ``clip_norm``, default the configured one), which
    divides by the number of *sampled* clients and sets the next round's clip norm in the counts."""

    aggregator: Aggregator
    privacy: ClientDP | None = None
    noise_seed: int | None = None
    clip_norm: float | None = None

    def __call__(self, uploads: Uploads, round_idx: int, counts: RoundCounts) -> tuple[Params, RoundCounts]:
        if self.privacy is None:
            weights = uploads.weights if self.aggregator.uses_weights else None
            return self.aggregator(uploads.updates, weights), counts
        dp, clip = self.privacy, self.privacy.clip_norm if self.clip_norm is None else self.clip_norm
        aggregate, norms = dp.aggregate(uploads.updates, counts.sampled, self.noise_seed, round_idx, clip)
        clipped = int((norms > clip).sum())
        unclipped = uploads.num_clients - clipped
        following = dp.next_clip_norm(clip, unclipped, uploads.num_clients, counts.sampled, self.noise_seed, round_idx)
        return aggregate, replace(counts, clipped=clipped, next_clip_norm=following)


def all_finite(values: Mapping[str, Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(v).all() for v in values.values()]).all())  # one sync


def check_finite_aggregate(aggregate: Mapping[str, Tensor], round_idx: int, finite: bool | None = None) -> None:
    """Raise before a non-finite aggregate can reach the parameters (``finite``: already checked)."""
    if not (all_finite(aggregate) if finite is None else finite):
        name = next(k for k, v in aggregate.items() if not torch.isfinite(v).all())
        raise NonFiniteRoundError(
            f"Round {round_idx}: the aggregated update of parameter {name!r} is not finite "
            "(a client's loss diverged or its data holds NaN/inf); lower the inner or server learning rate",
            stage="uploads",
        )


def screen_and_aggregate(
    uploads: Uploads, screen: UploadScreen, aggregation: Aggregation, round_idx: int, counts: RoundCounts
) -> tuple[Params, Uploads, RoundCounts]:
    """The server's side of the uploads: screening, then aggregation, then the finiteness check.
    Returns the aggregate, the accepted uploads and the updated counts.

    Args:
        uploads: the surviving clients' uploads.
        screen: the attack injection and non-finite screening stage.
        aggregation: the aggregator or client-level DP stage.
        round_idx: the round.
        counts: the round's client counts so far.
    """
    uploads, counts = screen(uploads, round_idx, counts)
    aggregate, counts = aggregation(uploads, round_idx, counts)
    check_finite_aggregate(aggregate, round_idx)
    return aggregate, uploads, counts


@dataclass(frozen=True)
class RoundPipeline:
    """The stages of one round.

    Attributes:
        computation: the client computation (every survivor's upload, or the fast path's mean).
        screen: the attack injection and non-finite screening of the uploads.
        aggregation: the aggregator, or client-level DP.
        faults: the simulated dropout and heterogeneous compute (``None``: none).
        step_bound: ``(argument, value)`` that a client's step budget may not exceed (``None``: any).
        fast_path: use the computation's mean gradient when the aggregate is a plain (weighted)
            mean of loss gradients (no attack, DP or state in the way).
        loss_scale: a mixed-precision loss scale for the fast path's backward.
        download: what each sampled client receives, when not all the parameters (only its size is
            used, for accounting).
        compression: the clients encode their uploads and the server decodes them (no fast path).
    """

    computation: ClientComputation
    screen: UploadScreen
    aggregation: Aggregation
    faults: ClientFaults | None = None
    step_bound: tuple[str, int] | None = None
    fast_path: bool = False
    loss_scale: float = 1.0
    download: Params | None = None
    compression: UploadCompression | None = None

    def run(self, batch: TaskBatch, params: Mapping[str, Tensor], round_idx: int) -> RoundResult:
        """Round ``round_idx`` on the sampled clients of ``batch``, from the server's ``params``.

        The stages in order: the surviving clients (faults), the client computation (the fast path's
        mean gradient, or every survivor's upload), compression, screening and aggregation (or DP).
        The server step is the caller's, with the returned :class:`RoundResult`'s aggregate.
        """
        sampled = batch.num_clients
        self.computation.world.check_round(sampled)
        download = payload_bytes(params if self.download is None else self.download)  # every sampled client receives it
        survivors = sample_survivors(batch, self.faults, round_idx, self.step_bound)
        counts = RoundCounts(sampled=sampled, survivors=0 if survivors is None else survivors.num_clients)
        if survivors is None:
            return RoundResult(None, {}, counts, download, 0)
        weights = survivors.weight if self.aggregation.aggregator.uses_weights else None
        if self.fast_path and self.compression is None:
            aggregate, aux = self.computation.mean_gradient(params, survivors, weights, self.loss_scale)
            finite = all_finite(aggregate)
            if finite or not self.screen.reject_nonfinite:
                check_finite_aggregate(aggregate, round_idx, finite)
                return RoundResult(aggregate, _means(aux), counts, download, download)
            # A client diverged: compute the uploads one by one to find and drop it.
        meta = {k: p.detach() for k, p in params.items()}
        uploads = self.computation.uploads(meta, survivors, weights)
        if self.compression is not None:
            uploads = self.compression(uploads, round_idx)
        aggregate, uploads, counts = screen_and_aggregate(uploads, self.screen, self.aggregation, round_idx, counts)
        state = None if uploads.state is None else StateRows(uploads.client_id, uploads.state)
        residuals = None if uploads.residual is None else StateRows(uploads.client_id, uploads.residual)
        return RoundResult(aggregate, _means(uploads.aux), counts, download, uploads.bytes_per_client, state, residuals)


def _means(aux: Aux) -> dict[str, Tensor]:
    return {k: v.mean() for k, v in aux.items()}
