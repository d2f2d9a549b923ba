"""LEAF benchmark dumps (FEMNIST, Shakespeare, synthetic LEAF data): natural per-user clients.

LEAF writes JSON files ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}``
(Caldas et al., 2018, "LEAF: A Benchmark for Federated Settings"), either all in one folder or split
per user into ``train/`` and ``test/`` folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_metafed.data.datamodule import FederatedDataModule
from lightning_metafed.data.population import ClientData, ListPopulation, Population
from lightning_metafed.files import load_json_file

__all__ = ["LEAFClients", "read_leaf_dir", "SHAKESPEARE_LETTERS"]

#: The 80-character vocabulary of LEAF's Shakespeare task (its ``language_utils.ALL_LETTERS``).
SHAKESPEARE_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"


def read_leaf_dir(folder: Path) -> dict[str, dict[str, list]]:
    """``{user: {"x": [...], "y": [...]}}`` merged over every ``*.json`` file in ``folder``."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ValueError(f"Expected LEAF *.json files in {str(folder)!r}, found none")
    users: dict[str, dict[str, list]] = {}
    for path in files:
        blob = load_json_file(path, "LEAF JSON")
        if not isinstance(blob, dict) or "user_data" not in blob:
            raise ValueError(f"{str(path)!r} is not a LEAF file: expected a 'user_data' key")
        for user, data in blob["user_data"].items():
            entry = users.setdefault(user, {"x": [], "y": []})
            entry["x"].extend(data["x"])
            entry["y"].extend(data["y"])
    return users


class LEAFClients(FederatedDataModule):
    """One client per LEAF user.

    ``root`` holds the JSON files, or ``train/`` and ``test/`` folders of them: then each user's
    train data is its support part and its test data its query part (the natural split; users
    missing from either folder are dropped with a warning).

    Features: lists of numbers become float tensors (reshaped to ``input_shape`` if given, e.g.
    ``[1, 28, 28]`` for FEMNIST); strings become character indices into ``vocabulary`` (default:
    Shakespeare's). Labels: integers, or single characters mapped through ``vocabulary``.

    Args:
        num_classes: for integer labels, the number of classes (inferred when ``None``).
    """

    def __init__(
        self,
        root: str,
        vocabulary: str | None = None,
        input_shape: list[int] | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"Expected `root` to be a folder of LEAF JSON files, got {root!r}")
        self.vocabulary = SHAKESPEARE_LETTERS if vocabulary is None else vocabulary
        self._index = {c: i for i, c in enumerate(self.vocabulary)}
        self.input_shape = None if input_shape is None else list(input_shape)
        self.num_classes = num_classes

    def _encode_x(self, values: list, user: str) -> Tensor:
        if values and isinstance(values[0], str):
            return torch.stack([self._encode_text(s, user) for s in values])
        try:
            x = torch.tensor(values, dtype=torch.float32)
        except (TypeError, ValueError):
            raise ValueError(
                f"User {user!r}: LEAF features must be numbers or strings (Sent140's records need your own tokenizer)"
            ) from None
        return x.reshape(len(values), *self.input_shape) if self.input_shape else x

    def _encode_text(self, text: str, user: str) -> Tensor:
        missing = sorted({c for c in text if c not in self._index})
        if missing:
            raise ValueError(f"User {user!r}: characters {missing} are not in `vocabulary`")
        return torch.tensor([self._index[c] for c in text], dtype=torch.long)

    def _encode_y(self, values: list, user: str) -> Tensor:
        if values and isinstance(values[0], str):
            return torch.cat([self._encode_text(s, user) for s in values])
        labels = torch.tensor(values)
        if labels.is_floating_point() and not bool((labels == labels.round()).all()):
            bad = float(labels[labels != labels.round()][0])
            raise ValueError(f"Client {user!r}: expected integer class labels `y` in the LEAF JSON, got {bad}")
        return labels.long()

    def build_population(self) -> Population:
        train_dir, test_dir = self.root / "train", self.root / "test"
        if train_dir.is_dir() and test_dir.is_dir():
            train, test = read_leaf_dir(train_dir), read_leaf_dir(test_dir)
            users = sorted(set(train) & set(test))
            dropped = len(set(train) ^ set(test))
            if dropped:
                rank_zero_warn(f"LEAFClients: {dropped} users appear in only one of train/ and test/ and were dropped")
            parts = [(train[u], test[u]) for u in users]
        else:
            data = read_leaf_dir(self.root)
            users = sorted(data)
            parts = [(data[u], None) for u in users]
        clients = []
        for user, (first, second) in zip(users, parts):
            x, y = self._encode_x(first["x"], user), self._encode_y(first["y"], user)
            end = None
            if second is not None:
                end = x.shape[0]
                x = torch.cat([x, self._encode_x(second["x"], user)])
                y = torch.cat([y, self._encode_y(second["y"], user)])
            clients.append(ClientData(x, y, end))
        if self.num_classes is None:
            letters = any(isinstance(p[0]["y"][0], str) for p in parts if p[0]["y"])
            self.num_classes = len(self.vocabulary) if letters else int(max(int(c.y.max()) for c in clients)) + 1
        return ListPopulation(clients, users)
