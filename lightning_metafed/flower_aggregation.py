"""The server side of the Flower protocol in the clear: what the server does with the clients'
replies to a round's train message.

:func:`replies_to_uploads` turns the replies into the round's :class:`~lightning_metafed.round.Uploads`
(decoded with the module's ``compressor``); :func:`server_update` runs on them the same screen,
aggregation (or client-level DP: clip, sum, noise) and guarded server step as a Lightning round
(:mod:`lightning_metafed.round.pipeline`), with the optimizer of :func:`server_optimizer`, whose
state lives on the server across rounds. Under the module's ``privacy`` the server keeps a
:class:`~lightning_metafed.round.PrivacyLedger` (:func:`server_ledger`) and prints only its
:func:`public_privacy_metrics`. :func:`check_flower_module` refuses a module whose clients need server
state beside the parameters, which the messages do not carry.

Every name here is re-exported by :mod:`lightning_metafed.flower` (the messages and the client side),
its public path. The ServerApp's loop is :func:`lightning_metafed.flower_server.run_server`; under
secure aggregation the server sees only the sum (:mod:`lightning_metafed.flower_secure`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lightning_metafed.communication import payload_bytes
from lightning_metafed.flower_compression import decode_arrays
from lightning_metafed.round import (
    Aggregation,
    PrivacyLedger,
    RoundCounts,
    RoundResult,
    Uploads,
    UploadScreen,
    screen_and_aggregate,
    server_step,
)

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import RecordDict

    from lightning_metafed.algorithms.base import MetaFedModule

__all__ = [
    "check_flower_module",
    "public_privacy_metrics",
    "replies_to_uploads",
    "server_ledger",
    "server_optimizer",
    "server_update",
]


def server_optimizer(model: MetaFedModule) -> torch.optim.Optimizer:
    """The module's server optimizer (its state lives on the server across rounds).

    Args:
        model: the server's module, built from the run's config.
    """
    configured = model.configure_optimizers()
    return configured["optimizer"] if isinstance(configured, dict) else configured


def replies_to_uploads(replies: Sequence[RecordDict], model: MetaFedModule | None = None) -> tuple[Uploads, list[RecordDict]]:
    """The clients' updates (in partition order) as the round's :class:`~lightning_metafed.round.Uploads`,
    decoded with ``model``'s ``compressor`` when it has one (the upload size is the encoded one).

    Args:
        replies: the clients' replies to the round's train message.
        model: the server's module, whose ``compressor`` decodes the updates (``None``: no decoding).
    """
    replies = sorted(replies, key=lambda r: int(r["metrics"]["partition"]))
    states = [r["arrays"].to_torch_state_dict() for r in replies]
    upload = payload_bytes(states[0])
    if model is not None and model.compressor is not None:
        states = [decode_arrays(model.compressor, s, dict(model.named_parameters())) for s in states]
    updates = {name: torch.stack([s[name] for s in states]) for name in states[0]}
    weights = torch.tensor([float(r["metrics"]["weight"]) for r in replies])
    partitions = [int(r["metrics"]["partition"]) for r in replies]
    return Uploads(updates, {}, weights, partitions, upload), replies


def check_flower_module(model: MetaFedModule) -> None:
    """Refuse a module whose clients need server state beside the parameters (e.g. SCAFFOLD).

    Args:
        model: the module to check.
    """
    if model.download_payload() is not None and set(model.download_payload()) - set(dict(model.named_parameters())):
        raise ValueError(
            f"{type(model).__name__} sends clients server state beside the parameters (e.g. SCAFFOLD's control "
            "variate), which the Flower messages do not carry; run it with `metafed fit`."
        )


def server_ledger(model: MetaFedModule, num_nodes: int) -> PrivacyLedger | None:
    """The server's :class:`~lightning_metafed.round.PrivacyLedger` under ``privacy`` (else ``None``),
    with its noise seed drawn and sampling rate 1: every one of the ``num_nodes`` SuperNodes trains
    every round, so there is no sampling to amplify privacy, and a ``ClientDP(sample_rate=...)``
    below 1 (e.g. from a config written for ``metafed fit``) is refused. A fixed ``ClientDP(seed=...)``
    is known to every client that loads the same config, which could regenerate the noise: warned.

    Args:
        model: the server's module, built from the run's config.
        num_nodes: the number of SuperNodes (every one trains every round).
    """
    if model.privacy is None:
        return None
    rate = model.privacy.sample_rate
    if rate is not None and rate != 1:
        raise ValueError(
            f"Expected `privacy.sample_rate` to be None or 1 on Flower (every SuperNode trains every round, so no "
            f"client sampling amplifies privacy), got {rate!r}; remove `sample_rate` from the config"
        )
    model.privacy.sum_noise_multiplier(num_nodes)  # adaptive clipping: the count's noise must leave noise for the sum
    if model.privacy.seed is not None:
        warnings.warn(
            f"`privacy.seed` = {model.privacy.seed} is fixed: every client loads the same config and could regenerate "
            "the server's noise and subtract it. Use seed: null (a fresh seed per run) outside experiments.",
            UserWarning,
            stacklevel=2,
        )
    ledger = PrivacyLedger(model.privacy)
    ledger.sample_rate = 1.0
    ledger.resolve_noise_seed()
    return ledger


def public_privacy_metrics(ledger: PrivacyLedger) -> dict[str, float]:
    """The ledger's metrics a deployment prints: ``privacy/epsilon`` and the clip norm, not the exact
    count of clipped clients (a statistic of the clients' updates that no noise covers).

    Args:
        ledger: the server's privacy ledger.
    """
    return {k: v for k, v in ledger.metrics().items() if k != "privacy/clipped"}


def server_update(
    model: MetaFedModule,
    optimizer: torch.optim.Optimizer,
    replies: Sequence[RecordDict],
    round_idx: int = 0,
    ledger: PrivacyLedger | None = None,
    sampled: int | None = None,
) -> dict[str, float]:
    """Aggregate the clients' updates (in partition order) with the module's aggregator and take
    a server-optimizer step; returns the mean of the accepted clients' metrics (and, under
    ``privacy``, the ledger's ``privacy/*`` metrics).

    The same server-side stages as a Lightning round (:mod:`lightning_metafed.round.pipeline`):
    non-finite updates are screened out (``reject_nonfinite``), the aggregator combines the rest (or,
    under ``privacy``, :class:`~lightning_metafed.round.Aggregation` clips them to the ledger's clip
    norm, sums them, adds the noise of ``ledger``'s seed and divides by ``sampled``, the clients
    messaged this round, default the replies), a non-finite aggregate raises, and
    :func:`~lightning_metafed.round.server_step` applies it; ``ledger`` records the round. The
    module's simulated ``faults`` do not apply (a deployment has real ones).

    Args:
        model: the server's module, built from the run's config.
        optimizer: the server optimizer (:func:`server_optimizer`), whose state persists across rounds.
        replies: the clients' replies to the round's train message.
        round_idx: the round.
        ledger: the server's privacy ledger under ``privacy`` (:func:`server_ledger`); ``None`` otherwise.
        sampled: the clients messaged this round, the DP denominator (``None``: the number of replies).
    """
    check_flower_module(model)
    if model.privacy is not None and ledger is None:
        raise ValueError(
            f"`privacy` ({model.privacy!r}) needs the server's privacy ledger: pass "
            "`ledger=server_ledger(model, num_nodes)`, got ledger=None"
        )
    uploads, replies = replies_to_uploads(replies, model)
    counts = RoundCounts(sampled=len(replies) if sampled is None else sampled, survivors=len(replies))
    screen = UploadScreen(faults=None, reject_nonfinite=model.reject_nonfinite)
    aggregation = Aggregation(model.aggregator)
    if ledger is not None:
        aggregation = Aggregation(model.aggregator, model.privacy, ledger.seed(), ledger.clip_norm)
    aggregate, uploads, counts = screen_and_aggregate(uploads, screen, aggregation, round_idx, counts)
    server_step(optimizer, dict(model.named_parameters()), aggregate)
    accepted = set(uploads.client_id)
    replies = [r for r in replies if int(r["metrics"]["partition"]) in accepted]  # rejected clients' metrics are left out
    keys = [k for k in replies[0]["metrics"] if k not in ("partition", "weight")]
    metrics = {k: sum(float(r["metrics"][k]) for r in replies) / len(replies) for k in keys}
    if ledger is not None:
        ledger.record(RoundResult(aggregate, {}, counts, 0, uploads.bytes_per_client))
        metrics.update(public_privacy_metrics(ledger))
    return metrics
