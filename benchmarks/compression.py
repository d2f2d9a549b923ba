"""Accuracy against bytes uploaded: every compressor with FedAvg + FT, MAML and Per-FedAvg (FO) on
digits (2-class shards, unseen clients) and Synthetic(0.5, 0.5) (local protocol), mean over seeds.

    python benchmarks/compression.py                       # 3 seeds, 2 worker processes (~20 min on 2 cores)
    python benchmarks/compression.py --update-docs         # also rewrite the table of docs/reference/results.md and docs/compression.png
    python benchmarks/compression.py --smoke --seeds 0 --compressors none topk   # 3 rounds per row (the test suite)
    python benchmarks/compression.py --add --compressors topk1       # add rows to the results already measured

Each run is a leaderboard row (``benchmarks/leaderboard``: the same configs, rounds and protocol)
with ``--model.compressor`` added; "MB up" is everything the clients uploaded over the run (the
encoded bytes), "×" the reduction against the uncompressed run and "gap" the change in
post-adaptation test accuracy against it, in percentage points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "leaderboard"))
sys.path.insert(0, str(HERE))
from leaderboard import ROOT, Job, run_jobs  # noqa: E402
from tables import replace_section  # noqa: E402

CLASS = "lightning_metafed.compression."
COMPRESSORS: dict[str, tuple[str, str | None]] = {  # key: (label, compressor YAML or None)
    "none": ("float32 (none)", None),
    "bf16": ("BF16", f'{{"class_path": "{CLASS}BF16"}}'),
    "qsgd1": ("QSGD(s=1)", f'{{"class_path": "{CLASS}QSGD", "init_args": {{"levels": 1}}}}'),
    "qsgd3": ("QSGD(s=3)", f'{{"class_path": "{CLASS}QSGD", "init_args": {{"levels": 3}}}}'),
    "topk": ("TopK(5 %) + EF", f'{{"class_path": "{CLASS}TopK", "init_args": {{"fraction": 0.05}}}}'),
    "topk_noef": ("TopK(5 %), no EF", f'{{"class_path": "{CLASS}TopK", "init_args": {{"fraction": 0.05, "error_feedback": false}}}}'),
    "topk1": ("TopK(1 %) + EF", f'{{"class_path": "{CLASS}TopK", "init_args": {{"fraction": 0.01}}}}'),
    "topk1_noef": ("TopK(1 %), no EF", f'{{"class_path": "{CLASS}TopK", "init_args": {{"fraction": 0.01, "error_feedback": false}}}}'),
    "randk": ("RandK(5 %)", f'{{"class_path": "{CLASS}RandK", "init_args": {{"fraction": 0.05}}}}'),
    "sign": ("SignSGD + EF", f'{{"class_path": "{CLASS}SignSGD"}}'),
}
BENCHMARKS = {"digits_shards": "Digits 2-class, unseen", "synthetic_dnn": "Synthetic(0.5, 0.5), local"}
ALGORITHMS = {"fedavg": "FedAvg + FT", "maml": "MAML", "perfedavg_fo": "Per-FedAvg FO"}
START, END = "<!-- compression:start -->", "<!-- compression:end -->"


def jobs(benchmarks: list[str], algorithms: list[str], compressors: list[str], seeds: list[int], smoke: bool) -> list[tuple[str, Job]]:
    out = []
    for bench in benchmarks:
        for algorithm in algorithms:
            for key in compressors:
                spec = COMPRESSORS[key][1]
                extra = ("--trainer.limit_val_batches=0",) + (() if spec is None else (f"--model.compressor={spec}",))
                out += [(key, Job(bench, algorithm, seed, smoke, extra)) for seed in seeds]
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, float]]:
    """``{(benchmark, algorithm, compressor): {acc, std, mb, seeds}}``, means over seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["benchmark"], run["algorithm"], run["compressor"]), []).append(run)
    out = {}
    for key, group in groups.items():
        accs = [r["tests"][""]["test/acc_post"] for r in group]
        out[key] = {"acc": statistics.mean(accs), "std": statistics.pstdev(accs), "mb": statistics.mean(r["upload_mb"] for r in group), "seeds": len(group)}
    return out


