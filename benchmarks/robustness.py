"""Robust aggregation against Byzantine clients on Synthetic(0.5, 0.5).

First-order MAML (one inner SGD step, FedAdam server, 20 of 100 clients per round, local protocol:
every client's held-out 30 % is the test set). A fraction of the clients (fixed per client) is
Byzantine and uploads an attack instead of its update. Printed: mean post-adaptation test accuracy
over seeds for each aggregator, clean and under each attack, and the gap to the clean plain mean::

    python benchmarks/robustness.py                         # 20 % Byzantine, both attacks, 3 seeds
    python benchmarks/robustness.py --fraction 0.3 --seeds 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import warnings

import lightning.pytorch as pl
import torch

import lightning_metafed as lm
from lightning_metafed.aggregators import (
    Bucketing,
    CoordinateMedian,
    Mean,
    NormBoundedMean,
    TrimmedMean,
)
from lightning_metafed.data import SyntheticClients
from lightning_metafed.faults import ClientFaults
from lightning_metafed.inner import SGD
from lightning_metafed.nets import MLP

AGGREGATORS = {
    "mean": lambda: Mean(weighted=False),
    "median": CoordinateMedian,
    "trimmed_mean(0.3)": lambda: TrimmedMean(0.3),
    "bucketing(2)+median": lambda: Bucketing(CoordinateMedian(), 2),
    "norm_bounded(1)": lambda: NormBoundedMean(1.0, weighted=False),
}

#: The attacks of the table: name -> (ClientFaults attack, scale).
ATTACKS = {"random×100": ("random", 100.0), "sign_flip×10": ("sign_flip", 10.0)}


def run(
    aggregator: str, fraction: float = 0.0, attack: str = "random", scale: float = 100.0, seed: int = 0,
    rounds: int = 80, clients_per_round: int = 20,
) -> float:
    """Mean post-adaptation test accuracy of all clients' held-out data after ``rounds`` rounds."""
    pl.seed_everything(seed, verbose=False)
    data = SyntheticClients(
        alpha=0.5, beta=0.5, num_clients=100, protocol="local", local_split=(0.7, 0.0, 0.3),
        clients_per_round=clients_per_round, support_size=10, query_size=10, rounds_per_epoch=rounds,
        eval_clients_per_batch=50, seed=seed,
    )
    faults = None
    if fraction > 0:
        faults = ClientFaults(byzantine_fraction=fraction, byzantine_attack=attack, byzantine_scale=scale, seed=seed)
    model = lm.MAML(
        MLP(60, [20], 10), task="classification", inner_optimizer=SGD(lr=0.05), inner_steps=1, first_order=True,
        server_optimizer=lambda p: torch.optim.Adam(p, lr=0.01), aggregator=AGGREGATORS[aggregator](), faults=faults,
    )
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
        return float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc_post"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=80)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    seeds = range(args.seeds)
    columns = {"clean": (0.0, "random", 1.0), **{k: (args.fraction, *v) for k, v in ATTACKS.items()}}
    print(
        f"Synthetic(0.5, 0.5), FOMAML, {args.rounds} rounds, {args.fraction:.0%} Byzantine clients, {args.seeds} seeds: "
        "post-adaptation test accuracy, mean ± std over seeds (gap to the clean mean in pp)"
    )
    print(f"{'aggregator':<20}" + "".join(f"{c:>24}" for c in columns))
    reference = None
    for name in AGGREGATORS:
        cells = []
        for fraction, attack, scale in columns.values():
            accs = [run(name, fraction, attack, scale, seed=s, rounds=args.rounds) for s in seeds]
            mean = statistics.mean(accs)
            reference = mean if reference is None else reference
            cells.append(f"{mean:.3f} ± {statistics.pstdev(accs):.3f} ({100 * (mean - reference):+.1f})")
        print(f"{name:<20}" + "".join(f"{c:>24}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
