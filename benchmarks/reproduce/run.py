"""Reproduce the literature's headline comparisons: train and test every row over several seeds,
print the results tables, save them as JSON and the plots as PNG.

    python benchmarks/reproduce/run.py                      # all experiments, 3 seeds (~15 min on 2 cores)
    python benchmarks/reproduce/run.py --only sinusoid      # one experiment
    python benchmarks/reproduce/run.py --only personalized --merge --update-docs   # rerun one, keep the others
    python benchmarks/reproduce/run.py --update-docs        # also rewrite the results section of docs/reference/results.md
    python benchmarks/reproduce/run.py --render-only --update-docs     # tables/plots from results.json
    python benchmarks/reproduce/run.py --smoke --out /tmp/smoke   # a few rounds per row (the test suite)

Every row is a YAML config of the ``metafed`` CLI (``configs/`` or ``benchmarks/reproduce/configs/``)
plus overrides, run through the same CLI parser with ``--seed_everything`` and ``--data.seed`` set to
the seed, so a row can also be rerun by hand with ``metafed fit``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tables import cell as _cell, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS_PAGE = ROOT / "docs" / "reference" / "results.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"

MLR = '--model.net={"class_path": "torch.nn.Linear", "init_args": {"in_features": 60, "out_features": 10}}'
DIGITS = str(HERE / "configs" / "digits_shards.yaml")
DIGITS_LOCAL = str(HERE / "configs" / "digits_shards_local.yaml")
#: Validation accuracy (post-adaptation, new clients) whose first crossing the digits table reports.
DIGITS_TARGET = 0.9


@dataclass
class Row:
    """One trained model: ``label`` in the table; a FedAvg row also gives the ``+ FT`` row."""

    label: str
    configs: list[str]
    overrides: list[str] = field(default_factory=list)
    fedavg: bool = False


EXPERIMENTS: dict[str, dict[str, Any]] = {
    "sinusoid": {
        "title": "Sinusoid regression, 10-shot, held-out clients: test MSE after k adaptation steps",
        "metric": "loss",
        "common": ["--model.eval_inner_steps=10"],
        "rows": [
            Row("MAML", ["configs/sinusoid/maml.yaml"]),
            Row("FOMAML", ["configs/sinusoid/fomaml.yaml"]),
            Row("Meta-SGD", ["configs/sinusoid/metasgd.yaml"]),
            Row("Reptile", ["configs/sinusoid/reptile.yaml"]),
            Row("FedAvg", ["benchmarks/reproduce/configs/sinusoid_fedavg.yaml"], fedavg=True),
            # One full-batch local step: FedSGD, i.e. joint training on all clients (Finn et al.'s "pretrained" baseline).
            Row("FedAvg (1 local step)", ["benchmarks/reproduce/configs/sinusoid_fedavg.yaml"], ["--model.local_epochs=1"], fedavg=True),
        ],
    },
    "synthetic": {
        "title": "Synthetic(0.5, 0.5), 100 clients, local protocol: personalized test accuracy",
        "metric": "acc",
        "common": [],
        "rows": [
            Row(f"{name} {model}", [config], [MLR] if model == "MLR" else [], fedavg=name == "FedAvg")
            for model in ("MLR", "DNN")
            for name, config in (
                ("FedAvg", "configs/synthetic/fedavg.yaml"),
                ("Per-FedAvg FO", "configs/synthetic/perfedavg_fo.yaml"),
                ("Per-FedAvg HF", "configs/synthetic/perfedavg_hf.yaml"),
                ("MAML", "configs/synthetic/maml.yaml"),
                ("Reptile", "benchmarks/reproduce/configs/synthetic_reptile.yaml"),
            )
        ],
    },
    "personalized": {
        "title": "Synthetic(0.5, 0.5), 100 clients, local protocol, DNN (60-20-10): algorithms with per-client state",
        "metric": "acc",
        "common": [],
        "rows": [
            Row(name, [f"configs/synthetic/{config}.yaml"])
            for name, config in (
                ("FedPer", "fedper"), ("FedRep", "fedrep"), ("Ditto", "ditto"), ("APFL", "apfl"), ("SCAFFOLD", "scaffold"),
            )
        ],
    },
    "digits_local": {
        "title": "Digits 8×8, 100 two-class clients (shards), local protocol: personalized test accuracy",
        "metric": "acc",
        "common": [],
        "rows": [
            Row("FedAvg", ["configs/digits/fedavg.yaml", DIGITS_LOCAL], fedavg=True),
            Row("FedRep", ["configs/digits/fedrep.yaml", DIGITS_LOCAL]),
        ],
    },
    "digits": {
        "title": "Digits 8×8, 100 two-class clients, unseen clients: accuracy of new clients and communication",
        "metric": "acc",
        "common": [],
        "rows": [
            Row("FedAvg", ["configs/digits/fedavg.yaml", DIGITS], fedavg=True),
            Row("MAML", ["configs/digits/maml.yaml", DIGITS]),
            Row("FOMAML", ["configs/digits/maml.yaml", DIGITS], ["--model.first_order=true"]),
            Row("Meta-SGD", ["configs/digits/maml.yaml", DIGITS], ["--model.class_path=lightning_metafed.MetaSGD"]),
            Row("ANIL", ["configs/digits/anil.yaml", DIGITS]),
        ],
    },
}


class History(pl.Callback):
    """Bytes communicated and post-adaptation validation metrics at every validation."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, module: Any) -> None:  # after the epoch's metrics are logged
        if trainer.sanity_checking:
            return
        comm = module.communication
        point = {"round": trainer.global_step, "mb": (comm["download_bytes"] + comm["upload_bytes"]) / 1e6}
        for key in ("val/acc_post", "val/loss_post"):
            if key in trainer.callback_metrics:
                point[key] = float(trainer.callback_metrics[key])
        self.points.append(point)


