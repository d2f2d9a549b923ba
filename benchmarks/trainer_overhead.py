"""Lightning's overhead: `Trainer.fit` rounds per second vs a hand-written loop over the same module.

Run:  python benchmarks/trainer_overhead.py [--rounds 300] [--clients 32]

Both run second-order MAML (5 inner steps) on sinusoid rounds from the same SinusoidClients data
module (data sampling included in both). The Trainer runs without validation; one row with
Lightning's console/checkpoint extras off and no logger, one with the default TensorBoard logger.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning.pytorch as pl
import torch
from common import mlp
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_metafed as lm
from lightning_metafed.data import SinusoidClients
from lightning_metafed.inner import SGD


def build(rounds: int, clients: int):
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01), inner_steps=5)
    data = SinusoidClients(num_clients=10_000, clients_per_round=clients, rounds_per_epoch=rounds)
    data.setup()
    return model, data


def hand_loop(rounds: int, clients: int) -> float:
    model, data = build(rounds, clients)
    server = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for r in range(rounds):
        batch = data.round_batch(r)
        server.zero_grad()
        model.round_gradients(batch)
        server.step()
    return rounds / (time.perf_counter() - start)


def trainer_fit(rounds: int, clients: int, logger) -> float:
    model, data = build(rounds, clients)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return rounds / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    hand_loop(20, args.clients)  # warm-up
    hand = hand_loop(args.rounds, args.clients)
    bare = trainer_fit(args.rounds, args.clients, logger=False)
    with tempfile.TemporaryDirectory() as tmp:
        logged = trainer_fit(args.rounds, args.clients, logger=TensorBoardLogger(tmp))
    print(f"{args.rounds} rounds of {args.clients} clients")
    print(f"hand-written loop      {hand:8.1f} rounds/s")
    print(f"Trainer.fit, no logger {bare:8.1f} rounds/s   ratio {bare / hand:.2f}")
    print(f"Trainer.fit, TB logger {logged:8.1f} rounds/s   ratio {logged / hand:.2f}")


if __name__ == "__main__":
    main()
