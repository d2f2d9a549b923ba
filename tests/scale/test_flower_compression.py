"""Flower with a compressor: the encodings cross the wire (the messages shrink), the server decodes
them, each client keeps its error-feedback residual on its node, and the protocol equals the
module's own rounds; secure aggregation refuses a compressor."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from lightning_metafed.compression import SignSGD  # noqa: E402
from lightning_metafed.data import stack_tasks  # noqa: E402
from lightning_metafed.flower import load_from_config, simulate  # noqa: E402
from lightning_metafed.flower_compression import RESIDUAL_RECORD, decode_arrays  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/sinusoid/maml.yaml")
SIGN = ['--model.compressor={"class_path": "lightning_metafed.compression.SignSGD"}']
QSGD3 = ['--model.compressor={"class_path": "lightning_metafed.compression.QSGD", "init_args": {"levels": 3}}']
PARTITIONS = [0, 1]


def run(overrides, rounds):
    with pytest.MonkeyPatch.context() as patch:  # the CLI parser must not see pytest's own arguments
        patch.setattr(sys, "argv", sys.argv[:1])
        return simulate(CONFIG, PARTITIONS, rounds, overrides=overrides)


def module_rounds(overrides, rounds):
    """The module's own rounds over the same clients (outside a Trainer every round is round 0)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", sys.argv[:1])
        model, data = load_from_config(CONFIG, overrides)
    train, optimizer = data.population("train"), model.configure_optimizers()
    for r in range(rounds):
        batch = stack_tasks(
            [data.train_task(train, p, r) for p in PARTITIONS], [float(train.size(p)) for p in PARTITIONS],
            [train.global_id(p) for p in PARTITIONS],
        )
        optimizer.zero_grad()
        model.round_gradients(batch)
        optimizer.step()
    return model, data


def replies(result):
    return [m for m in result["messages"] if "metrics" in m and "arrays" in m]


@pytest.fixture(scope="module")
def plain_and_sign():
    return run([], 2), run(SIGN, 2)


def test_the_encoding_crosses_the_wire_and_the_messages_shrink(plain_and_sign):
    plain, sign = plain_and_sign
    model, _ = load_from_config(CONFIG)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    expected = {k: 4 + math.ceil(math.prod(s) / 8) for k, s in shapes.items()}  # scale + one bit a value
    for reply in replies(sign):
        arrays = reply["arrays"].to_torch_state_dict()
        assert {k: (v.dtype, v.numel()) for k, v in arrays.items()} == {k: (torch.uint8, n) for k, n in expected.items()}
    sent = sum(r["arrays"].count_bytes() for r in replies(sign))
    full = sum(r["arrays"].count_bytes() for r in replies(plain))
    raw = 4 * sum(math.prod(s) for s in shapes.values())
    assert full / sent > 7  # the serialized messages, Flower's ~130-byte per-array overhead included (7.3×)
    assert full - sent == len(replies(sign)) * (raw - sum(expected.values()))  # exactly the encoding's saving


def test_flower_rounds_equal_the_module_rounds_and_keep_the_residual_on_the_node(plain_and_sign):
    _, sign = plain_and_sign
    model, data = module_rounds(SIGN, 2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(sign["parameters"][name], p.detach(), atol=1e-6, rtol=1e-6)
    train = data.population("train")
    for p in PARTITIONS:
        kept = sign["node_state"][p][RESIDUAL_RECORD].to_torch_state_dict()
        stored = model.upload_residuals.rows[train.global_id(p)]
        assert kept.keys() == stored.keys() and any(v.abs().sum() > 0 for v in kept.values())
        for name in kept:
            torch.testing.assert_close(kept[name], stored[name], atol=1e-6, rtol=1e-6)


def test_a_stochastic_compressor_draws_the_same_on_flower_as_in_a_round():
    result = run(QSGD3, 1)
    model, _ = module_rounds(QSGD3, 1)
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["parameters"][name], p.detach(), atol=1e-6, rtol=1e-6)


def test_the_server_refuses_an_upload_that_is_not_the_encoding():
    model, _ = load_from_config(CONFIG)
    params = dict(model.named_parameters())
    name = next(iter(params))
    with pytest.raises(ValueError, match=rf"upload of '{name}' to be \d+ bytes \(uint8\).*SignSGD.*got 3 values"):
        decode_arrays(SignSGD(), {name: torch.zeros(3, dtype=torch.uint8)}, params)
    with pytest.raises(ValueError, match=r"named after parameters of the model, got \['nope'\]"):
        decode_arrays(SignSGD(), {"nope": torch.zeros(3, dtype=torch.uint8)}, params)


def test_secure_aggregation_refuses_a_compressor():
    from lightning_metafed.flower_secure import check_secure_module

    model, _ = load_from_config(CONFIG, ["--model.compressor=lightning_metafed.compression.TopK"])
    with pytest.raises(ValueError, match=r"Expected `compressor` to be None under secure aggregation, got TopK\(fraction=0.1"):
        check_secure_module(model)
