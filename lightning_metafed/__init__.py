"""lightning-metafed: federated meta-learning for PyTorch Lightning."""

from lightning_metafed import aggregators, functional, inner
from lightning_metafed.aggregators import Aggregator, Mean
from lightning_metafed.algorithms import (
    ANIL,
    MAML,
    FedAvg,
    MetaFedModule,
    MetaSGD,
    PerFedAvg,
    Reptile,
)
from lightning_metafed.data import TaskBatch

__version__ = "0.1.0"

__all__ = [
    "ANIL",
    "Aggregator",
    "FedAvg",
    "MAML",
    "Mean",
    "MetaFedModule",
    "MetaSGD",
    "PerFedAvg",
    "Reptile",
    "TaskBatch",
    "aggregators",
    "functional",
    "inner",
    "__version__",
]
