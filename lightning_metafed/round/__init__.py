"""The server side of one round, without Lightning: shared by the Lightning module and Flower.

- :mod:`~lightning_metafed.round.pipeline`: the stages (faults → client computation → compression →
  screening → aggregation or DP) and the :class:`RoundResult` a round returns.
- :mod:`~lightning_metafed.round.server`: :func:`server_step`, which never leaves a NaN/inf in the parameters.
- :mod:`~lightning_metafed.round.computation`: the clients' uploads, or the fast path's mean gradient.
- :mod:`~lightning_metafed.round.compression`: encoded uploads, decoded by the server; error-feedback residuals.
- :mod:`~lightning_metafed.round.clients`: vmap / loop / chunks / compile over clients; DDP shares.
- :mod:`~lightning_metafed.round.ledgers`: communication, fault and privacy bookkeeping (checkpointed).
- :mod:`~lightning_metafed.round.state`: the per-client state seam; :mod:`~lightning_metafed.round.spill`:
  a store whose resident memory is bounded (rows spill to a scratch file).
"""

from lightning_metafed.round.clients import ClientRunner, World
from lightning_metafed.round.compression import ResidualStore, UploadCompression, compress_uploads
from lightning_metafed.round.computation import ClientComputation, Uploads
from lightning_metafed.round.ledgers import CommunicationMeter, FaultLedger, PrivacyLedger, RoundLedgers
from lightning_metafed.round.pipeline import (
    Aggregation,
    RoundCounts,
    RoundPipeline,
    RoundResult,
    StateRows,
    UploadScreen,
    sample_survivors,
    screen_and_aggregate,
)
from lightning_metafed.round.server import NonFiniteRoundError, server_step, write_gradients
from lightning_metafed.round.spill import SpillingClientState
from lightning_metafed.round.state import ClientStateStore, InMemoryClientState

__all__ = [
    "Aggregation",
    "ClientComputation",
    "ClientRunner",
    "ClientStateStore",
    "CommunicationMeter",
    "FaultLedger",
    "InMemoryClientState",
    "NonFiniteRoundError",
    "PrivacyLedger",
    "ResidualStore",
    "RoundCounts",
    "RoundLedgers",
    "RoundPipeline",
    "RoundResult",
    "SpillingClientState",
    "StateRows",
    "UploadCompression",
    "UploadScreen",
    "Uploads",
    "World",
    "compress_uploads",
    "sample_survivors",
    "screen_and_aggregate",
    "server_step",
    "write_gradients",
]
