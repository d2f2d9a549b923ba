"""Adaptation curves, per-client statistics, CSV, TensorBoard artifacts and communication accounting."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, console_text, loader, mlp, quiet_trainer, sinusoid_batch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_metafed as lm
from lightning_metafed.data import SinusoidClients, stack_tasks
from lightning_metafed.inner import SGD
from lightning_metafed.metrics import ClientRecords, client_statistics


def linear_clients():
    """Three clients of y = a·x with different query sizes; the model is y = w·x."""
    g = torch.Generator().manual_seed(0)
    tasks = []
    for a, q in [(1.0, 2), (-2.0, 5), (3.0, 3)]:
        x = torch.randn(4 + q, 1, generator=g, dtype=torch.float64)
        tasks.append((x[:4], a * x[:4], x[4:], a * x[4:]))
    return tasks


def test_adaptation_curve_of_a_linear_model_matches_the_hand_computation():
    tasks = linear_clients()
    net = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        net.weight.fill_(0.5)
    alpha = 0.1
    model = lm.MAML(net, inner_optimizer=SGD(lr=alpha), eval_inner_steps=2)
    results = quiet_trainer().test(model, loader(stack_tasks(tasks, [1.0] * 3, [0, 1, 2])), verbose=False)[0]
    per_client = []
    for sx, sy, qx, qy in tasks:
        w, curve = 0.5, []
        for _ in range(3):
            curve.append(float(((w * qx - qy) ** 2).mean()))
            w = w - alpha * float((2 * (w * sx - sy) * sx).mean())  # d/dw of mean((w x - y)^2)
        per_client.append(curve)
    per_client = torch.tensor(per_client)
    for k in range(3):
        assert results[f"test/loss_step{k}"] == pytest.approx(float(per_client[:, k].mean()), rel=1e-6)
    assert results["test/loss_pre"] == pytest.approx(float(per_client[:, 0].mean()), rel=1e-6)
    assert results["test/loss_post"] == pytest.approx(float(per_client[:, 2].mean()), rel=1e-6)
    n_query = torch.tensor([2.0, 5.0, 3.0])
    weighted = float((n_query * per_client[:, 2]).sum() / n_query.sum())
    assert results["test/loss_post_weighted"] == pytest.approx(weighted, rel=1e-6)
    assert abs(weighted - results["test/loss_post"]) > 1e-3  # weighting by query size changes the mean here
    assert results["test/loss_post_worst10"] == pytest.approx(float(torch.quantile(per_client[:, 2], 0.9)), rel=1e-6)
    improved = float((per_client[:, 2] < per_client[:, 0]).double().mean())
    assert results["test/improved"] == pytest.approx(improved)


def test_client_statistics_by_hand():
    pre = torch.tensor([0.5, 0.2, 0.9, 0.4])
    post = torch.tensor([0.7, 0.1, 0.95, 0.8])
    weights = torch.tensor([1.0, 1.0, 1.0, 5.0])
    acc = client_statistics(pre, post, weights, "acc")
    assert float(acc["post"]) == pytest.approx(0.6375)
    assert float(acc["post_weighted"]) == pytest.approx((0.7 + 0.1 + 0.95 + 4.0) / 8)
    assert float(acc["post_worst10"]) == pytest.approx(float(torch.quantile(post, 0.1)))  # low accuracy is bad
    assert float(acc["improved"]) == pytest.approx(0.75)
    assert float(acc["post_std"]) == pytest.approx(float(post.std(unbiased=False)))
    loss = client_statistics(pre, post, weights, "loss")
    assert float(loss["post_worst10"]) == pytest.approx(float(torch.quantile(post, 0.9)))  # high loss is bad
    assert float(loss["improved"]) == pytest.approx(0.25)


def test_records_count_each_client_once():
    records = ClientRecords()
    curves = {"loss": torch.tensor([[1.0, 0.5], [2.0, 1.0]])}
    records.update(torch.tensor([7, 9]), torch.tensor([4, 4]), torch.tensor([3, 6]), curves)
    records.update(torch.tensor([9]), torch.tensor([4]), torch.tensor([6]), {"loss": torch.tensor([[2.0, 1.0]])})  # a padded repeat
    ids, n_support, n_query, out = records.compute()
    assert ids.tolist() == [7, 9] and n_query.tolist() == [3, 6]
    torch.testing.assert_close(out["loss"], curves["loss"].double())


def test_query_data_never_reaches_adaptation():
    model = lm.MetaSGD(mlp(), inner_optimizer=SGD(lr=0.1), eval_inner_steps=3)
    batch = sinusoid_batch(3)
    poisoned = lm.TaskBatch(batch.support_x, batch.support_y, torch.full_like(batch.query_x, float("nan")), batch.query_y)
    clean, dirty = model.personalize(batch), model.personalize(poisoned)
    for key in clean:
        assert torch.isfinite(dirty[key]).all()
        torch.testing.assert_close(clean[key], dirty[key])
    curves = model.adaptation_curves(poisoned)["loss"]
    assert torch.isnan(curves).all()  # only the scores use the query set


def test_test_run_writes_csv_histogram_figure_and_prints_summary(tmp_path, capsys, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = SinusoidClients(num_clients=60, clients_per_round=4, rounds_per_epoch=3, eval_clients_per_batch=4)
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.01), eval_inner_steps=3)
    trainer = quiet_trainer(max_epochs=1, logger=TensorBoardLogger(tmp_path), log_every_n_steps=1, limit_val_batches=1.0)
    with caplog.at_level("INFO"):
        trainer.fit(model, datamodule=data)
        trainer.test(model, datamodule=data, verbose=False)
    printed = console_text(capsys, caplog)
    assert "test: personalization on 6 held-out clients" in printed and "worst-10%" in printed
    assert "Communication over 3 rounds" in printed
    rows = list(csv.DictReader(open(f"{trainer.log_dir}/test_clients.csv")))
    test_ids = {data.population("test").global_id(i) for i in range(len(data.population("test")))}
    assert len(rows) == 6 and {int(r["client_id"]) for r in rows} == test_ids
    assert all(int(r["n_support"]) == 10 and int(r["n_query"]) == 90 for r in rows)
    assert {"loss_pre", "loss_post"} <= set(rows[0])
    assert len(list(csv.DictReader(open(f"{trainer.log_dir}/val_clients.csv")))) == 6
    events = EventAccumulator(trainer.log_dir, size_guidance={"histograms": 0, "images": 0})
    events.Reload()
    assert "test/loss_post_per_client" in events.Tags()["histograms"]
    assert "val/adaptation_curve" in events.Tags()["images"]


@FIT_WITHOUT_VALIDATION
def test_communication_bytes_equal_numel_times_element_size(tmp_path):
    model = lm.MetaSGD(mlp(), inner_optimizer=SGD(lr=0.01), fast_path=False)
    batches = [sinusoid_batch(4, seed=s) for s in range(3)]
    per_client = sum(p.numel() * p.element_size() for p in model.parameters())  # net params + learned LRs, float64
    assert per_client == 2 * 8 * sum(p.numel() for p in model.net.parameters())
    updates = model.client_updates(batches[0])
    assert sum(u[0].numel() * u.element_size() for u in updates.values()) == per_client
    trainer = quiet_trainer(max_steps=3, logger=TensorBoardLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(model, loader(*batches))
    logged = trainer.logged_metrics
    assert logged["comm/upload_bytes_per_client"] == per_client
    assert logged["comm/download_bytes_per_client"] == per_client
    assert logged["comm/upload_bytes"] == 4 * per_client
    assert model.communication == {"rounds": 3, "download_bytes": 12 * per_client, "upload_bytes": 12 * per_client}
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    restored = lm.MetaSGD(mlp(), inner_optimizer=SGD(lr=0.01))
    restored.on_load_checkpoint(torch.load(path, weights_only=True))
    assert restored.communication == model.communication
    fast = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01))
    quiet_trainer(max_steps=1).fit(fast, loader(batches[0]))
    assert fast.communication["upload_bytes"] == 4 * sum(p.numel() * 8 for p in fast.parameters())


@FIT_WITHOUT_VALIDATION
def test_resumed_fit_with_no_rounds_left_reports_restored_communication(tmp_path, capsys, caplog):
    batches = loader(*[sinusoid_batch(3, seed=s) for s in range(2)])
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01))
    first = quiet_trainer(max_steps=2)
    with caplog.at_level("INFO"):
        first.fit(model, batches)
    first.save_checkpoint(tmp_path / "done.ckpt")
    resumed = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01))
    with caplog.at_level("INFO"):
        quiet_trainer(max_steps=2).fit(resumed, batches, ckpt_path=tmp_path / "done.ckpt")
    assert resumed.communication == model.communication and resumed.communication["rounds"] == 2
    assert console_text(capsys, caplog).count("Communication over 2 rounds") == 2
