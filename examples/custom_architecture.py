"""A new architecture by subclassing: a small conv net meta-learned on the 8x8 digits.

Run:  python examples/custom_architecture.py   (about a minute on a laptop CPU)

Subclass any algorithm and override ``build_net``; every other knob (inner optimizer, steps,
server optimizer, ...) stays a constructor argument, so the subclass also works from YAML:
``metafed fit --model examples.custom_architecture.DigitsConvMAML --data DigitsClients ...``.
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import torch
from torch import nn

import lightning_metafed as lm
from lightning_metafed.data import DigitsClients
from lightning_metafed.inner import SGD


class DigitsConvMAML(lm.MAML):
    """MAML with a fixed conv net for ``[1, 8, 8]`` digit images (GroupNorm: vmap-friendly)."""

    def build_net(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, stride=2),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        )


def main(max_epochs: int = 3, rounds_per_epoch: int = 40) -> dict[str, float]:
    pl.seed_everything(0)
    data = DigitsClients(images=True, num_clients=50, clients_per_round=8, rounds_per_epoch=rounds_per_epoch)
    model = DigitsConvMAML(
        inner_optimizer=SGD(lr=0.2),
        inner_steps=1,
        eval_inner_steps=3,
        task="classification",
        server_optimizer=functools.partial(torch.optim.Adam, lr=0.003),
    )
    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=data)
    results = trainer.test(model, datamodule=data)[0]
    print({k: round(v, 4) for k, v in results.items()})
    return results


if __name__ == "__main__":
    main()
