"""One LightningModule per algorithm; ``base.MetaFedModule`` owns the round lifecycle."""

from lightning_metafed.algorithms.anil import ANIL
from lightning_metafed.algorithms.apfl import APFL
from lightning_metafed.algorithms.base import MetaFedModule
from lightning_metafed.algorithms.ditto import Ditto
from lightning_metafed.algorithms.fedavg import FedAvg
from lightning_metafed.algorithms.fedbabu import FedBABU
from lightning_metafed.algorithms.fedper import FedPer, PersonalHeadModule
from lightning_metafed.algorithms.fedprox import FedProx
from lightning_metafed.algorithms.fedrep import FedRep
from lightning_metafed.algorithms.maml import MAML
from lightning_metafed.algorithms.meta_sgd import MetaSGD
from lightning_metafed.algorithms.per_fedavg import PerFedAvg
from lightning_metafed.algorithms.pfedme import PFedMe
from lightning_metafed.algorithms.reptile import Reptile
from lightning_metafed.algorithms.scaffold import SCAFFOLD
from lightning_metafed.algorithms.stateful import StatefulModule

__all__ = [
    "ANIL", "APFL", "Ditto", "FedAvg", "FedBABU", "FedPer", "FedProx", "FedRep", "MAML", "MetaFedModule", "MetaSGD",
    "PFedMe", "PerFedAvg", "PersonalHeadModule", "Reptile", "SCAFFOLD", "StatefulModule",
]