def train_and_test(row: Row, common: list[str], seed: int, smoke: bool) -> dict[str, Any]:
    """Fit and test one row with one seed; returns its curves, metrics, communication and time."""
    from lightning_metafed.cli import build_cli

    args = ["fit"]
    for config in row.configs:
        args += ["--config", str(ROOT / config)]
    args += [
        *common, *row.overrides, f"--seed_everything={seed}", f"--data.seed={seed}", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0",
    ]
    if smoke:
        args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=30", "--trainer.limit_val_batches=1"]
    start = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), tempfile.TemporaryDirectory() as scratch:
        warnings.simplefilter("ignore")
        # The CLI saves its config.yaml under default_root_dir: keep it out of the working directory.
        cli = build_cli([*args[1:], f"--trainer.default_root_dir={scratch}"], run=False)
        history = History()
        cli.trainer.callbacks.append(history)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    comm = cli.model.communication
    return {
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "rounds": cli.trainer.global_step,
        "test": {k: float(v) for k, v in results.items()},
        "mb": (comm["download_bytes"] + comm["upload_bytes"]) / 1e6,
        "history": history.points,
    }


def curve(run: dict[str, Any], metric: str) -> list[float]:
    test = run["test"]
    return [test[f"test/{metric}_step{k}"] for k in range(sum(key.startswith(f"test/{metric}_step") for key in test))]


def mb_to_target(run: dict[str, Any]) -> float | None:
    """MB communicated at the first validation whose post-adaptation accuracy reaches the target."""
    for point in run["history"]:
        if point.get("val/acc_post", 0.0) >= DIGITS_TARGET:
            return point["mb"]
    return None


def run_experiments(names: list[str], seeds: list[int], smoke: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "date": date.today().isoformat(),
        "seeds": seeds,
        "smoke": smoke,
        "experiments": {},
    }
    for name in names:
        spec = EXPERIMENTS[name]
        rows = {}
        for row in spec["rows"]:
            runs = [train_and_test(row, spec["common"], seed, smoke) for seed in seeds]
            rows[row.label] = {"fedavg": row.fedavg, "runs": runs}
            seconds = statistics.mean(r["seconds"] for r in runs)
            print(f"[{name}] {row.label}: {len(runs)} seeds, {runs[0]['rounds']} rounds, {seconds:.0f} s per run", file=sys.stderr)
        results["experiments"][name] = {"title": spec["title"], "metric": spec["metric"], "rows": rows, "date": results["date"]}
    return results


