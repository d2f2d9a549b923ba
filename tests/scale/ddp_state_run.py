"""Short fits of algorithms with per-client state on N CPU processes (gloo DDP). Used by test_ddp_state.py.

python tests/scale/ddp_state_run.py DEVICES OUT_DIR ALGORITHM[,ALGORITHM...]

Every process saves ``OUT_DIR/{algorithm}_{devices}_{rank}.pt``: its final parameters, its client
state store (rows by client id), its communication and fault counts and (SCAFFOLD) its server
control. Five clients are sampled per round, so two processes take unequal shares; client dropout
(seed 2) leaves 5, 4, 1 and 4 survivors in the four rounds: in the third round fewer clients than
processes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

import lightning_metafed as lm
from lightning_metafed.data import SyntheticClients
from lightning_metafed.faults import ClientFaults
from lightning_metafed.inner import SGD
from lightning_metafed.nets import MLP

ROUNDS = 4
FAULTS = {"dropout": 0.3, "seed": 2}


def make_model(algorithm: str) -> pl.LightningModule:
    net = MLP(60, [8], 10)
    common: dict[str, Any] = {
        "task": "classification", "inner_steps": 2, "faults": ClientFaults(**FAULTS),
        "server_optimizer": lambda p: torch.optim.SGD(p, lr=1.0),
    }
    if algorithm == "fedper":
        return lm.FedPer(net, inner_optimizer=SGD(lr=0.05), eval_inner_steps=1, **common)
    if algorithm == "ditto":
        return lm.Ditto(net, inner_optimizer=SGD(lr=0.05), personal_steps=2, lam=0.1, **common)
    if algorithm == "scaffold":
        return lm.SCAFFOLD(net, local_lr=0.05, eval_inner_steps=1, **common)
    raise ValueError(f"Expected an algorithm among fedper, ditto, scaffold, got {algorithm!r}")


def store_rows(model: pl.LightningModule) -> dict[Any, dict[str, torch.Tensor]]:
    return {key: {k: v.detach().cpu().clone() for k, v in row.items()} for key, row in model.client_state.state_dict()["rows"].items()}


def fit(devices: int, out_dir: Path, algorithm: str) -> None:
    pl.seed_everything(0)
    data = SyntheticClients(
        num_clients=12, max_samples=60, protocol="local", clients_per_round=5, support_size=5, query_size=5,
        rounds_per_epoch=ROUNDS, eval_clients_per_batch=4, seed=0,
    )
    model = make_model(algorithm)
    trainer = pl.Trainer(
        strategy="ddp" if devices > 1 else "auto", accelerator="cpu", devices=devices, max_epochs=1,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, precision="64-true",
    )
    trainer.fit(model, datamodule=data)
    saved = {
        "params": {k: v.detach().cpu().clone() for k, v in model.named_parameters()},
        "store": store_rows(model),
        "comm": dict(model.communication),
        "faults": dict(model.fault_counts),
        "world_size": trainer.world_size,
    }
    if algorithm == "scaffold":
        saved["control"] = {k: v.detach().cpu().clone() for k, v in model.control().items()}
    torch.save(saved, out_dir / f"{algorithm}_{devices}_{trainer.global_rank}.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # the next fit starts a new group


if __name__ == "__main__":
    for name in sys.argv[3].split(","):
        fit(int(sys.argv[1]), Path(sys.argv[2]), name)