def table(summary: dict[tuple[str, str, str], dict[str, float]]) -> str:
    lines = []
    for bench, bench_label in BENCHMARKS.items():
        algorithms = [a for a in ALGORITHMS if (bench, a, "none") in summary]
        if not algorithms:
            continue
        lines += [f"**{bench_label}**: post-adaptation test accuracy (gap to float32, pp) · MB uploaded (× fewer)", ""]
        lines += ["| compressor | " + " | ".join(ALGORITHMS[a] for a in algorithms) + " |", "|---|" + "---|" * len(algorithms)]
        for key, (label, _) in COMPRESSORS.items():
            cells = []
            for a in algorithms:
                row, base = summary.get((bench, a, key)), summary[(bench, a, "none")]
                if row is None:
                    cells.append("n/a")
                    continue
                gap = "" if key == "none" else f" ({100 * (row['acc'] - base['acc']):+.1f})"
                ratio = "" if key == "none" else f" ({base['mb'] / row['mb']:.1f}×)"
                cells.append(f"{row['acc']:.3f} ± {row['std']:.3f}{gap} · {row['mb']:.2f} MB{ratio}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(summary: dict[tuple[str, str, str], dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BENCHMARKS), figsize=(6 * len(BENCHMARKS), 4.2), squeeze=False)
    markers = dict(zip(COMPRESSORS, "osv^D<>pXh"))
    for ax, (bench, bench_label) in zip(axes[0], BENCHMARKS.items()):
        for color, (algorithm, algorithm_label) in zip(("C0", "C1", "C2"), ALGORITHMS.items()):
            for key, (label, _) in COMPRESSORS.items():
                row = summary.get((bench, algorithm, key))
                if row is not None:
                    ax.scatter(row["mb"], row["acc"], color=color, marker=markers[key], s=40, label=f"{algorithm_label}: {label}")
        ax.set_xscale("log")
        ax.set(title=bench_label, xlabel="MB uploaded over the run (log)", ylabel="post-adaptation test accuracy")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color="gray", marker=markers[k], linestyle="", label=label) for k, (label, _) in COMPRESSORS.items()]
    handles += [plt.Line2D([], [], color=c, marker="o", linestyle="", label=a) for c, a in zip(("C0", "C1", "C2"), ALGORITHMS.values())]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), default=list(ALGORITHMS))
    parser.add_argument("--compressors", nargs="+", choices=list(COMPRESSORS), default=list(COMPRESSORS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="3 rounds per row (for tests)")
    parser.add_argument("--out", type=Path, default=HERE / "compression_results.json")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the table of docs/reference/results.md and docs/compression.png")
    parser.add_argument("--render-only", action="store_true", help="the table (and figure) from OUT")
    parser.add_argument("--add", action="store_true", help="keep OUT's runs and run only the (benchmark, algorithm, compressor, seed) it lacks")
    args = parser.parse_args(argv)
    if args.render_only:
        runs = json.loads(args.out.read_text())["runs"]
    else:
        if "none" not in args.compressors:
            args.compressors.insert(0, "none")  # the reference every gap and ratio is measured against
        kept = json.loads(args.out.read_text())["runs"] if args.add and args.out.exists() else []
        done = {(r["benchmark"], r["algorithm"], r["compressor"], r["seed"]) for r in kept}
        todo = [(key, job) for key, job in jobs(args.benchmarks, args.algorithms, args.compressors, args.seeds, args.smoke)
                if (job.benchmark, job.algorithm, key, job.seed) not in done]
        runs = kept + [{**run, "compressor": key} for (key, _), run in zip(todo, run_jobs([job for _, job in todo], args.workers))]
        args.out.write_text(json.dumps({"seeds": sorted({r["seed"] for r in runs}), "smoke": args.smoke, "runs": runs}, indent=1))
    summary = summarize(runs)
    text = table(summary)
    print(text)
    if args.update_docs:
        figure(summary, ROOT / "docs" / "compression.png")
        replace_section(ROOT / "docs" / "reference" / "results.md", START, END, text)
    return {"runs": runs, "summary": summary}


if __name__ == "__main__":
    main()
