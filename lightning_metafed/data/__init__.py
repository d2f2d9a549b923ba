"""Task data: ``TaskBatch``, the ``FederatedDataModule`` and its client sources, partitioners."""

from lightning_metafed.data import partition
from lightning_metafed.data.datamodule import FederatedDataModule, stack_tasks
from lightning_metafed.data.dataset import DatasetClients
from lightning_metafed.data.digits import DigitsClients
from lightning_metafed.data.episodic import EpisodicClients
from lightning_metafed.data.leaf import LEAFClients
from lightning_metafed.data.partition import IID, Dirichlet, QuantitySkew, Shards
from lightning_metafed.data.population import ClientData, Population
from lightning_metafed.data.sinusoid import SinusoidClients
from lightning_metafed.data.synthetic import SyntheticClients
from lightning_metafed.data.task_batch import TaskBatch
from lightning_metafed.data.tensors import TensorClients
from lightning_metafed.data.validation import DataSpec

__all__ = [
    "ClientData",
    "DatasetClients",
    "DataSpec",
    "DigitsClients",
    "Dirichlet",
    "EpisodicClients",
    "FederatedDataModule",
    "IID",
    "LEAFClients",
    "Population",
    "QuantitySkew",
    "Shards",
    "SinusoidClients",
    "SyntheticClients",
    "TaskBatch",
    "TensorClients",
    "partition",
    "stack_tasks",
]
