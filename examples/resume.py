"""Stop a fit and resume it from its last checkpoint: the result equals an uninterrupted fit.

Run:  python examples/resume.py

The CLI equivalent: ``metafed fit --config configs/sinusoid/maml.yaml --ckpt_path
lightning_logs/version_0/checkpoints/last.ckpt``. Meta-parameters, learned inner learning rates,
the server optimizer's state, the round counter and the client sampler are all restored: the data
module draws round ``r``'s clients from ``(seed, r)``, and ``r`` is the restored global step.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_metafed as lm
from lightning_metafed.data import SinusoidClients
from lightning_metafed.inner import SGD
from lightning_metafed.nets import MLP


def build() -> tuple[lm.MetaSGD, SinusoidClients]:
    pl.seed_everything(0)
    model = lm.MetaSGD(MLP(1, [40, 40], 1), inner_optimizer=SGD(lr=0.01), server_optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    return model, SinusoidClients(num_clients=2000, clients_per_round=10, rounds_per_epoch=20)


def fit(max_steps: int, root: Path, ckpt_path: str | None = None) -> lm.MetaSGD:
    model, data = build()
    trainer = pl.Trainer(
        max_steps=max_steps,
        default_root_dir=root,
        logger=False,
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
        enable_progress_bar=False,
        limit_val_batches=2,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


def main(total_rounds: int = 50, stop_after: int = 30) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        straight = fit(total_rounds, root / "straight")
        fit(stop_after, root / "interrupted")  # "interrupted" after stop_after rounds
        resumed = fit(total_rounds, root / "interrupted", ckpt_path=str(root / "interrupted" / "checkpoints" / "last.ckpt"))
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(straight.parameters(), resumed.parameters()))
    print(f"max |θ_straight − θ_resumed| after {total_rounds} rounds: {diff:.2e}")
    return diff


if __name__ == "__main__":
    main()
