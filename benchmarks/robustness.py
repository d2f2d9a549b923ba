"""Robust aggregation against Byzantine clients on Synthetic(0.5, 0.5).

First-order MAML (one inner SGD step, FedAdam server, 20 of 100 clients per round, local protocol:
every client's held-out 30 % is the test set). A fraction of the clients (fixed per client) is
Byzantine and uploads an attack instead of its update. Printed: mean post-adaptation test accuracy
over seeds for each aggregator, clean and under each attack, and the gap to the clean plain mean::

    python benchmarks/robustness.py                         # 20 % Byzantine, every attack, 3 seeds
    python benchmarks/robustness.py --fraction 0.3 --seeds 5 --workers 2
    python benchmarks/robustness.py --tune-tau              # CenteredClip's τ on a separate seed

The rules that need ``f`` (Krum, Multi-Krum, Bulyan) get ``f = 4``, the expected number of Byzantine
clients in a round of 20 at 20 %. CenteredClip's ``τ`` was chosen with ``--tune-tau``: the best
mean over the clean run and the ×10 sign flip on seed 100, a seed no table row uses.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from concurrent.futures import ProcessPoolExecutor

import lightning.pytorch as pl
import torch

import lightning_metafed as lm
from lightning_metafed.aggregators import (
    Bucketing,
    Bulyan,
    CenteredClip,
    CoordinateMedian,
    Krum,
    Mean,
    MultiKrum,
    NormBoundedMean,
    TrimmedMean,
)
from lightning_metafed.data import SyntheticClients
from lightning_metafed.faults import ClientFaults
from lightning_metafed.inner import SGD
from lightning_metafed.nets import MLP
from common import fit_and_test

#: CenteredClip's radius, from ``--tune-tau`` (seed 100).
TAU = 1.0
#: The Byzantine clients Krum, Multi-Krum and Bulyan assume per round (20 % of 20).
F = 4

AGGREGATORS = {
    "mean": lambda: Mean(weighted=False),
    "median": CoordinateMedian,
    "trimmed_mean(0.3)": lambda: TrimmedMean(0.3),
    "bucketing(2)+median": lambda: Bucketing(CoordinateMedian(), 2),
    "norm_bounded(1)": lambda: NormBoundedMean(1.0, weighted=False),
    "krum(4)": lambda: Krum(F),
    "multi_krum(4)": lambda: MultiKrum(F),
    "bulyan(4)": lambda: Bulyan(F),
    f"cclip({TAU:g})": lambda: CenteredClip(TAU, 3),
    f"bucketing(2)+cclip({TAU:g})": lambda: Bucketing(CenteredClip(TAU, 3), 2),
}

#: The attacks of the table: name -> (ClientFaults attack, scale).
ATTACKS = {
    "random×100": ("random", 100.0), "sign_flip×10": ("sign_flip", 10.0), "alie": ("alie", 1.0), "ipm(0.5)": ("ipm", 0.5),
}


def run(
    aggregator: str, fraction: float = 0.0, attack: str = "random", scale: float = 100.0, seed: int = 0,
    rounds: int = 80, clients_per_round: int = 20, tau: float | None = None,
) -> float:
    """Mean post-adaptation test accuracy of all clients' held-out data after ``rounds`` rounds
    (``tau``: a CenteredClip radius for ``aggregator``'s CenteredClip instead of :data:`TAU`)."""
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
        server_optimizer=lambda p: torch.optim.Adam(p, lr=0.01), aggregator=make_aggregator(aggregator, tau), faults=faults,
    )
    return fit_and_test(model, data)


def make_aggregator(name: str, tau: float | None = None):
    """The table row ``name``'s aggregator (its CenteredClip with radius ``tau`` when given)."""
    if tau is not None and "cclip" in name:
        inner = CenteredClip(tau, 3)
        return Bucketing(inner, 2) if name.startswith("bucketing") else inner
    return AGGREGATORS[name]()


def _job(args: tuple) -> float:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    return run(*args[:5], rounds=args[5], tau=args[6])


def tune_tau(rounds: int, fraction: float, workers: int, seed: int = 100) -> None:
    """CenteredClip's τ on ``seed`` (no table row uses it): the mean of the clean and the ×10
    sign-flip accuracy for each candidate, with and without bucketing."""
    taus = (0.1, 0.3, 1.0, 3.0, 10.0)
    names = [n for n in AGGREGATORS if "cclip" in n]
    cases = [(0.0, "random", 1.0), (fraction, "sign_flip", 10.0)]
    jobs = [(n, *c, seed, rounds, t) for n in names for t in taus for c in cases]
    with ProcessPoolExecutor(workers) as pool:
        accs = list(pool.map(_job, jobs))
    print(f"CenteredClip τ on seed {seed}: (clean, sign flip ×10) post-adaptation accuracy")
    for i, (name, tau) in enumerate((n, t) for n in names for t in taus):
        clean, flipped = accs[2 * i], accs[2 * i + 1]
        print(f"{name:<28} τ={tau:<6g} {clean:.3f} {flipped:.3f}  mean {(clean + flipped) / 2:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tune-tau", action="store_true", help="choose CenteredClip's τ on seed 100 and exit")
    parser.add_argument("--aggregators", nargs="+", choices=list(AGGREGATORS), default=list(AGGREGATORS), help="rows")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.tune_tau:
        return tune_tau(args.rounds, args.fraction, args.workers)
    columns = {"clean": (0.0, "random", 1.0), **{k: (args.fraction, *v) for k, v in ATTACKS.items()}}
    jobs = [(n, *c, s, args.rounds, None) for n in args.aggregators for c in columns.values() for s in range(args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        accs = list(pool.map(_job, jobs))
    print(
        f"Synthetic(0.5, 0.5), FOMAML, {args.rounds} rounds, {args.fraction:.0%} Byzantine clients, {args.seeds} seeds: "
        f"post-adaptation test accuracy, mean ± std over seeds (gap in pp to the clean {args.aggregators[0]})"
    )
    print(f"{'aggregator':<26}" + "".join(f"{c:>24}" for c in columns))
    reference, n = None, args.seeds
    for i, name in enumerate(args.aggregators):
        cells = []
        for j in range(len(columns)):
            cell = accs[(i * len(columns) + j) * n : (i * len(columns) + j + 1) * n]
            mean = statistics.mean(cell)
            reference = mean if reference is None else reference
            cells.append(f"{mean:.3f} ± {statistics.pstdev(cell):.3f} ({100 * (mean - reference):+.1f})")
        print(f"{name:<26}" + "".join(f"{c:>24}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
