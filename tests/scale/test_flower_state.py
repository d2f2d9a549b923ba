"""Flower with per-client state (FedPer, Ditto): each client keeps its row locally across rounds,
only the upload crosses the wire, and the in-process protocol equals the module's own rounds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from lightning_metafed.data import stack_tasks  # noqa: E402
from lightning_metafed.flower import STATE_RECORD, load_from_config, simulate  # noqa: E402

# pytest puts this directory (no __init__.py) on sys.path, so the deployment helper imports as a module.
from flower_deploy import deploy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FEDPER = str(ROOT / "configs/synthetic/fedper.yaml")
DITTO = str(ROOT / "configs/synthetic/ditto.yaml")
TINY = ["--data.num_clients=6", "--data.clients_per_round=2", "--model.inner_steps=2", "--model.eval_inner_steps=1"]
CASES = {
    "fedper": (FEDPER, TINY),
    "ditto": (DITTO, [*TINY, "--model.personal_steps=2"]),
}
PARTITIONS, ROUNDS = [0, 1], 3


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request):
    """The in-process protocol and the module's own rounds on the same clients every round."""
    config, overrides = CASES[request.param]
    with pytest.MonkeyPatch.context() as patch:  # the CLI parser must not see pytest's own arguments
        patch.setattr(sys, "argv", sys.argv[:1])
        result = simulate(config, PARTITIONS, ROUNDS, overrides=overrides)
        model, data = load_from_config(config, overrides)
    train = data.population("train")
    optimizer = model.configure_optimizers()
    for r in range(ROUNDS):
        batch = stack_tasks(
            [data.train_task(train, p, r) for p in PARTITIONS],
            [float(train.size(p)) for p in PARTITIONS],
            [train.global_id(p) for p in PARTITIONS],
        )
        optimizer.zero_grad()
        model.round_gradients(batch)
        optimizer.step()
    return request.param, result, model, data


def test_final_parameters_equal_the_module_rounds(run):
    """Clients carrying their own state across rounds give the server the module's parameters."""
    _, result, model, _ = run
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["parameters"][name], p.detach(), atol=1e-6, rtol=1e-6)


def test_each_client_keeps_the_row_the_module_stores(run):
    """After the run each client holds, locally, the row the module's store holds for it."""
    _, result, model, data = run
    train = data.population("train")
    for p in PARTITIONS:
        row = result["client_state"][p]
        assert row is not None
        expected = model.client_state.gather([train.global_id(p)])
        assert row.keys() == expected.keys()
        for name in row:
            torch.testing.assert_close(row[name], expected[name][0], atol=1e-6, rtol=1e-6)


def test_only_uploads_and_scalars_leave_the_clients(run):
    """Replies hold the upload (FedPer: the body only) and scalar metrics, never a state row."""
    algorithm, result, model, _ = run
    params = {k for k, _ in model.named_parameters()}
    body = params - {f"net.{h}" for h in getattr(model, "head_names", [])}
    replies = [m for m in result["messages"] if "metrics" in m]
    assert len(replies) == len(PARTITIONS) * (ROUNDS + 1)
    for content in replies:
        assert set(content.keys()) <= {"arrays", "metrics"} and STATE_RECORD not in content
        assert all(isinstance(v, (int, float)) for v in content["metrics"].values())
        if "arrays" in content:
            uploaded = set(content["arrays"].to_torch_state_dict())
            assert uploaded == (body if algorithm == "fedper" else params)
    if algorithm == "fedper":
        assert body < params  # the head stays on the clients
    evaluation = result["evaluation"]
    assert [e["partition"] for e in evaluation] == PARTITIONS and all("loss_post" in e for e in evaluation)


def test_a_module_with_server_state_is_refused_by_name():
    from lightning_metafed.flower import server_optimizer, server_update

    model, _ = load_from_config(str(ROOT / "configs/synthetic/scaffold.yaml"))
    with pytest.raises(ValueError, match=r"SCAFFOLD sends clients server state beside the parameters"):
        server_update(model, server_optimizer(model), [])


def test_a_real_fedper_deployment_keeps_each_clients_head_on_its_supernode(tmp_path):
    """SuperLink + two SuperNodes on 127.0.0.1: a SuperNode starts a new ClientApp process per
    message, so the heads survive only through the node's own state; the result equals simulate()."""
    config = FEDPER
    out = tmp_path / "final.pt"
    log = deploy(config, rounds=3, out=out, workdir=tmp_path / "deploy")
    assert log.count("2 updates aggregated") == 3
    deployed = torch.load(out, weights_only=True)
    expected = simulate(config, [0, 1], rounds=3)["parameters"]
    assert deployed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(deployed[name], expected[name], atol=1e-6, rtol=0)
