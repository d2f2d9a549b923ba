"""Compressed uploads in a round: the aggregate of the decoded uploads (checked against top-k and
sign compression written by hand), error feedback (residuals carried, telescoping, written only for
accepted clients), encoded-byte accounting, exact resume, robust aggregation and DP on the decoded
uploads, and the fast path switched off."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, mlp, quiet_trainer, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.aggregators import CoordinateMedian, Mean
from lightning_metafed.compression import BF16, QSGD, RandK, SignSGD, TopK, encoded_bytes
from lightning_metafed.data import SinusoidClients
from lightning_metafed.faults import ClientFaults
from lightning_metafed.inner import SGD
from lightning_metafed.privacy import ClientDP
from lightning_metafed.round import ResidualStore, compress_uploads

EXACT = dict(rtol=0, atol=0)


def fedavg(compressor=None, **kw) -> lm.FedAvg:
    """A float64 FedAvg whose aggregate is the plain (unweighted) mean of what the server decodes."""
    kw.setdefault("aggregator", Mean(weighted=False))
    return lm.FedAvg(mlp(hidden=4), inner_optimizer=SGD(lr=0.1), compressor=compressor, **kw)


def maml(compressor=None, hidden: int = 6, **kw) -> lm.MAML:
    return lm.MAML(mlp(hidden=hidden).float(), inner_optimizer=SGD(lr=0.05), compressor=compressor, **kw)


def data(rounds: int, clients: int = 6, per_round: int = 3) -> SinusoidClients:
    return SinusoidClients(
        num_clients=clients, clients_per_round=per_round, support_size=4, query_size=4, rounds_per_epoch=rounds, seed=0
    )


def topk_by_hand(row: torch.Tensor, fraction: float) -> torch.Tensor:
    """One client's one parameter: its ``max(1, ⌈f·n⌉)`` largest-magnitude values, zeros elsewhere."""
    flat = row.reshape(-1)
    keep = flat.abs().topk(max(1, math.ceil(fraction * flat.numel()))).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(row.shape)


def sign_by_hand(row: torch.Tensor) -> torch.Tensor:
    """``(‖x‖₁ / n) · sign(x)`` of one client's one parameter."""
    return row.abs().mean() * row.sign()


def by_hand(sent: dict, reference) -> dict:
    """Each client's row of each parameter compressed by ``reference`` (``[m, *shape]`` again)."""
    return {k: torch.stack([reference(v[i]) for i in range(v.shape[0])]) for k, v in sent.items()}


def lossy(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[k], b[k]) for k in a)


def test_round_aggregates_the_decoded_uploads_and_the_next_round_sends_update_plus_residual():
    comp = TopK(fraction=0.3)
    model = fedavg(comp)
    first, second = sinusoid_batch(3, seed=1), sinusoid_batch(3, seed=2)  # the same client ids 0, 1, 2
    assert first.client_id == second.client_id == [0, 1, 2]
    u = model.client_updates(first)
    aggregate, _ = model.round_gradients(first)
    decoded = comp.decode_all(comp.encode_all(u, 0, first.client_id), u)
    assert set(model.upload_residuals.rows) == {0, 1, 2}
    for k in u:
        torch.testing.assert_close(decoded[k], by_hand(u, lambda r: topk_by_hand(r, 0.3))[k], **EXACT)
        torch.testing.assert_close(aggregate[k], decoded[k].mean(0), msg=k)
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, aggregate[k], msg=k)
        for i in range(3):
            torch.testing.assert_close(model.upload_residuals.rows[i][k], u[k][i] - decoded[k][i], msg=f"{k} client {i}")
    assert lossy(aggregate, {k: v.mean(0) for k, v in u.items()})  # top-k did drop something

    residual = {k: torch.stack([model.upload_residuals.rows[i][k] for i in range(3)]) for k in u}
    u2 = model.client_updates(second)
    aggregate2, _ = model.round_gradients(second)
    sent = {k: u2[k] + residual[k] for k in u2}
    decoded2 = by_hand(sent, lambda r: topk_by_hand(r, 0.3))
    torch.testing.assert_close(decoded2, comp.decode_all(comp.encode_all(sent, 0, second.client_id), sent), **EXACT)
    for k in u2:
        torch.testing.assert_close(aggregate2[k], decoded2[k].mean(0), msg=k)
        for i in range(3):
            torch.testing.assert_close(model.upload_residuals.rows[i][k], sent[k][i] - decoded2[k][i], msg=f"{k} client {i}")
    assert lossy(aggregate2, {k: v.mean(0) for k, v in by_hand(u2, lambda r: topk_by_hand(r, 0.3)).items()})


