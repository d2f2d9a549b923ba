"""A short fit + test with N CPU processes (gloo DDP); rank 0 saves its final state. Used by test_ddp.py.

python tests/scale/ddp_run.py DEVICES OUT.pt {fast,explicit,robust,private,compressed}

``robust``: dropout (some rounds keep fewer clients than processes), step budgets and Byzantine
clients under a trimmed mean; ``private``: the same faults under client-level DP with a fixed seed;
``compressed``: dropout with ``TopK`` uploads and error feedback (residuals carried between the
rounds the clients join; the residual rows are saved too).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

import lightning_metafed as lm
from lightning_metafed.aggregators import TrimmedMean
from lightning_metafed.compression import TopK
from lightning_metafed.data import SyntheticClients
from lightning_metafed.faults import ClientFaults
from lightning_metafed.inner import SGD
from lightning_metafed.nets import MLP
from lightning_metafed.privacy import ClientDP


def main(devices: int, out: Path, path: str) -> None:
    pl.seed_everything(0)
    data = SyntheticClients(
        num_clients=50, max_samples=120, clients_per_round=5, support_size=5, query_size=5,
        rounds_per_epoch=3, eval_clients_per_batch=2, seed=0,
    )
    extra = {}
    if path == "compressed":
        extra["faults"] = ClientFaults(dropout=0.5, seed=1)
        extra["compressor"] = TopK(fraction=0.25)
    if path in ("robust", "private"):
        extra["faults"] = ClientFaults(dropout=0.5, step_choices=[1, 2], byzantine_fraction=0.2, seed=1)
        if path == "robust":
            extra["aggregator"] = TrimmedMean(0.2)
        else:
            extra["privacy"] = ClientDP(clip_norm=0.5, noise_multiplier=0.5, seed=3)
    model = lm.MAML(
        MLP(60, [16], 10), task="classification", inner_optimizer=SGD(lr=0.1), inner_steps=2, eval_inner_steps=2,
        server_optimizer=lambda p: torch.optim.Adam(p, lr=0.01), fast_path=path == "fast", **extra,
    )
    trainer = pl.Trainer(
        strategy="ddp" if devices > 1 else "auto", accelerator="cpu", devices=devices, max_epochs=2,
        logger=pl.loggers.CSVLogger(out.parent / f"logs_{devices}_{path}"), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    log_dir = trainer.log_dir
    if trainer.is_global_zero:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        residuals = None if model.upload_residuals is None else model.upload_residuals.state_dict()["rows"]
        torch.save(
            {"state": state, "test": results, "comm": model.communication, "faults": model.fault_counts, "log_dir": log_dir,
             "residuals": residuals},
            out,
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a live gloo group at interpreter exit can abort the process


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
