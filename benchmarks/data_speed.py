"""Data-path speed that the tests count instead of timing: a huge lazy population and a tiny Dirichlet alpha.

Run:  python benchmarks/data_speed.py [--clients 1000000] [--repeats 5]

- ``SinusoidClients`` with 10^3 vs ``--clients`` clients: ``setup()`` (a fresh data module each time)
  and one round of 10 clients (``round_batch``, a new round each time). Setup's one O(n) step is the
  random train/val/test split (a single ``torch.randperm``); no client is built or looked up one by
  one, and a round builds only its 10 sampled clients, so the round ratio should stay near 1
  (tests/data/test_sources.py counts the clients built and looked up).
- ``Dirichlet``: partitioning 1,000 labels (10 classes) into 200 clients with ``alpha=1e-3`` (most
  clients left empty by the draw, then filled) vs ``alpha=0.5``. One draw per class and no rejection
  loop, so the ratio should stay near 1 (tests/data/test_partition.py counts the draws and moves).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from common import median_ms

from lightning_metafed.data import SinusoidClients
from lightning_metafed.data.partition import Dirichlet


def sinusoid(num_clients: int) -> SinusoidClients:
    return SinusoidClients(num_clients=num_clients, clients_per_round=10, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10**6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warmup = 1 if args.repeats > 1 else 0
    sizes = (10**3, args.clients)

    setup = {n: median_ms(lambda n=n: sinusoid(n).setup(), repeats=args.repeats, warmup=warmup) for n in sizes}
    rounds = {}
    for n in sizes:
        data, counter = sinusoid(n), itertools.count()
        data.setup()
        rounds[n] = median_ms(lambda data=data, counter=counter: data.round_batch(next(counter)), repeats=args.repeats,
                              warmup=warmup)
    small, large = sizes
    print(f"SinusoidClients, 10^3 vs {large} clients (ms):")
    print(f"  setup()             {setup[small]:8.2f} {setup[large]:8.2f}   ratio {setup[large] / setup[small]:.2f}")
    print(f"  round of 10 clients {rounds[small]:8.2f} {rounds[large]:8.2f}   ratio {rounds[large] / rounds[small]:.2f}")

    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    moderate = median_ms(lambda: Dirichlet(alpha=0.5)(labels, 200, seed=0), repeats=args.repeats, warmup=warmup)
    tiny = median_ms(lambda: Dirichlet(alpha=1e-3)(labels, 200, seed=0), repeats=args.repeats, warmup=warmup)
    print(f"Dirichlet, 1000 labels into 200 clients (ms): alpha=0.5 {moderate:8.2f}   alpha=1e-3 {tiny:8.2f}   "
          f"ratio {tiny / moderate:.2f}")


if __name__ == "__main__":
    main()
