"""Raw client data for :mod:`reference_sampling`, built independently of the library's batched
code where the source generates it (Sinusoid, Episodic episodes); stored data is read as stored."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from reference_sampling import Client, Raw, order
from torch import Tensor

from lightning_metafed.data.seeding import POPULATION, generator, mix, unit

# ----------------------------------------------------------------------------------- raw sources


def tensor_raw(spec) -> Raw:
    """A TensorClients spec: ``(x, y)``, or ``((sx, sy), (qx, qy))`` (a fixed split at ``len(sx)``)."""
    a, b = spec
    if isinstance(a, Tensor):
        return a, b, None
    (sx, sy), (qx, qy) = a, b
    return torch.cat([sx, qx]), torch.cat([sy, qy]), len(sx)


def sinusoid_raw(seed: int, g: int, n: int, amplitude, phase, x_range, noise_std: float) -> Raw:
    """SinusoidClients' client ``g``, from the counter-based rule (float64 math, stored as float32)."""
    amp = amplitude[0] + (amplitude[1] - amplitude[0]) * unit(mix(seed, POPULATION, g, 0, 0))
    ph = phase[0] + (phase[1] - phase[0]) * unit(mix(seed, POPULATION, g, 0, 1))
    lo, hi = x_range
    x64 = [lo + (hi - lo) * unit(mix(seed, POPULATION, g, 1, j)) for j in range(n)]
    x32 = torch.tensor(x64, dtype=torch.float64).float()
    ys = []
    for j in range(n):
        y = amp * math.sin(float(x32[j]) + ph)
        if noise_std > 0:
            u1, u2 = unit(mix(seed, POPULATION, g, 2, j)), unit(mix(seed, POPULATION, g, 3, j))
            z = math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)
            y = y + noise_std * z
        ys.append(y)
    return x32.reshape(n, 1), torch.tensor(ys, dtype=torch.float64).float().reshape(n, 1), None


def dataset_raw(dataset, indices: Sequence[int]) -> Raw:
    """A partitioned dataset client: its items' ``x`` stacked and integer labels (int64)."""
    items = [dataset[int(j)] for j in indices]
    x = torch.stack([torch.as_tensor(item[0]) for item in items])
    y = torch.stack([torch.as_tensor(item[1]).reshape(()).long() for item in items])
    return x, y, None


def dataset_labels(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def leaf_raw(root: Path) -> list[Raw]:
    """Numeric LEAF JSON (flat folder, or train/ and test/ folders), users sorted by name."""

    def read(folder: Path) -> dict[str, tuple[list, list]]:
        users: dict[str, tuple[list, list]] = {}
        for path in sorted(folder.glob("*.json")):
            for user, data in json.loads(path.read_text())["user_data"].items():
                xs, ys = users.setdefault(user, ([], []))
                xs.extend(data["x"])
                ys.extend(data["y"])
        return users

    def tensors(xs: list, ys: list) -> tuple[Tensor, Tensor]:
        return torch.tensor(xs, dtype=torch.float32), torch.tensor(ys, dtype=torch.long)

    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = read(root / "train"), read(root / "test")
        out = []
        for user in sorted(set(train) & set(test)):
            (sx, sy), (qx, qy) = tensors(*train[user]), tensors(*test[user])
            out.append((torch.cat([sx, qx]), torch.cat([sy, qy]), len(sx)))
        return out
    users = read(root)
    return [(*tensors(*users[u]), None) for u in sorted(users)]


def episodic_splits(
    dataset, seed: int, ways: int, shots: int, queries: int, class_split, num_train: int, num_eval: int
) -> dict[str, list[Client]]:
    """EpisodicClients' train/val/test episodes (global id = episode number within its split)."""
    labels = dataset_labels(dataset)
    classes = sorted(set(labels))
    per_class = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
    perm = torch.randperm(len(classes), generator=generator(seed, POPULATION)).tolist()
    shuffled = [classes[p] for p in perm]
    n_val, n_test = int(round(len(shuffled) * class_split[1])), int(round(len(shuffled) * class_split[2]))
    n_train = len(shuffled) - n_val - n_test
    pools = [shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :]]

    def episode(split_id: int, k: int) -> Callable[[], Raw]:
        def build() -> Raw:
            pool = pools[split_id]
            H = (seed, POPULATION, split_id, k)
            chosen = [pool[p] for p in order(H + (0,), len(pool))[:ways]]
            support, query = [], []
            for w, c in enumerate(chosen):
                idx = per_class[c]
                picked = [idx[p] for p in order(H + (1 + w,), len(idx))[: shots + queries]]
                support += picked[:shots]
                query += picked[shots:]
            items = [dataset[j] for j in support + query]
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            y = torch.tensor([w for w in range(ways) for _ in range(shots)] + [w for w in range(ways) for _ in range(queries)],
                             dtype=torch.long)
            return x, y, ways * shots

        return build

    counts = (num_train, num_eval, num_eval)
    return {
        split: [(k, episode(split_id, k)) for k in range(counts[split_id] if len(pools[split_id]) >= ways else 0)]
        for split_id, split in enumerate(("train", "val", "test"))
    }
