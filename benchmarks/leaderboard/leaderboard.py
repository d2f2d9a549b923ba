"""The personalization leaderboard: every algorithm on every benchmark, the same protocol for all,
mean ± std over seeds.

    python benchmarks/leaderboard/leaderboard.py --update-readme          # 3 seeds, 2 worker processes (~30 min on 2 cores)
    python benchmarks/leaderboard/leaderboard.py --only synthetic_mlr --seeds 0     # one column, one seed
    python benchmarks/leaderboard/leaderboard.py --render-only --update-readme      # tables and figure from results.json
    python benchmarks/leaderboard/leaderboard.py --smoke --out /tmp/lb              # 3 rounds per row (the test suite)
    python benchmarks/leaderboard/leaderboard.py --commands                         # print every row's `metafed fit` command

A row is ``metafed fit --config configs/algorithms/<algorithm>.yaml --config configs/benchmarks/<benchmark>.yaml``
(plus ``--seed_everything``/``--data.seed`` and, for the MLR column, the linear net): the benchmark file
holds everything the algorithms share (net, task, local and fine-tuning optimizer, fine-tuning steps,
data, rounds), the algorithm file only the algorithm's own hyperparameters. Every row is tested on
the benchmark's test clients (unseen protocol) or on every client's held-out test part (local
protocol) after training: "before" is the model a client has without adapting (the global model, or
its own stored state), "after" is after the benchmark's fine-tuning steps on its support set.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import multiprocessing
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
MLR = '--model.net={"class_path": "torch.nn.Linear", "init_args": {"in_features": 60, "out_features": 10}}'


@dataclass(frozen=True)
class Benchmark:
    label: str
    config: str
    metric: str  # "acc" (higher is better) or "loss" (MSE: lower is better)
    overrides: tuple[str, ...] = ()
    one_layer: bool = False  # the net has no body: body/head methods do not apply


@dataclass(frozen=True)
class Algorithm:
    label: str
    config: str
    lr_argument: str | None = None  # its local lr argument, set to the benchmark's shared lr
    needs_body: bool = False
    global_label: str | None = None  # its "before" (the global model) is also a row of its own
    finetune_label: str | None = None  # also tested with plain fine-tuning, as this row


BENCHMARKS: dict[str, Benchmark] = {
    "sinusoid": Benchmark("Sinusoid (MSE ↓), unseen", "sinusoid", "loss"),
    "synthetic_mlr": Benchmark("Synthetic MLR, local", "synthetic", "acc", (MLR,), one_layer=True),
    "synthetic_dnn": Benchmark("Synthetic DNN, local", "synthetic", "acc"),
    "digits_dirichlet": Benchmark("Digits Dir(0.5), unseen", "digits_dirichlet", "acc"),
    "digits_dirichlet_local": Benchmark("Digits Dir(0.5), local", "digits_dirichlet_local", "acc"),
    "digits_shards": Benchmark("Digits 2-class, unseen", "digits_shards", "acc"),
    "digits_shards_local": Benchmark("Digits 2-class, local", "digits_shards_local", "acc"),
}

ALGORITHMS: list[Algorithm] = [
    Algorithm("MAML", "maml"),
    Algorithm("FOMAML", "fomaml"),
    Algorithm("Meta-SGD", "metasgd"),
    Algorithm("ANIL", "anil", needs_body=True),
    Algorithm("Reptile", "reptile"),
    Algorithm("Per-FedAvg FO", "perfedavg_fo", lr_argument="outer_lr"),
    Algorithm("Per-FedAvg HF", "perfedavg_hf", lr_argument="outer_lr"),
    Algorithm("FedAvg + FT", "fedavg", global_label="FedAvg"),
    Algorithm("FedProx + FT", "fedprox", global_label="FedProx"),
    Algorithm("FedBABU", "fedbabu", needs_body=True),
    Algorithm("pFedMe (PM)", "pfedme", global_label="pFedMe (GM)", finetune_label="pFedMe + FT"),
    Algorithm("FedPer", "fedper", needs_body=True),
    Algorithm("FedRep", "fedrep", needs_body=True),
    Algorithm("Ditto", "ditto"),
    Algorithm("APFL", "apfl", lr_argument="local_lr"),
    Algorithm("SCAFFOLD", "scaffold", lr_argument="local_lr"),
]


@dataclass(frozen=True)
class Job:
    """One training run: a row (benchmark, algorithm) with one seed, extra CLI arguments, and whether
    to test it (tuning does not look at test data)."""

    benchmark: str
    algorithm: str
    seed: int
    smoke: bool = False
    extra: tuple[str, ...] = ()
    test: bool = True


def applies(algorithm: Algorithm, benchmark: Benchmark) -> bool:
    return not (algorithm.needs_body and benchmark.one_layer)


def shared_lr(benchmark: Benchmark) -> float:
    """The benchmark's local learning rate (its ``inner_optimizer``'s ``lr``)."""
    import yaml

    spec = yaml.safe_load((CONFIGS / "benchmarks" / f"{benchmark.config}.yaml").read_text())
    return float(spec["model"]["init_args"]["inner_optimizer"]["init_args"]["lr"])


def fit_arguments(algorithm: Algorithm, benchmark: Benchmark, seed: int) -> list[str]:
    """The ``metafed fit`` arguments of one row and seed (relative to the repository root)."""
    args = [
        "--config", f"benchmarks/leaderboard/configs/algorithms/{algorithm.config}.yaml",
        "--config", f"benchmarks/leaderboard/configs/benchmarks/{benchmark.config}.yaml",
        *benchmark.overrides,
    ]
    if algorithm.lr_argument:
        args.append(f"--model.{algorithm.lr_argument}={shared_lr(benchmark)}")
    return [*args, f"--seed_everything={seed}", f"--data.seed={seed}"]


def _quiet_arguments(scratch: str, smoke: bool) -> list[str]:
    args = [
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0", f"--trainer.default_root_dir={scratch}",
    ]
    if smoke:
        args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
                 "--trainer.limit_test_batches=1"]
    return args


def _fit_and_test(cli: Any, algorithm: Algorithm, test: bool) -> tuple[float, dict[str, float], dict[str, dict[str, float]]]:
    """Fit seconds, the last validation metrics and the test metrics (``""``; ``"finetune"`` as well
    for an algorithm with a fine-tuning row; none without ``test``)."""
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    validation = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    tests = {"": cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]} if test else {}
    if test and algorithm.finetune_label:  # the same trained model, personalized by plain fine-tuning
        cli.model.personalization = "finetune"
        tests["finetune"] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return seconds, validation, {name: {k: float(v) for k, v in t.items()} for name, t in tests.items()}


def run_row(job: Job) -> dict[str, Any]:
    """Fit and test one row with one seed (in a worker process): test metrics, MB and ms per round.
    A row whose training diverges (every upload non-finite, or the server step) is recorded with NaN
    metrics and the error, and shows as "diverged" in the tables."""
    from lightning_metafed import NonFiniteRoundError
    from lightning_metafed.cli import build_cli

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    algorithm, metric = next(a for a in ALGORITHMS if a.config == job.algorithm), BENCHMARKS[job.benchmark].metric
    error = None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), tempfile.TemporaryDirectory() as scratch:
        warnings.simplefilter("ignore")
        args = [*fit_arguments(algorithm, BENCHMARKS[job.benchmark], job.seed), *_quiet_arguments(scratch, job.smoke), *job.extra]
        args = [str(ROOT / a) if flag == "--config" else a for flag, a in zip(["", *args], args)]  # from any directory
        cli = build_cli(args, run=False)
        try:
            seconds, validation, tests = _fit_and_test(cli, algorithm, job.test)
        except NonFiniteRoundError as caught:
            error, seconds, validation = str(caught), math.nan, {}
            nan = {f"test/{metric}_{stage}": math.nan for stage in ("pre", "post", "post_worst10")}
            tests = {name: dict(nan) for name in ("", "finetune")[: 1 + bool(algorithm.finetune_label)]} if job.test else {}
    comm, rounds = cli.model.communication, max(cli.trainer.global_step, 1)
    return {
        "benchmark": job.benchmark, "algorithm": job.algorithm, "seed": job.seed, "rounds": cli.trainer.global_step,
        "ms_per_round": 1000 * seconds / rounds, "mb_per_round": (comm["download_bytes"] + comm["upload_bytes"]) / 1e6 / rounds,
        "upload_mb": comm["upload_bytes"] / 1e6,
        "error": error, "validation": validation, "tests": tests,
    }


def jobs_for(benchmarks: list[str], seeds: list[int], smoke: bool, extra: tuple[str, ...] = ()) -> list[Job]:
    """``run_row``'s jobs: every applicable (benchmark, algorithm, seed), benchmark by benchmark."""
    return [
        Job(name, algorithm.config, seed, smoke, tuple(extra))
        for name in benchmarks
        for algorithm in ALGORITHMS
        if applies(algorithm, BENCHMARKS[name])
        for seed in seeds
    ]