@pytest.mark.parametrize("comp", [TopK(fraction=0.3), SignSGD(), BF16(error_feedback=True)], ids=["topk", "sign", "bf16"])
def test_error_feedback_telescopes_over_rounds(comp):
    """Σ_t decoded_t + e_T = Σ_t u_t for one client, the parameters moving between rounds."""
    model = fedavg(comp)
    raw = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    sent = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for r in range(5):
        batch = replace(sinusoid_batch(1, seed=10 + r), client_id=[7])
        u = model.client_updates(batch)
        aggregate, _ = model.round_gradients(batch)  # one client: the mean is its decoded upload
        with torch.no_grad():
            for k, p in model.named_parameters():
                raw[k] += u[k][0]
                sent[k] += aggregate[k]
                p -= 0.5 * p.grad
    residual = model.upload_residuals.rows[7]
    assert set(model.upload_residuals.rows) == {7}
    assert any(float(residual[k].abs().max()) > 0 for k in raw)
    assert lossy(sent, raw)
    for k in raw:
        torch.testing.assert_close(sent[k] + residual[k], raw[k], rtol=1e-12, atol=1e-12, msg=k)


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize(
    "comp, per_client",
    [
        (SignSGD(), 3 * (4 + 2) + (4 + 1)),  # hidden 10: three tensors of 10 values, one of 1
        (TopK(fraction=0.25), 3 * 3 * (4 + 2) + 1 * (4 + 2)),  # k = ⌈2.5⌉ = 3, and k = 1 for the bias
        (BF16(), 2 * 31),
    ],
    ids=["sign", "topk", "bf16"],
)
def test_upload_bytes_of_a_fit_count_the_encoded_bytes(comp, per_client):
    model = maml(comp, hidden=10)
    params = {k: p.detach() for k, p in model.named_parameters()}
    assert sum(p.numel() for p in params.values()) == 31 and all(p.dtype == torch.float32 for p in params.values())
    quiet_trainer(max_steps=3).fit(model, datamodule=data(3))
    assert model.communication["rounds"] == 3
    assert model.communication["upload_bytes"] == 3 * 3 * per_client
    assert model.communication["download_bytes"] == 3 * 3 * 31 * 4  # the download stays full precision
    like = {k: torch.randn(2, *p.shape) for k, p in params.items()}
    assert encoded_bytes(comp.encode_all(like, 0, [0, 1])) == per_client


# The resumed fit needs no checkpoint callback of its own; Lightning's reminder about it is expected.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("comp", [TopK(fraction=0.2), QSGD(levels=2, seed=1)], ids=["topk_ef", "qsgd"])
def test_resume_continues_compressed_rounds_exactly(tmp_path, comp):
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = maml(comp)
    quiet_trainer(max_steps=6).fit(straight, datamodule=data(6))
    every3 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    first = maml(comp)
    quiet_trainer(max_steps=3, enable_checkpointing=True, callbacks=[every3]).fit(first, datamodule=data(6))
    resumed = maml(comp)
    quiet_trainer(max_steps=6).fit(resumed, datamodule=data(6), ckpt_path=str(tmp_path / "step=3.ckpt"))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, **EXACT, msg=name)
    assert resumed.communication == straight.communication
    if not comp.error_feedback:
        assert straight.upload_residuals is None and resumed.upload_residuals is None
        return
    saved = torch.load(tmp_path / "step=3.ckpt", weights_only=False)
    assert "metafed_upload_residuals" in saved
    assert set(saved["metafed_upload_residuals"]["rows"]) == set(first.upload_residuals.rows) != set()
    rows, again = straight.upload_residuals.rows, resumed.upload_residuals.rows
    assert set(rows) == set(again) and len(rows) > len(first.upload_residuals.rows)
    for client in rows:
        for k in rows[client]:
            torch.testing.assert_close(again[client][k], rows[client][k], **EXACT, msg=f"client {client} {k}")


def test_a_nan_upload_is_rejected_and_its_client_keeps_its_old_residual():
    comp = TopK(fraction=0.3)
    model = fedavg(comp)
    model.round_gradients(sinusoid_batch(3, seed=1))  # every client 0, 1, 2 gets a residual
    before = {i: {k: v.clone() for k, v in model.upload_residuals.rows[i].items()} for i in range(3)}
    batch = sinusoid_batch(3, seed=2)
    bad_x = batch.support_x.clone()
    bad_x[1] = float("nan")
    batch = replace(batch, support_x=bad_x)
    u = model.client_updates(batch)
    assert not torch.isfinite(u["net.0.weight"][1]).all() and torch.isfinite(u["net.0.weight"][[0, 2]]).all()
    with pytest.warns(UserWarning, match="rejected 1 of 3"):
        result = model.run_round(batch)
    assert result.counts.rejected == 1 and result.counts.survivors == 3
    with pytest.warns(UserWarning, match="rejected 1 of 3"):
        aggregate, _ = model.round_gradients(batch)
    for k in u:
        torch.testing.assert_close(model.upload_residuals.rows[1][k], before[1][k], **EXACT, msg=k)
    good = [0, 2]
    sent = {k: u[k][good] + torch.stack([before[i][k] for i in good]) for k in u}
    decoded = by_hand(sent, lambda r: topk_by_hand(r, 0.3))
    for k in u:
        torch.testing.assert_close(aggregate[k], decoded[k].mean(0), msg=k)
        for j, i in enumerate(good):
            torch.testing.assert_close(model.upload_residuals.rows[i][k], sent[k][j] - decoded[k][j], msg=f"{k} client {i}")
    assert all(lossy(model.upload_residuals.rows[i], before[i]) for i in good)  # accepted: written anew


