"""One LightningModule per algorithm; ``base.MetaFedModule`` owns the round lifecycle."""

from lightning_metafed.algorithms.anil import ANIL
from lightning_metafed.algorithms.base import MetaFedModule
from lightning_metafed.algorithms.fedavg import FedAvg
from lightning_metafed.algorithms.maml import MAML
from lightning_metafed.algorithms.meta_sgd import MetaSGD
from lightning_metafed.algorithms.per_fedavg import PerFedAvg
from lightning_metafed.algorithms.reptile import Reptile

__all__ = ["ANIL", "FedAvg", "MAML", "MetaFedModule", "MetaSGD", "PerFedAvg", "Reptile"]
