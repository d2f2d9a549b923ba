"""The results reproduction (benchmarks/reproduce/run.py): a smoke run of every row, the orderings
that are robust even after a few rounds, the plots, and the results page's table equal to the committed results."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "reproduce"))
import run as reproduce  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    results = reproduce.main(["--smoke", "--seeds", "0", "--out", str(out), "--plots", str(out / "docs")])
    return out, results


def test_every_row_of_every_experiment_trains_and_tests(smoke):
    out, results = smoke
    assert json.loads((out / "results.json").read_text()) == results
    for name, spec in reproduce.EXPERIMENTS.items():
        rows = results["experiments"][name]["rows"]
        assert list(rows) == [row.label for row in spec["rows"]]
        for label, row in rows.items():
            (run,) = row["runs"]
            assert run["rounds"] == 30, label
            finite = {k: v for k, v in run["test"].items() if k.endswith(("_pre", "_step1"))}
            assert finite and all(math.isfinite(v) for v in finite.values()), label
    for png in ("sinusoid_adaptation.png", "synthetic_accuracy.png", "digits_communication.png"):
        assert (out / "docs" / png).stat().st_size > 10_000


def test_orderings_that_hold_after_a_few_rounds(smoke):
    _, results = smoke
    sinusoid = results["experiments"]["sinusoid"]["rows"]
    maml = reproduce.curve(sinusoid["MAML"]["runs"][0], "loss")
    global_model = reproduce.curve(sinusoid["FedAvg"]["runs"][0], "loss")[0]
    assert maml[1] < maml[0] and maml[1] < global_model  # MAML after one step beats the non-adapted global model
    synthetic = results["experiments"]["synthetic"]["rows"]
    for model in ("MLR", "DNN"):
        fedavg = synthetic[f"FedAvg {model}"]["runs"][0]["test"]
        for name in ("Per-FedAvg FO", "Per-FedAvg HF", "MAML", "Reptile"):
            assert synthetic[f"{name} {model}"]["runs"][0]["test"]["test/acc_post"] > fedavg["test/acc_pre"] + 0.2, name
    fedavg_global = synthetic["FedAvg DNN"]["runs"][0]["test"]["test/acc_pre"]
    for label, row in results["experiments"]["personalized"]["rows"].items():
        if label != "SCAFFOLD":  # each client from its own state beats the one global model
            assert row["runs"][0]["test"]["test/acc_pre"] > fedavg_global + 0.1, label
    for label, row in results["experiments"]["digits"]["rows"].items():
        test = row["runs"][0]["test"]
        assert test["test/acc_post"] > test["test/acc_pre"], label  # two-class new clients gain from adapting


def test_results_page_section_is_the_rendering_of_the_committed_results():
    committed = json.loads((ROOT / "benchmarks" / "reproduce" / "results.json").read_text())
    assert not committed["smoke"] and len(committed["seeds"]) >= 3
    readme = (ROOT / "docs" / "reference" / "results.md").read_text()
    section = readme.split(reproduce.START, 1)[1].split(reproduce.END, 1)[0]
    assert section.strip() == reproduce.render(committed).strip()