def test_dropped_clients_upload_nothing_and_keep_no_new_residual():
    faults = ClientFaults(dropout=0.5, seed=1)
    model = fedavg(SignSGD(), faults=faults)
    batch = sinusoid_batch(6, seed=9)
    dropped = faults.dropped(0, 6)
    assert 0 < int(dropped.sum()) < 6
    kept = [i for i in range(6) if not dropped[i]]
    u = model.client_updates(batch)
    aggregate, _ = model.round_gradients(batch)
    assert sorted(model.upload_residuals.rows) == kept
    decoded = by_hand({k: v[kept] for k, v in u.items()}, sign_by_hand)
    for k in u:
        torch.testing.assert_close(aggregate[k], decoded[k].mean(0), rtol=1e-6, atol=1e-7, msg=k)
    per_client = sum(v.element_size() + math.ceil(v[0].numel() / 8) for v in u.values())  # a float64 scale, 1 bit a value
    assert model.communication["upload_bytes"] == len(kept) * per_client


def test_a_robust_aggregator_takes_the_median_of_the_decoded_uploads():
    model = fedavg(SignSGD(), aggregator=CoordinateMedian())
    batch = sinusoid_batch(3, seed=3)
    u = model.client_updates(batch)
    aggregate = model.run_round(batch).aggregate
    decoded = by_hand(u, sign_by_hand)
    for k in u:
        torch.testing.assert_close(aggregate[k], decoded[k].median(0).values, rtol=1e-6, atol=1e-7, msg=k)
    assert lossy(aggregate, {k: v.median(0).values for k, v in u.items()})


def test_byzantine_attacks_replace_the_decoded_uploads():
    """A 'random' attack scales by the RMS of what the server received (the decoded upload), and
    is dense although top-k uploads are sparse: the attack comes after decoding."""
    faults = ClientFaults(byzantine_fraction=0.999, byzantine_attack="random", byzantine_scale=2.0, seed=5)
    model = fedavg(TopK(fraction=0.3), faults=faults)
    batch = replace(sinusoid_batch(3, seed=4), client_id=torch.tensor([0, 1, 2]))
    bad = faults.byzantine(0, batch.client_id, 3)
    assert bad.tolist() == [True, True, True]
    u = model.client_updates(batch)
    result = model.run_round(batch)
    aggregate = result.aggregate
    assert result.counts.byzantine == 3
    decoded = by_hand(u, lambda r: topk_by_hand(r, 0.3))
    expected = faults.attack(decoded, bad, 0)
    for k in u:
        torch.testing.assert_close(aggregate[k], expected[k].mean(0), msg=k)
    assert bool((aggregate["net.0.weight"] != 0).all())


def test_client_dp_clips_the_decoded_uploads():
    comp, batch = TopK(fraction=0.3), sinusoid_batch(3, seed=5)
    quiet = fedavg(comp, aggregator=Mean(), privacy=ClientDP(clip_norm=0.05, noise_multiplier=0.0, seed=0, sample_rate=0.1))
    u = quiet.client_updates(batch)
    decoded = by_hand(u, lambda r: topk_by_hand(r, 0.3))
    norms = torch.stack([sum(decoded[k][i].pow(2).sum() for k in u).sqrt() for i in range(3)])
    assert bool((norms > 0.05).any())  # clipping is at work
    scale = torch.clamp(0.05 / norms, max=1.0)
    result = quiet.run_round(batch)
    assert result.counts.clipped == int((norms > 0.05).sum())
    for k in u:
        clipped = decoded[k] * scale.view(-1, *[1] * (decoded[k].dim() - 1))
        torch.testing.assert_close(result.aggregate[k], clipped.sum(0) / 3, msg=k)
    noisy_dp = ClientDP(clip_norm=0.05, noise_multiplier=1.0, seed=0, sample_rate=0.1)
    noisy = fedavg(comp, aggregator=Mean(), privacy=noisy_dp)
    expected, _ = noisy_dp.aggregate(decoded, 3, 0, 0)
    got = noisy.run_round(batch).aggregate
    for k in u:
        torch.testing.assert_close(got[k], expected[k], msg=k)


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("name", ["median", "dp"])
def test_short_fits_with_robust_aggregation_or_dp_stay_finite(name):
    kw = (
        dict(aggregator=CoordinateMedian())
        if name == "median"
        else dict(privacy=ClientDP(clip_norm=0.1, noise_multiplier=0.5, seed=0, sample_rate=0.5))
    )
    model = maml(SignSGD(), **kw)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    quiet_trainer(max_steps=3).fit(model, datamodule=data(3))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert lossy({k: p.detach() for k, p in model.named_parameters()}, before)
    assert model.communication["upload_bytes"] == 3 * 3 * (3 * (4 + 1) + (4 + 1))
    assert len(model.upload_residuals.rows) > 0


