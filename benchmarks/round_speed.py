"""Speed of one communication round: ours vs `higher`, a plain autograd loop and raw torch.func.

Run:  python benchmarks/round_speed.py [--clients 8 32 128] [--repeats 20] [--compile]

Workload (the sinusoid benchmark): MLP 1-40-40-1, 10 support + 10 query examples per client, 5
second-order SGD inner steps (lr 0.01), a mean aggregator. Times are medians over repeats, measured
side by side in one process; every implementation's gradients are checked against ours.

Columns:
  ours_round    a full round through the module: client updates (fast path) + aggregation + server step
  ours_updates  module.client_updates(batch): every client's explicit upload [m, *shape]
  higher        the same round written with `higher`, one innerloop_ctx per client
  loop          a Python loop over clients with plain autograd
  vmap_mean     raw floor: vmap(task_loss)(...).mean().backward()
  vmap_grad     raw floor: vmap(grad(task_loss)) (per-client meta-gradients)
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from common import (
    higher_loop_grads,
    max_diff,
    median_ms,
    mlp,
    plain_loop_grads,
    raw_vmap_mean_grads,
    raw_vmap_per_client_grads,
    sinusoid_batch,
)

import lightning_metafed as lm
from lightning_metafed.inner import SGD

ALPHA, STEPS = 0.01, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time MAML(compile_clients=True)")
    args = parser.parse_args()
    compiled_rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    header = f"{'m':>4} | {'ours_round':>10} {'ours_updates':>12} {'higher':>8} {'loop':>8} {'vmap_mean':>9} {'vmap_grad':>9} (ms)"
    header += " | higher/ours loop/ours ours/vmap_mean | updates/vmap_grad higher/updates | max|Δgrad|"
    print(header)
    for m in args.clients:
        batch = sinusoid_batch(m)
        model = lm.MAML(mlp(), inner_optimizer=SGD(lr=ALPHA), inner_steps=STEPS)
        server = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0 keeps θ fixed across repeats

        def ours_round():
            server.zero_grad()
            model.round_gradients(batch)
            server.step()

        net = model.net
        ours_round()
        reference = {k[len("net.") :]: p.grad.clone() for k, p in model.named_parameters()}
        per_client = model.client_updates(batch)
        per_client_mean = {k[len("net.") :]: u.mean(0) for k, u in per_client.items()}
        diffs = [
            max_diff(reference, per_client_mean),
            max_diff(reference, higher_loop_grads(net, batch, ALPHA, STEPS)),
            max_diff(reference, plain_loop_grads(net, batch, ALPHA, STEPS)),
            max_diff(reference, raw_vmap_mean_grads(net, batch, ALPHA, STEPS)),
            max_diff(reference, {k: g.mean(0) for k, g in raw_vmap_per_client_grads(net, batch, ALPHA, STEPS).items()}),
        ]
        r = args.repeats
        t = {
            "ours_round": median_ms(ours_round, r),
            "ours_updates": median_ms(lambda: model.client_updates(batch), r),
            "higher": median_ms(lambda: higher_loop_grads(net, batch, ALPHA, STEPS), max(3, r // 4)),
            "loop": median_ms(lambda: plain_loop_grads(net, batch, ALPHA, STEPS), max(3, r // 4)),
            "vmap_mean": median_ms(lambda: raw_vmap_mean_grads(net, batch, ALPHA, STEPS), r),
            "vmap_grad": median_ms(lambda: raw_vmap_per_client_grads(net, batch, ALPHA, STEPS), r),
        }
        if args.compile:
            fast = lm.MAML(mlp(), inner_optimizer=SGD(lr=ALPHA), inner_steps=STEPS, compile_clients=True)
            start = time.perf_counter()
            fast.round_gradients(batch)
            compile_s = time.perf_counter() - start
            grads = {k[len("net.") :]: p.grad.clone() for k, p in fast.named_parameters()}
            diffs.append(max_diff(reference, grads))
            compiled_ms = median_ms(lambda: fast.round_gradients(batch), r)
            compiled_rows.append((m, compiled_ms, t["ours_round"], compile_s))
        print(
            f"{m:>4} | {t['ours_round']:>10.2f} {t['ours_updates']:>12.2f} {t['higher']:>8.2f} {t['loop']:>8.2f} "
            f"{t['vmap_mean']:>9.2f} {t['vmap_grad']:>9.2f}      | "
            f"{t['higher'] / t['ours_round']:>11.1f} {t['loop'] / t['ours_round']:>9.1f} {t['ours_round'] / t['vmap_mean']:>15.2f} | "
            f"{t['ours_updates'] / t['vmap_grad']:>17.2f} {t['higher'] / t['ours_updates']:>15.1f} | {max(diffs):.1e}"
        )


    for m, compiled_ms, eager_ms, compile_s in compiled_rows:
        print(f"compile_clients=True, m={m}: {compiled_ms:.2f} ms/round (eager {eager_ms:.2f}, {eager_ms / compiled_ms:.1f}x), compiled once in {compile_s:.0f} s")


if __name__ == "__main__":
    main()
