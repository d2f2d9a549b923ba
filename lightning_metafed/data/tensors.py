"""Clients given directly as tensors (in Python) or as a ``torch.save``-d file (from YAML)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_metafed.data.datamodule import FederatedDataModule
from lightning_metafed.data.population import ClientData, ListPopulation, Population
from lightning_metafed.files import load_torch_file

__all__ = ["TensorClients", "as_client_data"]

ClientSpec = Any  # (x, y) or ((support_x, support_y), (query_x, query_y))
#: What to do when a clients file holds objects that ``weights_only`` loading refuses.
_PLAIN_TENSORS = "TensorClients reads files with weights_only=True: save lists and tuples of plain tensors."


def as_client_data(spec: ClientSpec, where: str) -> ClientData:
    """``(x, y)`` → a client without a fixed split; ``((sx, sy), (qx, qy))`` → a fixed split."""
    if isinstance(spec, ClientData):
        return spec
    if isinstance(spec, Sequence) and len(spec) == 2:
        a, b = spec
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            if a.shape[0] != b.shape[0]:
                raise ValueError(f"{where}: x has {a.shape[0]} examples but y has {b.shape[0]}")
            return ClientData(a, b, None)
        if isinstance(a, Sequence) and isinstance(b, Sequence) and len(a) == 2 and len(b) == 2:
            (sx, sy), (qx, qy) = a, b
            if all(isinstance(t, Tensor) for t in (sx, sy, qx, qy)):
                for name, x, y in (("support", sx, sy), ("query", qx, qy)):
                    if x.shape[0] != y.shape[0]:
                        raise ValueError(f"{where}: {name} x has {x.shape[0]} examples but y has {y.shape[0]}")
                return ClientData(torch.cat([sx, qx]), torch.cat([sy, qy]), sx.shape[0])
    raise ValueError(f"{where}: expected (x, y) or ((support_x, support_y), (query_x, query_y)) tensors, got {type(spec).__name__}")


class TensorClients(FederatedDataModule):
    """Clients from tensors: ``train`` is a list of per-client ``(x, y)`` pairs, or of
    ``((support_x, support_y), (query_x, query_y))`` pairs when the split is fixed.

    With only ``train``, the ``protocol`` splits the clients (``"unseen"``) or their data
    (``"local"``). Passing ``val``/``test`` client lists makes them the held-out clients (the
    ``"unseen"`` protocol). Any of the three may be the path of a file written by ``torch.save``
    holding such a list — the way to use this class from YAML.

    Args:
        num_classes: for classification, the number of classes (labels are checked against it).

    Example:
        Ten classification clients with 20 examples each; the ``"unseen"`` protocol holds out two:

        >>> import torch
        >>> from lightning_metafed.data import TensorClients
        >>> _ = torch.manual_seed(0)
        >>> clients = [(torch.randn(20, 3), torch.randint(0, 2, (20,))) for _ in range(10)]
        >>> data = TensorClients(clients, num_classes=2, clients_per_round=4, support_size=5, query_size=5)
        >>> data.setup("fit")
        >>> [len(data.population(split)) for split in ("train", "val", "test")]
        [8, 1, 1]
        >>> batch = data.round_batch(0)
        >>> tuple(batch.support_x.shape), batch.support_y.dtype, batch.weight  # weight: sample counts
        ((4, 5, 3), torch.int64, tensor([20., 20., 20., 20.]))
    """

    hparams_ignore = ("train", "val", "test")

    def __init__(
        self,
        train: str | list[Any],
        val: str | list[Any] | None = None,
        test: str | list[Any] | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.clients = {
            split: None if spec is None else self._load(split, spec) for split, spec in (("train", train), ("val", val), ("test", test))
        }
        if not self.clients["train"]:
            raise ValueError("Expected `train` to hold at least one client, got none")
        if (val is not None or test is not None) and self.protocol != "unseen":
            raise ValueError(f"Explicit `val`/`test` clients need protocol='unseen', got protocol={self.protocol!r}")

    @staticmethod
    def _load(split: str, spec: str | list[Any]) -> list[ClientData]:
        if isinstance(spec, str):
            spec = load_torch_file(spec, "torch.save", weights_only=True, remedy=_PLAIN_TENSORS)
        if not isinstance(spec, Sequence) or isinstance(spec, Tensor):
            raise ValueError(f"Expected `{split}` to be a list of clients or a file holding one, got {type(spec).__name__}")
        return [as_client_data(c, f"`{split}` client {i}") for i, c in enumerate(spec)]

    def populations(self) -> dict[str, Population]:
        if self.clients["val"] is None and self.clients["test"] is None:
            return super().populations()
        populations, first_id = {}, 0
        for split, clients in self.clients.items():
            clients = clients or []
            populations[split] = ListPopulation(clients, [f"{split}_{i}" for i in range(len(clients))], first_id)
            first_id += len(clients)
        return populations

    def build_population(self) -> Population:
        return ListPopulation(self.clients["train"])