def test_fast_path_residual_store_and_argument_check():
    assert maml()._use_fast_path() is True
    assert maml(TopK())._use_fast_path() is False
    assert maml().upload_residuals is None
    for comp in (BF16(), QSGD(), RandK(), TopK(error_feedback=False), SignSGD(error_feedback=False)):
        assert maml(comp).upload_residuals is None, comp
        assert maml(comp)._use_fast_path() is False
    for comp in (TopK(), SignSGD(), BF16(error_feedback=True)):
        store = maml(comp).upload_residuals
        assert isinstance(store, ResidualStore) and len(store.rows) == 0
    with pytest.raises(ValueError, match="`compressor`"):
        maml("topk")
    with pytest.raises(ValueError, match="`compressor`"):
        lm.FedAvg(mlp(), compressor=0.1)


@pytest.mark.parametrize("comp", [QSGD(levels=1, seed=0), RandK(fraction=0.3, seed=0)], ids=["qsgd", "randk"])
def test_random_compressors_repeat_a_round_and_run_round_changes_nothing(comp):
    model = fedavg(comp)
    batch = sinusoid_batch(3, seed=6)
    first, again = model.run_round(batch), model.run_round(batch)
    for k in first.aggregate:
        torch.testing.assert_close(again.aggregate[k], first.aggregate[k], **EXACT, msg=k)
    assert model.communication["upload_bytes"] == 0 and first.new_residuals is None
    other = fedavg(type(comp)(**{**vars(comp), "seed": 1})).run_round(batch).aggregate
    assert lossy(other, first.aggregate)  # the seed matters
    u = model.client_updates(batch)
    enc0, dec0, kept = compress_uploads(comp, u, 0, batch.client_id)
    _, dec1, _ = compress_uploads(comp, u, 1, batch.client_id)
    assert kept is None and lossy(dec0, dec1)  # and so does the round
    assert encoded_bytes(enc0) == first.upload_bytes
    for k in u:
        torch.testing.assert_close(first.aggregate[k], dec0[k].mean(0), msg=k)


def test_run_round_returns_residuals_without_writing_them():
    model = fedavg(TopK(fraction=0.3))
    batch = sinusoid_batch(3, seed=7)
    u = model.client_updates(batch)
    result = model.run_round(batch)
    assert len(model.upload_residuals.rows) == 0 and model.communication["upload_bytes"] == 0
    assert list(result.new_residuals.client_id) == [0, 1, 2]
    _, decoded, kept = compress_uploads(TopK(fraction=0.3), u, 0, batch.client_id, {k: torch.zeros_like(v) for k, v in u.items()})
    for k in u:
        torch.testing.assert_close(result.new_residuals.rows[k], u[k] - decoded[k], msg=k)
        torch.testing.assert_close(kept[k], u[k] - decoded[k], **EXACT, msg=k)


@pytest.mark.parametrize("cls", [lm.MAML, lm.FedAvg, lm.PerFedAvg, lm.Ditto, lm.Reptile])
def test_every_algorithm_takes_a_compressor(cls):
    """BF16 rounds each upload to bfloat16 (nearest even) and sends 2 bytes a value."""
    model = cls(mlp(hidden=4), inner_optimizer=SGD(lr=0.05), aggregator=Mean(weighted=False), compressor=BF16())
    batch = sinusoid_batch(3, seed=8)
    u = model.client_updates(batch)
    aggregate, _ = model.round_gradients(batch)
    for k in u:
        torch.testing.assert_close(aggregate[k], u[k].to(torch.bfloat16).to(u[k].dtype).mean(0), msg=k)
    assert lossy(aggregate, {k: v.mean(0) for k, v in u.items()})
    assert model.communication["upload_bytes"] == 3 * 2 * sum(v[0].numel() for v in u.values())
