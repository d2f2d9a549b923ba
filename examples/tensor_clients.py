"""A custom dataset from tensors: each client owns a few noisy samples of its own linear function.

Run:  python examples/tensor_clients.py

``TensorClients`` takes per-client ``(x, y)`` pairs (or ``((support_x, support_y), (query_x,
query_y))`` when you fix the split). Here clients differ in size, so batches are padded and masked.
To use the same data from YAML, ``torch.save`` the list and pass its path as ``train``.
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import torch

import lightning_metafed as lm
from lightning_metafed.data import TensorClients
from lightning_metafed.inner import SGD
from lightning_metafed.nets import MLP


def make_clients(num_clients: int = 200, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    clients = []
    for _ in range(num_clients):
        slope, intercept = torch.randn(2, generator=g) * 2
        n = int(torch.randint(12, 40, (), generator=g))
        x = torch.rand(n, 1, generator=g) * 4 - 2
        y = slope * x + intercept + 0.1 * torch.randn(n, 1, generator=g)
        clients.append((x, y))
    return clients


def main(max_epochs: int = 5, rounds_per_epoch: int = 50) -> dict[str, float]:
    pl.seed_everything(0)
    data = TensorClients(
        train=make_clients(), clients_per_round=16, support_size=5, query_size=5, rounds_per_epoch=rounds_per_epoch
    )
    model = lm.MAML(
        MLP(1, [32], 1, activation="tanh"),
        inner_optimizer=SGD(lr=0.05),
        inner_steps=3,
        eval_inner_steps=5,
        server_optimizer=functools.partial(torch.optim.Adam, lr=0.005),
    )
    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=data)
    results = trainer.test(model, datamodule=data)[0]
    print({k: round(v, 4) for k, v in results.items()})
    return results


if __name__ == "__main__":
    main()