# ------------------------------------------------------------------------------------------ tables


def table_rows(experiment: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """``(label, row, stage)``: a FedAvg row appears as FedAvg (``pre``) and FedAvg + FT (``post``)."""
    out = []
    for label, row in experiment["rows"].items():
        if row["fedavg"]:
            out.append((label, row, "pre"))
            out.append((label.replace("FedAvg", "FedAvg + FT"), row, "post"))
        else:
            out.append((label, row, "post"))
    return out


def render(results: dict[str, Any]) -> str:
    seeds = len(results["seeds"])
    lines = [
        f"Measured {results['date']} on {results['machine']} (2-core CPU); mean ± std over {seeds} seeds "
        f"{results['seeds']}; regenerate with `python benchmarks/reproduce/run.py --update-docs`.",
        "",
    ]
    experiments = results["experiments"]
    if "sinusoid" in experiments:
        e = experiments["sinusoid"]
        lines += [f"**{e['title']}**", "", "| algorithm | k = 0 | k = 1 | k = 10 |", "|---|---|---|---|"]
        for label, row, stage in table_rows(e):
            curves = [curve(r, "loss") for r in row["runs"]]
            if stage == "pre":  # the global model: no adaptation at any k
                cells = [_cell([c[0] for c in curves])] * 3
            else:
                cells = [_cell([c[k] for c in curves]) for k in (0, 1, 10)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if "synthetic" in experiments:
        e = experiments["synthetic"]
        by_model: dict[str, dict[str, str]] = {}
        for label, row, stage in table_rows(e):
            name, model = label.rsplit(" ", 1)
            by_model.setdefault(name, {})[model] = _cell([r["test"][f"test/acc_{stage}"] for r in row["runs"]])
        lines += [f"**{e['title']}**", "", "| algorithm | MLR | DNN (60-20-10) |", "|---|---|---|"]
        lines += [f"| {name} | {cells.get('MLR', '')} | {cells.get('DNN', '')} |" for name, cells in by_model.items()]
        lines.append("")
    for name in ("personalized", "digits_local"):
        if name in experiments:
            lines += personalized_table(experiments[name], results["date"])
    if "digits" in experiments:
        e = experiments["digits"]
        lines += [
            f"**{e['title']}**",
            "",
            f"| algorithm | accuracy before adaptation | after 5 steps | MB communicated to reach {DIGITS_TARGET:.0%} |",
            "|---|---|---|---|",
        ]
        for label, row, stage in table_rows(e):
            runs = row["runs"]
            after = _cell([r["test"][f"test/acc_{stage}"] for r in runs])
            to_target = "(same run as FedAvg + FT)" if stage == "pre" else _cell([mb_to_target(r) for r in runs], 2)
            lines.append(f"| {label} | {_cell([r['test']['test/acc_pre'] for r in runs])} | "
                         f"{after if stage == 'post' else '—'} | {to_target} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def personalized_table(e: dict[str, Any], date_all: str) -> list[str]:
    """Test accuracy before and after each algorithm's evaluation fine-tuning (``eval_inner_steps``):
    "before" is the global model, or each client's model from its own state (FedPer, FedRep, Ditto, APFL)."""
    measured = "" if e.get("date", date_all) == date_all else f" (measured {e['date']})"
    header = "| algorithm | before fine-tuning (global model, or the client's own state) | after `eval_inner_steps` of fine-tuning |"
    lines = [f"**{e['title']}**{measured}", "", header, "|---|---|---|"]
    for label, row in e["rows"].items():
        runs = row["runs"]
        lines.append(f"| {label} | {_cell([r['test']['test/acc_pre'] for r in runs])} | {_cell([r['test']['test/acc_post'] for r in runs])} |")
    return [*lines, ""]


# ------------------------------------------------------------------------------------------- plots


def _save(fig: Any, ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """PNG figures: sinusoid MSE vs steps; synthetic accuracy bars; digits accuracy vs MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    experiments = results["experiments"]
    if "sinusoid" in experiments:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, row, stage in table_rows(experiments["sinusoid"]):
            curves = torch.tensor([curve(r, "loss") for r in row["runs"]])
            if stage == "pre":
                curves = curves[:, :1].expand_as(curves)
            mean, std = curves.mean(0), curves.std(0, unbiased=False)
            steps = range(curves.shape[1])
            blown = (~torch.isfinite(mean)) | (mean > 10)
            if blown.any():  # off the chart: say where instead of squashing every other curve
                label += f" (diverges after k = {int(blown.nonzero()[0]) - 1})"
            ax.plot(steps, mean, marker="o", markersize=3, label=label, linestyle="--" if stage == "pre" else "-")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
        ax.set(xlabel="adaptation steps on the 10-shot support set", ylabel="query MSE (held-out clients)",
               yscale="log", ylim=(0.2, 6), title=f"Sinusoid: MSE vs adaptation steps ({len(results['seeds'])} seeds)")
        written.append(_save(fig, ax, out / "sinusoid_adaptation.png"))
    if "synthetic" in experiments:
        rows = table_rows(experiments["synthetic"])
        names = list(dict.fromkeys(label.rsplit(" ", 1)[0] for label, _, _ in rows))
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.38
        for j, model in enumerate(("MLR", "DNN")):
            means, stds = [], []
            for name in names:
                label, row, stage = next(t for t in rows if t[0] == f"{name} {model}")
                accs = [r["test"][f"test/acc_{stage}"] for r in row["runs"]]
                means.append(statistics.mean(accs))
                stds.append(statistics.pstdev(accs))
            ax.bar([i + (j - 0.5) * width for i in range(len(names))], means, width, yerr=stds, label=model, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set(ylabel="personalized test accuracy", ylim=(0, 1), title="Synthetic(0.5, 0.5), 100 clients")
        written.append(_save(fig, ax, out / "synthetic_accuracy.png"))
    if "digits" in experiments:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, row in experiments["digits"]["rows"].items():
            points = [p for p in row["runs"][0]["history"] if "val/acc_post" in p]
            ax.plot([p["mb"] for p in points], [p["val/acc_post"] for p in points], label=label + (" + FT" if row["fedavg"] else ""))
        ax.axhline(DIGITS_TARGET, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlim(0, 60)  # every curve has flattened by then
        ax.set(xlabel="MB communicated (down + up)", ylabel="new clients' accuracy after adaptation",
               title=f"Digits: accuracy vs communication (seed {results['seeds'][0]})")
        written.append(_save(fig, ax, out / "digits_communication.png"))
    return written


def update_docs(table: str, path: Path = RESULTS_PAGE) -> None:
    replace_section(path, START, END, table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="30 rounds per row (for tests)")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json goes (plots go to OUT/../../docs "
                        "by default, see --plots)")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the PNG figures (default: docs/)")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the results section of docs/reference/results.md")
    parser.add_argument("--render-only", action="store_true", help="tables and plots from OUT/results.json, no training")
    parser.add_argument("--merge", action="store_true", help="keep the other experiments of OUT/results.json")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.render_only:
        results = json.loads((args.out / "results.json").read_text())
    else:
        results = run_experiments(args.only, args.seeds, args.smoke)
        if args.merge:
            kept = json.loads((args.out / "results.json").read_text())
            kept["experiments"].update(results["experiments"])
            results = kept
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = render(results)
    print(table)
    for path in plot(results, args.plots or ROOT / "docs"):
        print(f"wrote {path}", file=sys.stderr)
    if args.update_docs:
        update_docs(table)
    return results


if __name__ == "__main__":
    main()