def run_jobs(jobs: list[Job], workers: int) -> list[dict[str, Any]]:
    """Every job, in order; ``workers`` processes (one torch thread each) or in this process."""
    if workers <= 1:
        return [run_row(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(run_row, jobs, chunksize=1)


def run_leaderboard(benchmarks: list[str], seeds: list[int], smoke: bool, workers: int) -> dict[str, Any]:
    start = time.perf_counter()
    # No validation during training: ms per round is the rounds alone (tune.py validates).
    runs = run_jobs(jobs_for(benchmarks, seeds, smoke, ("--trainer.limit_val_batches=0",)), workers)
    return {
        "machine": f"{platform.machine()}, {workers} worker process(es) of 1 torch thread, Python "
        f"{platform.python_version()}, torch {torch.__version__}",
        "date": date.today().isoformat(), "seeds": seeds, "smoke": smoke, "benchmarks": benchmarks,
        "minutes": (time.perf_counter() - start) / 60, "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    import render

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="processes running rows in parallel (1 torch thread each)")
    parser.add_argument("--smoke", action="store_true", help="3 rounds per row (for tests)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder of results.json and leaderboard.md")
    parser.add_argument("--figure", type=Path, default=None, help="the PNG (default: docs/leaderboard.png)")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the README's leaderboard section")
    parser.add_argument("--render-only", action="store_true", help="tables and figure from OUT/results.json")
    parser.add_argument("--commands", action="store_true", help="print each row's metafed command and exit")
    args = parser.parse_args(argv)
    if args.commands:
        for job in jobs_for(args.only, args.seeds[:1], False):
            algorithm = next(a for a in ALGORITHMS if a.config == job.algorithm)
            arguments = fit_arguments(algorithm, BENCHMARKS[job.benchmark], job.seed)
            print("metafed fit " + " ".join(f"'{a}'" if " " in a else a for a in arguments))
        return {}
    if args.render_only:
        results = json.loads((args.out / "results.json").read_text())
    else:
        results = run_leaderboard(args.only, args.seeds, args.smoke, args.workers)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    render.write_all(results, args.out, args.figure or ROOT / "docs" / "leaderboard.png", args.update_readme)
    return results


if __name__ == "__main__":
    main()
