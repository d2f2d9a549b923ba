"""Flower: the in-process protocol, what crosses the wire, and a real local deployment
(SuperLink + two SuperNodes on 127.0.0.1) that must match the in-process run exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from lightning_metafed.flower import load_from_config, simulate  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from flower_deploy import deploy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/sinusoid/maml.yaml")


def test_only_parameters_and_updates_cross_the_wire():
    model, _ = load_from_config(CONFIG)
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}  # every array sent is exactly these
    result = simulate(CONFIG, [0, 1], rounds=2)
    assert len(result["messages"]) == 2 * 3 + 3
    for content in result["messages"]:
        for name, record in content.items():
            if name == "arrays":
                state = record.to_torch_state_dict()
                assert {k: tuple(v.shape) for k, v in state.items()} == shapes
            else:  # config and metrics records hold scalars only
                assert name in ("config", "metrics")
                assert all(isinstance(v, (int, float)) for v in record.values())
    evaluation = result["evaluation"]
    assert [e["partition"] for e in evaluation] == [0, 1] and all("loss_post" in e for e in evaluation)


def assert_protocol_equals_module_round(partitions, overrides=()):
    result = simulate(CONFIG, partitions, rounds=1, overrides=overrides)
    model, data = load_from_config(CONFIG, overrides)
    train = data.population("train")
    from lightning_metafed.data import stack_tasks

    batch = stack_tasks(
        [data.train_task(train, p, 0) for p in partitions], [float(train.size(p)) for p in partitions], list(partitions)
    )
    optimizer = model.configure_optimizers()
    optimizer.zero_grad()
    model.round_gradients(batch)
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["parameters"][name], p.detach(), atol=1e-6, rtol=1e-6)


def test_in_process_protocol_equals_the_module_round():
    """Two Flower clients' updates, aggregated on the server, equal one module round over those clients."""
    assert_protocol_equals_module_round([0, 1])


def test_flower_server_uses_robust_aggregators_and_needs_its_privacy_ledger():
    """The server runs the module's aggregator; under `privacy` it adds the noise itself, so a
    server step without the privacy ledger (its seed, clip norm and accountant) is refused."""
    from lightning_metafed.flower import server_optimizer, server_update

    assert_protocol_equals_module_round([0, 1, 2], ["--model.aggregator=lightning_metafed.aggregators.CoordinateMedian"])
    model, _ = load_from_config(CONFIG, ["--model.privacy=lightning_metafed.privacy.ClientDP"])
    with pytest.raises(ValueError, match="`privacy`.*needs the server's privacy ledger.*got ledger=None"):
        server_update(model, server_optimizer(model), [], 0)


def test_local_deployment_matches_in_process_run(tmp_path):
    out = tmp_path / "final.pt"
    log = deploy(CONFIG, rounds=3, out=out, workdir=tmp_path / "deploy")
    assert log.count("2 updates aggregated") == 3 and "evaluation: loss_pre=" in log
    deployed = torch.load(out, weights_only=True)
    expected = simulate(CONFIG, [0, 1], rounds=3)["parameters"]
    assert deployed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(deployed[name], expected[name], atol=1e-6, rtol=0)


def test_flower_server_drops_a_nan_update_from_the_aggregate_and_the_metrics():
    from flwr import app

    from lightning_metafed.flower import server_update

    model, _ = load_from_config(CONFIG)
    names = [k for k, _ in model.named_parameters()]
    before = {k: p.detach().clone() for k, p in model.named_parameters()}

    def reply(partition, value, loss):
        arrays = app.ArrayRecord(torch_state_dict={k: torch.full_like(before[k], value) for k in names})
        return app.RecordDict({"arrays": arrays, "metrics": app.MetricRecord({"partition": partition, "weight": 1.0, "query_loss": loss})})

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.warns(UserWarning, match="rejected 1 of 3 client uploads"):  # the same screen as the Lightning round
        metrics = server_update(model, optimizer, [reply(0, 1.0, 2.0), reply(1, float("nan"), float("nan")), reply(2, 3.0, 4.0)])
    assert metrics["query_loss"] == 3.0  # the mean over the two finite clients
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[k] - 2.0)  # θ − mean(1, 3)
