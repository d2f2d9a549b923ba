"""Ledgers in checkpoints: a checkpoint written by lightning-metafed 0.1.0 (before the round pipeline)
loads and resumes; a checkpoint from a newer format fails with a clear message.

``maml_v0_1_0_resumed.pt`` holds what resuming that checkpoint gives: its counters and accountant
history are those 0.1.0 itself produced; its parameters were re-recorded when the data module's
draws became batched (the rounds after the checkpoint read other examples since then)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from torch import nn

import lightning_metafed as lm
from lightning_metafed.data import SinusoidClients
from lightning_metafed.round import CommunicationMeter, FaultLedger, PrivacyLedger, RoundCounts, RoundResult

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OLD = FIXTURES / "maml_v0_1_0.ckpt"  # 3 rounds of MAML with dropout and DP, written by 0.1.0


def old_run_net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))


def old_run_data() -> SinusoidClients:
    return SinusoidClients(
        num_clients=50, examples_per_client=20, clients_per_round=5, support_size=5, query_size=5, rounds_per_epoch=3, seed=0
    )


def test_a_checkpoint_from_0_1_0_loads_and_resumes_to_the_recorded_result():
    expected = torch.load(FIXTURES / "maml_v0_1_0_resumed.pt", weights_only=False)
    model = lm.MAML.load_from_checkpoint(OLD, net=old_run_net(), weights_only=False)
    for name, value in torch.load(OLD, weights_only=False)["state_dict"].items():
        assert torch.equal(model.state_dict()[name], value), name
    trainer = quiet_trainer(max_steps=5)
    trainer.fit(model, old_run_data(), ckpt_path=OLD, weights_only=False)
    for name, value in expected["state"].items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    assert model.communication == expected["comm"] and model.fault_counts == expected["faults"]
    assert model.ledgers.privacy.accountant.history == expected["history"] == [(1.0, 0.125, 5)]


def test_a_checkpoint_of_a_newer_format_names_the_versions(tmp_path):
    checkpoint = torch.load(OLD, weights_only=False)
    checkpoint["metafed_format"] = 7
    path = tmp_path / "future.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="checkpoint format 7.*reads formats 0 to 1"):
        lm.MAML.load_from_checkpoint(path, net=old_run_net(), weights_only=False)


def test_checkpoints_record_their_format_and_every_ledger(tmp_path):
    model = lm.MAML.load_from_checkpoint(OLD, net=old_run_net(), weights_only=False)
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(model, old_run_data(), ckpt_path=OLD, weights_only=False)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    saved = torch.load(tmp_path / "new.ckpt", weights_only=False)
    assert saved["metafed_format"] == 1
    assert saved["metafed_communication"] == {"rounds": 4, **{k: model.communication[k] for k in ("download_bytes", "upload_bytes")}}
    assert saved["metafed_faults"] == model.fault_counts and set(saved["metafed_privacy"]) == {"accountant"}


def round_result(sampled, survivors, skipped=False, **counts) -> RoundResult:
    aggregate = None if skipped else {"w": torch.zeros(2)}
    return RoundResult(aggregate, {}, RoundCounts(sampled, survivors, **counts), download_bytes=8, upload_bytes=0 if skipped else 8)


def test_ledgers_count_rounds_and_round_trip_through_state_dict():
    meter, faults = CommunicationMeter(), FaultLedger(lm.ClientFaults(dropout=0.5, byzantine_fraction=0.1))
    privacy = PrivacyLedger(lm.ClientDP(noise_multiplier=1.0, sample_rate=0.1))
    for result in (round_result(4, 3, byzantine=1, rejected=1), round_result(4, 0, skipped=True)):
        for ledger in (meter, faults, privacy):
            ledger.record(result)
    assert meter.totals == {"rounds": 2, "download_bytes": 64, "upload_bytes": 24}
    assert faults.totals == {"dropped_clients": 5, "byzantine_uploads": 1, "rejected_uploads": 1, "skipped_rounds": 1}
    assert faults.metrics()["faults/dropped"] == 4 and faults.metrics()["faults/byzantine_total"] == 1
    assert privacy.accountant.history == [(1.0, 0.1, 2)] and privacy.epsilon() > 0
    for ledger, fresh in ((meter, CommunicationMeter()), (faults, FaultLedger()), (privacy, PrivacyLedger(privacy.privacy))):
        fresh.load_state_dict(ledger.state_dict())
        assert fresh.state_dict() == ledger.state_dict()
    assert "2 rounds" in meter.summary() and "1 rounds skipped" in faults.summary() and "after 2 rounds" in privacy.summary()
