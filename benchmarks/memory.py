"""Memory of one round vs inner steps (first- vs second-order MAML) and vs `client_chunk_size`.

Run:  python benchmarks/memory.py [--clients 64] [--hidden 256] [--shots 50]

Two measurements:
- graph: bytes the round's autograd graph saves for backward (lightning_metafed.diagnostics.
  graph_saved_bytes), exact and deterministic;
- peak: in a fresh subprocess per row, the growth of the resident set during the round
  (peak ``VmHWM`` minus RSS before; run with MALLOC_MMAP_THRESHOLD_=65536 so freed buffers leave
  the resident set) on CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
Workload: MLP 1-H-H-1, sinusoid clients with ``shots`` support and query examples, inner SGD.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch


def _vm_hwm() -> int:
    """This process's peak resident set (VmHWM). Unlike ``ru_maxrss``, it is not inherited from the
    parent process across fork + exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def child(args) -> None:
    from common import mlp, sinusoid_batch

    import lightning_metafed as lm
    from lightning_metafed.inner import SGD

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = lm.MAML(
        mlp(args.hidden), inner_optimizer=SGD(lr=0.001), inner_steps=args.steps, first_order=args.first_order,
        client_chunk_size=args.chunk, fast_path=args.path == "fast",
    ).to(device)
    batch = sinusoid_batch(args.clients, shots=args.shots).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as f:
            before = int(f.read().split()[1]) * resource.getpagesize()
    if args.path == "fast":
        model.round_gradients(batch)
    else:
        model.client_updates(batch)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _vm_hwm() - before
    print(json.dumps({"peak_mb": peak / 2**20, "device": device}))


def measure(**kw) -> float:
    cmd = [sys.executable, __file__, "--child"] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items() if v is not None]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--shots", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--first-order", type=lambda s: s == "True", default=False)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--path", choices=["fast", "explicit"], default="fast")
    args = parser.parse_args()
    if args.child:
        return child(args)
    common = dict(clients=args.clients, hidden=args.hidden, shots=args.shots)
    device = "cuda" if torch.cuda.is_available() else "cpu: RSS growth"
    print(f"one round, {args.clients} clients, hidden {args.hidden}, {args.shots}-shot; MB ({device} for peak)")
    print(f"{'inner steps':>11} | {'FOMAML graph':>12} {'MAML graph':>10} | {'FOMAML peak':>11} {'MAML peak':>9}")
    rows = {}
    for steps in (1, 5, 10, 20):
        g_fo, g_so = graph_mb(steps, True, None, **common), graph_mb(steps, False, None, **common)
        p_fo = measure(steps=steps, first_order=True, **common)
        p_so = measure(steps=steps, first_order=False, **common)
        rows[steps] = (g_fo, g_so, p_fo, p_so)
        print(f"{steps:>11} | {g_fo:>12.1f} {g_so:>10.1f} | {p_fo:>11.1f} {p_so:>9.1f}")
    ratio = [rows[20][i] / rows[1][i] for i in range(4)]
    print(f"20 steps / 1 step: FOMAML graph {ratio[0]:.2f}x, MAML graph {ratio[1]:.2f}x; FOMAML peak {ratio[2]:.2f}x, MAML peak {ratio[3]:.2f}x")
    big = dict(common, clients=args.clients * 2)
    print(f"\nsecond-order MAML, 5 steps, {big['clients']} clients, fast path: memory vs client_chunk_size")
    for chunk in (None, 64, 16, 4):
        graph = graph_mb(5, False, chunk, **big)
        print(f"  client_chunk_size={str(chunk):>4}: graph alive at once {graph:8.1f} MB, peak {measure(steps=5, chunk=chunk, **big):8.1f} MB")


def graph_mb(steps: int, first_order: bool, chunk: int | None, clients: int, hidden: int, shots: int) -> float:
    """Graph bytes alive at once: the whole round, or one chunk when chunked."""
    from common import mlp, sinusoid_batch

    import lightning_metafed as lm
    from lightning_metafed.diagnostics import graph_saved_bytes
    from lightning_metafed.inner import SGD

    model = lm.MAML(mlp(hidden), inner_optimizer=SGD(lr=0.001), inner_steps=steps, first_order=first_order)
    tasks = sinusoid_batch(chunk or clients, shots=shots).tasks()
    losses, _ = model.map_clients(model.client_objective, (model.meta_parameters(),), tasks)
    return graph_saved_bytes(losses.sum()) / 2**20


if __name__ == "__main__":
    main()
