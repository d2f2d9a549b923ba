"""Search the hyperparameters that the leaderboard's algorithms do not share with each other, on
validation data only, with a seed the leaderboard does not use.

    python benchmarks/leaderboard/tune.py            # prints every candidate's validation score and the choice

The score of a candidate is its validation accuracy after adaptation at the end of training
(``val/acc_post``: the validation clients for the unseen protocol, every client's validation part
for the local protocol; never the test clients or test parts), averaged over ``BENCHMARKS``. The
chosen values are then written into ``configs/algorithms/*.yaml`` by hand and recorded in
``tuning.json``. Everything the algorithms share (net, local learning rate, rounds, clients per
round, fine-tuning steps) is fixed by the benchmark configs and not searched.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from leaderboard import run_jobs  # noqa: E402

SEED = 100  # not one of the leaderboard's seeds
BENCHMARKS = ["synthetic_mlr", "synthetic_dnn", "digits_shards_local"]
GRIDS: dict[str, dict[str, list[float]]] = {
    "fedprox": {"mu": [0.001, 0.01, 0.1, 0.5, 1.0]},  # the grid FedProx's authors recommend
    "pfedme": {"lam": [0.5, 1.0, 5.0, 15.0], "lr": [0.01, 0.05, 0.1]},  # λ around the paper's 15-30 and below; η
}


def candidates(grid: dict[str, list[float]]) -> list[dict[str, float]]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def main() -> dict:
    jobs, keys = [], []
    for algorithm, grid in GRIDS.items():
        for values in candidates(grid):
            extra = [f"--model.{name}={value}" for name, value in values.items()]
            for bench in BENCHMARKS:
                jobs.append((bench, algorithm, SEED, False, extra))
                keys.append((algorithm, json.dumps(values)))
    scores: dict[tuple[str, str], list[float]] = {}
    for key, run in zip(keys, run_jobs(jobs, workers=2)):
        scores.setdefault(key, []).append(run["validation"]["val/acc_post"])
    report = {}
    for algorithm in GRIDS:
        table = {values: statistics.mean(s) for (a, values), s in scores.items() if a == algorithm}
        best = max(table, key=table.get)
        report[algorithm] = {"benchmarks": BENCHMARKS, "seed": SEED, "scores": table, "chosen": json.loads(best)}
        for values, score in table.items():
            print(f"{algorithm} {values}: mean val/acc_post {score:.4f}{'  <- chosen' if values == best else ''}")
    (HERE / "tuning.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
