"""A short deterministic CPU fit with step checkpoints, for test_kill_resume.py.

python tests/scale/kill_resume_run.py OUT [--sleep SECONDS] [--resume] [--algorithm maml|fedper]

Checkpoints go to OUT/ckpts (every CKPT_EVERY steps, plus last.ckpt); after every training batch
OUT/progress holds "global_step epoch batch_idx" (then the run sleeps SECONDS, so a parent process
can kill it mid-epoch). ``--resume`` continues from the newest checkpoint in OUT/ckpts. The final
meta-parameters, communication totals, and first and last global steps go to OUT/final.pt (with
``--algorithm fedper`` also every client's stored head, from a store that keeps 3 rows in memory).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_metafed as lm
from lightning_metafed.checkpoint import AtomicCheckpointIO, latest_checkpoint
from lightning_metafed.data import SyntheticClients
from lightning_metafed.inner import SGD
from lightning_metafed.nets import MLP

ROUNDS_PER_EPOCH, EPOCHS, CKPT_EVERY = 12, 3, 5


class Progress(Callback):
    """Publishes the position of the fit after each training batch, then optionally sleeps."""

    def __init__(self, path: Path, sleep: float):
        self.path, self.sleep = path, sleep
        self.start_step: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step  # > 0 only when the fit was restored from a checkpoint

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{trainer.global_step} {trainer.current_epoch} {batch_idx}")
        os.replace(tmp, self.path)  # the parent never reads a half-written line
        time.sleep(self.sleep)


def adam(params):
    return torch.optim.Adam(params, lr=0.01)


def build_model(algorithm: str) -> lm.MetaFedModule:
    if algorithm == "fedper":  # per-client heads in a store that spills all but 3 rows to disk
        return lm.FedPer(
            MLP(60, [16], 10), task="classification", inner_optimizer=SGD(lr=0.1), inner_steps=2, server_optimizer=adam,
            faults=lm.ClientFaults(dropout=0.3, seed=0), max_resident_rows=3,
        )
    # Faults and DP with fixed seeds: their draws, counters and accountant must resume exactly too.
    return lm.MAML(
        MLP(60, [16], 10), task="classification", inner_optimizer=SGD(lr=0.1), inner_steps=2, server_optimizer=adam,
        faults=lm.ClientFaults(dropout=0.3, step_choices=[1, 2], byzantine_fraction=0.2, seed=0),
        privacy=lm.ClientDP(clip_norm=1.0, noise_multiplier=0.3, seed=0),
    )


def main(out: Path, sleep: float, resume: bool, algorithm: str = "maml") -> None:
    pl.seed_everything(0, verbose=False)
    data = SyntheticClients(
        num_clients=40, max_samples=80, clients_per_round=4, support_size=5, query_size=5,
        rounds_per_epoch=ROUNDS_PER_EPOCH, eval_clients_per_batch=2, seed=0,
    )
    model = build_model(algorithm)
    ckpts = out / "ckpts"
    progress = Progress(out / "progress", sleep)
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
        callbacks=[
            progress,
            ModelCheckpoint(dirpath=ckpts, every_n_train_steps=CKPT_EVERY, save_top_k=-1, save_last=True),
        ],
    )
    trainer.fit(model, datamodule=data, ckpt_path=latest_checkpoint(ckpts) if resume else None)
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    privacy = None if model.ledgers.privacy is None else model.ledgers.privacy.accountant.history
    rows = None if model.client_state is None else model.client_state.state_dict()["rows"]
    torch.save({"state": state, "comm": dict(model.communication), "faults": dict(model.fault_counts),
                "privacy": privacy, "rows": rows, "start_step": progress.start_step,
                "global_step": trainer.global_step}, out / "final.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each training batch")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/ckpts")
    parser.add_argument("--algorithm", choices=["maml", "fedper"], default="maml")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    main(args.out, args.sleep, args.resume, args.algorithm)
