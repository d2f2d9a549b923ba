"""Evaluation epochs in which held-out clients diverge: non-finite metrics are reported, one warning
per epoch names the stage, the count and the first adaptation step, and every artifact is written."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import console_text, loader, mlp, quiet_trainer, sinusoid_batch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_metafed as lm
from lightning_metafed.algorithms.evaluation import write_artifacts
from lightning_metafed.inner import SGD
from lightning_metafed.metrics import (
    client_statistics,
    curve_figure,
    divergence,
    format_summary,
    worst_quantile,
)

F32 = torch.float32
STEP_CAUSE = r"first at adaptation step \d of 5: the inner learning rate or `eval_inner_steps` is likely too large"


def exploding_model() -> lm.MAML:
    """float32 MAML whose inner SGD (lr=1e6) overflows every sinusoid client within 5 steps."""
    return lm.MAML(mlp().float(), inner_optimizer=SGD(lr=1e6), eval_inner_steps=5)


def with_outliers(m: int, bad: int, seed: int = 0) -> lm.TaskBatch:
    """m float32 sinusoid clients; the first ``bad`` have support labels scaled by 1e20, which makes a
    plain SGD(lr=0.1) step overflow their query loss while the other clients adapt normally."""
    b = sinusoid_batch(m, dtype=F32, seed=seed)
    support_y = b.support_y.clone()
    support_y[:bad] *= 1e20
    return lm.TaskBatch(b.support_x, support_y, b.query_x, b.query_y, weight=b.weight, client_id=b.client_id)


def events(log_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"histograms": 0, "images": 0})
    acc.Reload()
    return acc


def csv_rows(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def divergence_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "adaptation diverged" in str(w.message)]


def test_validate_and_test_where_every_client_diverges_finish_and_report(tmp_path, capsys, caplog):
    trainer = quiet_trainer(logger=TensorBoardLogger(tmp_path), limit_val_batches=1.0)
    model = exploding_model()
    batch = sinusoid_batch(4, dtype=F32)
    with pytest.warns(UserWarning, match=rf"^val: adaptation diverged \(non-finite metrics\) for 4 of 4 clients, {STEP_CAUSE}"):
        val = trainer.validate(model, loader(batch), verbose=False)[0]
    assert math.isfinite(val["val/loss_pre"]) and not math.isfinite(val["val/loss_post"])
    assert not math.isfinite(val["val/loss_post_worst10"]) and val["val/diverged"] == 1.0
    assert val["val/improved"] == 0.0
    rows = csv_rows(f"{trainer.log_dir}/val_clients.csv")
    assert len(rows) == 4 and all(not math.isfinite(float(r["loss_post"])) for r in rows)
    assert all(math.isfinite(float(r["loss_pre"])) for r in rows)
    with caplog.at_level("INFO"), pytest.warns(UserWarning, match=rf"^test: adaptation diverged .* for 4 of 4 clients, {STEP_CAUSE}"):
        test = trainer.test(model, loader(batch), verbose=False)[0]
    assert not math.isfinite(test["test/loss_post"])
    assert "4 of 4 clients diverged (non-finite metrics)" in console_text(capsys, caplog)
    assert len(csv_rows(f"{trainer.log_dir}/test_clients.csv")) == 4
    tags = events(trainer.log_dir).Tags()
    assert "test/loss_post_per_client" not in tags["histograms"]  # no finite value: skipped
    assert "test/adaptation_curve" in tags["images"]  # drawn from the finite steps


def test_partial_divergence_keeps_honest_means_and_finite_artifacts(tmp_path):
    trainer = quiet_trainer(logger=TensorBoardLogger(tmp_path), limit_val_batches=1.0)
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.1), eval_inner_steps=5)
    batch = with_outliers(12, bad=1)
    with pytest.warns(UserWarning, match=rf"adaptation diverged .* for 1 of 12 clients, {STEP_CAUSE}"):
        val = trainer.validate(model, loader(batch), verbose=False)[0]
    assert not math.isfinite(val["val/loss_post"]) and val["val/diverged"] == pytest.approx(1 / 12)
    assert math.isfinite(val["val/loss_post_worst10"])  # one bad client of 12 is beyond the worst 10 %
    rows = csv_rows(f"{trainer.log_dir}/val_clients.csv")
    post = [float(r["loss_post"]) for r in rows]
    assert sum(not math.isfinite(p) for p in post) == 1 and len(post) == 12
    histogram = events(trainer.log_dir).Histograms("val/loss_post_per_client")[0].histogram_value
    assert histogram.num == 11 and math.isfinite(histogram.max)
    assert "val/adaptation_curve" in events(trainer.log_dir).Tags()["images"]


def test_the_warning_comes_once_per_epoch_over_all_batches():
    model = exploding_model()
    batches = loader(sinusoid_batch(3, dtype=F32, seed=0), sinusoid_batch(3, dtype=F32, seed=1))
    with pytest.warns(UserWarning, match="adaptation diverged") as record:
        quiet_trainer(limit_val_batches=1.0).validate(model, batches, verbose=False)
    assert len(divergence_warnings(record)) == 1
    assert "for 6 of 6 clients" in divergence_warnings(record)[0]


def test_non_finite_metrics_before_adaptation_name_the_meta_parameters_or_data():
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.1), eval_inner_steps=2)
    b = sinusoid_batch(4)
    query_x = b.query_x.clone()
    query_x[2] = float("nan")
    poisoned = lm.TaskBatch(b.support_x, b.support_y, query_x, b.query_y, client_id=b.client_id)
    with pytest.warns(UserWarning, match=r"for 1 of 4 clients, first before any adaptation step: the meta-parameters"):
        val = quiet_trainer(limit_val_batches=1.0).validate(model, loader(poisoned), verbose=False)[0]
    assert math.isnan(val["val/loss_pre"]) and math.isnan(val["val/loss_post"])


def test_artifacts_of_clients_that_are_all_nan_are_written_without_figure_or_histogram(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    curves = {"loss": torch.full((3, 4), float("nan")), "acc": torch.full((3, 4), float("inf"))}
    assert curve_figure(curves, "nothing finite") is None
    ids, sizes = torch.arange(3), torch.full((3,), 5)
    write_artifacts([logger], 0, "val", str(tmp_path), (ids, sizes, sizes, curves))
    logger.experiment.flush()
    rows = csv_rows(str(tmp_path / "val_clients.csv"))
    assert [r["loss_post"] for r in rows] == ["nan"] * 3 and [r["acc_pre"] for r in rows] == ["inf"] * 3
    tags = events(logger.log_dir).Tags()
    assert tags["histograms"] == [] and tags["images"] == []


def test_divergence_finds_the_clients_and_the_first_step():
    curves = {"loss": torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, float("inf")], [1.0, float("nan"), float("nan")]])}
    diverged, first = divergence(curves)
    assert diverged.tolist() == [False, True, True] and first == 1
    diverged, first = divergence({"loss": torch.ones(2, 3), "acc": torch.zeros(2, 3)})
    assert not diverged.any() and first is None


def test_worst_quantile_equals_torch_quantile_on_finite_values_and_ranks_diverged_clients_worst():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(37, generator=g, dtype=torch.float64)
    for q in (0.1, 0.5, 0.9):
        torch.testing.assert_close(worst_quantile(values, q, False), torch.quantile(values, q), rtol=0, atol=0)
    one_bad = torch.cat([values[:19], torch.tensor([float("nan")], dtype=torch.float64)])  # 20 clients, one diverged
    s = values[:19].sort().values
    torch.testing.assert_close(worst_quantile(one_bad, 0.9, False), torch.lerp(s[17], s[18], 0.1))  # position 17.1
    torch.testing.assert_close(worst_quantile(one_bad, 0.1, True), torch.lerp(s[0], s[1], 0.9))  # 1.9, NaN ranked first
    many_bad = torch.tensor([1.0, 2.0, float("inf"), float("nan")], dtype=torch.float64)
    assert worst_quantile(many_bad, 0.9, False) == float("inf")
    assert worst_quantile(many_bad, 0.1, True) == float("-inf")
    assert worst_quantile(torch.tensor([float("nan")] * 3), 0.9, False) == float("inf")


def test_client_statistics_on_nan_do_not_raise_and_stay_honest():
    pre = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    post = torch.tensor([0.5, float("nan"), 1.0, 3.0], dtype=torch.float64)
    loss = client_statistics(pre, post, torch.ones(4), "loss")
    assert math.isnan(loss["post"]) and math.isnan(loss["post_weighted"]) and math.isnan(loss["post_std"])
    assert loss["post_worst10"] == float("inf")
    assert float(loss["improved"]) == pytest.approx(0.75)
    acc = client_statistics(pre, post, torch.ones(4), "acc")
    assert acc["post_worst10"] == float("-inf") and float(acc["improved"]) == 0.0
    table = format_summary({"loss": loss}, "test", 4, diverged=1)
    assert "nan" in table and "inf" in table and table.endswith("1 of 4 clients diverged (non-finite metrics): the means include them")
