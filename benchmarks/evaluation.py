"""Evaluation of held-out clients: vectorized (vmap) vs a per-client loop.

Run:  python benchmarks/evaluation.py [--clients 1000] [--steps 10]

Both adapt every client from the meta-parameters on its 10 support examples for `steps` SGD steps
and score its query set after every step (the adaptation curve), for the sinusoid MLP 1-40-40-1.
The results are checked to agree.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import mlp, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.inner import SGD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    batch = sinusoid_batch(args.clients)
    timings, curves = {}, {}
    for vectorize in (True, False):
        model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01), eval_inner_steps=args.steps, vectorize=vectorize)
        model.adaptation_curves(batch[:8])  # warm-up
        start = time.perf_counter()
        curves[vectorize] = model.adaptation_curves(batch)["loss"]
        timings[vectorize] = time.perf_counter() - start
    torch.testing.assert_close(curves[True], curves[False], rtol=1e-4, atol=1e-5)
    print(f"{args.clients} held-out clients, {args.steps} adaptation steps, curve at every step")
    print(f"vectorized {timings[True]:7.3f} s   loop {timings[False]:7.3f} s   speed-up {timings[False] / timings[True]:.1f}x")


if __name__ == "__main__":
    main()
