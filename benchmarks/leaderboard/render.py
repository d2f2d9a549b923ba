"""The leaderboard's tables and figure from its ``results.json`` (see ``leaderboard.py``)."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

from leaderboard import ALGORITHMS, BENCHMARKS, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from tables import cell, replace_section  # noqa: E402

START, END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"
README = ROOT / "README.md"


def rows(results: dict[str, Any]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{benchmark: {row label: {before, after, worst10, mb, ms: [value per seed]}}}`` in table order;
    a row's "before" is its model without adaptation, "after" after the benchmark's fine-tuning."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in results["runs"]:
        bench, algorithm = BENCHMARKS[run["benchmark"]], next(a for a in ALGORITHMS if a.config == run["algorithm"])
        metric = bench.metric
        tests = [(algorithm.label, run["tests"][""])]
        if algorithm.global_label:
            tests.insert(0, (algorithm.global_label, run["tests"][""]))
        if algorithm.finetune_label:
            tests.append((algorithm.finetune_label, run["tests"]["finetune"]))
        for label, test in tests:
            stage = "pre" if label == algorithm.global_label else "post"
            row = table.setdefault(run["benchmark"], {}).setdefault(label, {k: [] for k in ("before", "after", "worst10", "mb", "ms")})
            row["before"].append(test[f"test/{metric}_pre"])
            row["after"].append(test[f"test/{metric}_{stage}"])
            if stage == "post":  # worst-client statistics are of the adapted models
                row["worst10"].append(test[f"test/{metric}_post_worst10"])
            row["mb"].append(run["mb_per_round"])
            row["ms"].append(run["ms_per_round"])
    return table


def row_labels() -> list[str]:
    labels = []
    for algorithm in ALGORITHMS:
        labels += [label for label in (algorithm.global_label, algorithm.label, algorithm.finetune_label) if label]
    return labels


def matrix(results: dict[str, Any]) -> str:
    """One line per algorithm, one column per benchmark: the score after adaptation, mean ± std."""
    table, names = rows(results), [b for b in BENCHMARKS if b in results["benchmarks"]]
    lines = [
        "| algorithm | " + " | ".join(BENCHMARKS[n].label for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label in row_labels():
        cells = [cell(table[n][label]["after"]) if label in table.get(n, {}) else "n/a" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def details(results: dict[str, Any]) -> str:
    """Per benchmark: before and after adaptation, worst 10 % of clients after, MB and ms per round."""
    table, out = rows(results), []
    for name in (b for b in BENCHMARKS if b in results["benchmarks"]):
        bench = BENCHMARKS[name]
        score = "MSE" if bench.metric == "loss" else "accuracy"
        worst = "worst 10 % (highest MSE)" if bench.metric == "loss" else "worst 10 % of clients"
        out += [f"### {bench.label}", "", f"| algorithm | {score} before | {score} after | {worst} after | MB / round | ms / round |",
                "|---|---|---|---|---|---|"]
        for label in (lbl for lbl in row_labels() if lbl in table.get(name, {})):
            r = table[name][label]
            out.append(f"| {label} | {cell(r['before'])} | {cell(r['after'])} | {cell(r['worst10']) if r['worst10'] else '—'} | "
                       f"{statistics.mean(r['mb']):.3f} | {_ms(r['ms'])} |")
        out.append("")
    return "\n".join(out)


def _ms(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{statistics.mean(finite):.1f}" if finite else "—"


def header(results: dict[str, Any]) -> str:
    return (f"Measured {results['date']} on {results['machine']}, 2-core CPU; mean ± std (population) over "
            f"{len(results['seeds'])} seeds {results['seeds']}; the whole run took {results['minutes']:.1f} minutes. Regenerate with "
            "`python benchmarks/leaderboard/leaderboard.py --update-readme`.\n")


def figure(results: dict[str, Any], path: Path) -> Path:
    """One panel per benchmark: every row's score after adaptation, mean ± std over seeds (a row
    that diverged is marked, a row that does not apply is left empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, names = rows(results), [b for b in BENCHMARKS if b in results["benchmarks"]]
    labels = row_labels()
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names) + 1.5, 0.26 * len(labels) + 1.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        finite = {label: [v for v in r["after"] if math.isfinite(v)] for label, r in table.get(name, {}).items()}
        present = [label for label in labels if finite.get(label)]
        means = [statistics.mean(finite[label]) for label in present]
        color = "tab:blue" if BENCHMARKS[name].metric == "acc" else "tab:orange"
        ax.errorbar(means, [labels.index(label) for label in present], xerr=[statistics.pstdev(finite[label]) for label in present],
                    fmt="o", color=color, markersize=4, capsize=2)
        for label in (lbl for lbl in labels if lbl in finite and not finite[lbl]):
            ax.text(0.02, labels.index(label), "diverged", transform=ax.get_yaxis_transform(), fontsize=6, va="center", color="tab:red")
        ax.set_title(BENCHMARKS[name].label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels)), labels)
    axes[0][0].invert_yaxis()
    fig.suptitle("After adaptation, mean ± std over seeds: accuracy (blue, higher is better) or MSE (orange, lower is better)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict[str, Any], out: Path, figure_path: Path, update_readme: bool) -> str:
    """Print the matrix, write ``OUT/leaderboard.md`` (all tables) and the figure; optionally the README."""
    text = header(results) + "\n" + matrix(results)
    print(text)
    (out / "leaderboard.md").write_text("# Leaderboard: every table\n\n" + header(results) + "\n" + details(results))
    print(f"wrote {out / 'leaderboard.md'} and {figure(results, figure_path)}", file=sys.stderr)
    if update_readme:
        replace_section(README, START, END, text)
    return text
