"""This checkout's round vs the same round at an earlier git revision, interleaved in one process.

Run:  python benchmarks/versus_revision.py --rev d6e5f47 [--clients 8 32 128] [--repeats 60]

The package at ``--rev`` is exported with ``git archive`` into a temporary folder and imported under
another name (``lightning_metafed_rev``), so both versions run side by side: every repeat times the
old and the new module in turn, on the same batch and the same starting parameters. Columns are
medians (ms) of a full round (``round_gradients``: the fast path for MAML) and of the explicit
per-client uploads (``client_updates``), and new/old ratios. The two versions' aggregates are checked
to be equal.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import median_ms, mlp, sinusoid_batch

import lightning_metafed as lm

ROOT = Path(__file__).resolve().parents[1]
OLD = "lightning_metafed_rev"


def import_revision(rev: str, into: Path):
    """The package at ``rev``, importable as ``lightning_metafed_rev``."""
    archive = subprocess.run(["git", "archive", rev, "lightning_metafed"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "lightning_metafed").rename(into / OLD)
    for path in (into / OLD).rglob("*.py"):
        path.write_text(path.read_text().replace("lightning_metafed", OLD))
    sys.path.insert(0, str(into))
    return importlib.import_module(OLD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the git revision to compare with")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = import_revision(args.rev, Path(tmp))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; new = this checkout, old = {args.rev}")
        print(f"{'m':>4} | {'round old':>9} {'new':>7} {'new/old':>7} | {'updates old':>11} {'new':>7} {'new/old':>7} | max|Δ|")
        for m in args.clients:
            batch = sinusoid_batch(m)
            old_batch = old.TaskBatch(**{k: getattr(batch, k) for k in batch.__dataclass_fields__})
            new_model = lm.MAML(mlp(), inner_optimizer=lm.inner.SGD(lr=0.01), inner_steps=5)
            old_model = old.MAML(mlp(), inner_optimizer=old.inner.SGD(lr=0.01), inner_steps=5)
            want, _ = old_model.round_gradients(old_batch)
            got, _ = new_model.round_gradients(batch)
            diff = max(float((got[k] - want[k]).abs().max()) for k in want)
            times: dict[str, list[float]] = {"round_old": [], "round_new": [], "upd_old": [], "upd_new": []}
            for _ in range(args.repeats):  # interleaved, so a slow moment of the machine hits both
                times["round_old"].append(median_ms(lambda: old_model.round_gradients(old_batch), 1, warmup=0))
                times["round_new"].append(median_ms(lambda: new_model.round_gradients(batch), 1, warmup=0))
                times["upd_old"].append(median_ms(lambda: old_model.client_updates(old_batch), 1, warmup=0))
                times["upd_new"].append(median_ms(lambda: new_model.client_updates(batch), 1, warmup=0))
            t = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            print(
                f"{m:>4} | {t['round_old']:>9.2f} {t['round_new']:>7.2f} {t['round_new'] / t['round_old']:>7.3f} | "
                f"{t['upd_old']:>11.2f} {t['upd_new']:>7.2f} {t['upd_new'] / t['upd_old']:>7.3f} | {diff:.1e}"
            )


if __name__ == "__main__":
    main()
