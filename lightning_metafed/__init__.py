"""lightning-metafed: federated meta-learning for PyTorch Lightning."""

from lightning_metafed import aggregators, compression, faults, functional, inner, privacy
from lightning_metafed.aggregators import (
    Aggregator,
    CoordinateMedian,
    Mean,
    NormBoundedMean,
    TrimmedMean,
)
from lightning_metafed.algorithms import (
    ANIL,
    APFL,
    MAML,
    SCAFFOLD,
    Ditto,
    FedAvg,
    FedBABU,
    FedPer,
    FedProx,
    FedRep,
    MetaFedModule,
    MetaSGD,
    PerFedAvg,
    PFedMe,
    Reptile,
    StatefulModule,
)
from lightning_metafed.checkpoint import AtomicCheckpointIO
from lightning_metafed.data import TaskBatch
from lightning_metafed.faults import ClientFaults
from lightning_metafed.privacy import ClientDP
from lightning_metafed.resume import ResumeCheck
from lightning_metafed.round import NonFiniteRoundError

__version__ = "0.1.0"

__all__ = [
    "ANIL",
    "APFL",
    "Aggregator",
    "AtomicCheckpointIO",
    "ClientDP",
    "ClientFaults",
    "CoordinateMedian",
    "NormBoundedMean",
    "TrimmedMean",
    "faults",
    "privacy",
    "Ditto",
    "FedAvg",
    "FedBABU",
    "FedPer",
    "FedProx",
    "FedRep",
    "MAML",
    "Mean",
    "MetaFedModule",
    "MetaSGD",
    "NonFiniteRoundError",
    "PerFedAvg",
    "PFedMe",
    "Reptile",
    "SCAFFOLD",
    "StatefulModule",
    "ResumeCheck",
    "TaskBatch",
    "aggregators",
    "compression",
    "functional",
    "inner",
    "__version__",
]
