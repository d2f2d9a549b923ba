"""The compression stage's edge cases: residuals of non-finite clients, rows read back on another
device, encodings no encoder produces, batches without client ids, malformed checkpoint entries."""

from __future__ import annotations

import pytest
import torch

from lightning_metafed.compression import QSGD, RandK, SignSGD, TopK
from lightning_metafed.functional.compress import qsgd_decode, qsgd_encode, sparse_decode
from lightning_metafed.round import ResidualStore, UploadCompression, Uploads, compress_uploads


def test_a_nonfinite_client_keeps_its_old_residual_even_when_its_upload_is_not_screened_out():
    updates = {"w": torch.randn(3, 20, dtype=torch.float64)}
    updates["w"][1, 4] = float("nan")
    residual = {"w": torch.randn(3, 20, dtype=torch.float64)}
    _, decoded, kept = compress_uploads(TopK(0.2), updates, 0, [0, 1, 2], residual)
    assert torch.isnan(decoded["w"][1]).all() and torch.isfinite(decoded["w"][[0, 2]]).all()
    torch.testing.assert_close(kept["w"][1], residual["w"][1], rtol=0, atol=0)  # not NaN: the old residual
    torch.testing.assert_close(kept["w"][0], updates["w"][0] + residual["w"][0] - decoded["w"][0])


def test_residuals_read_back_on_another_device_are_moved_to_the_uploads():
    store = ResidualStore()
    store.load_state_dict({"rows": {0: {"w": torch.ones(3)}}})  # as a checkpoint loads them: on the CPU
    uploads = {"w": torch.zeros(2, 3, device="meta")}  # stands for the accelerator the uploads live on
    rows = store.gather_like([0, 1], uploads)
    assert rows["w"].device.type == "meta" and rows["w"].shape == (2, 3)
    with pytest.raises(ValueError, match=r"residuals \{'w': \(3,\)\} do not match the uploads \{'w': \(4,\)\}"):
        store.gather_like([0], {"w": torch.zeros(1, 4)})


def test_encodings_no_encoder_produces_decode_to_nan_rows():
    values = torch.ones(2, 2)
    indices = torch.tensor([[0, 3], [1, 9]], dtype=torch.int16)  # client 1 names index 9 of a 4-value tensor
    out = sparse_decode({"values": values, "indices": indices}, 4, torch.float32)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.isnan(out[1]).all()
    encoding = qsgd_encode(torch.randn(2, 6), 1, torch.rand(2, 6))
    encoding["codes"][1] = 0xFF  # 2-bit codes of 3 > 2s = 2
    decoded = qsgd_decode(encoding, 1, 6, torch.float32)
    assert torch.isfinite(decoded[0]).all() and torch.isnan(decoded[1]).all()


def test_error_feedback_without_client_ids_is_refused_by_name():
    uploads = Uploads({"w": torch.randn(2, 3)}, {}, None, None, 12)
    with pytest.raises(ValueError, match=r"`compressor` = SignSGD\(error_feedback=True\) keeps an error-feedback residual per client.*got None"):
        UploadCompression(SignSGD(), ResidualStore())(uploads, 0)
    assert UploadCompression(RandK(0.5))(uploads, 0).bytes_per_client == 2 * (4 + 2)  # no residual: row positions seed it


@pytest.mark.parametrize(
    "state, match",
    [
        ([], r"got list without a 'rows' mapping"),
        ({"rows": {7: [1, 2]}}, r"client 7's residual to be \{name: tensor\}, got list"),
        ({"rows": {1: {"w": torch.zeros(2)}, 2: {"w": torch.zeros(3)}}}, r"same names and shapes"),
    ],
)
def test_malformed_residual_entries_are_named(state, match):
    with pytest.raises(ValueError, match=match):
        ResidualStore().load_state_dict(state)


def test_bfloat16_uploads_are_quantized_unbiased():
    x = torch.full((5000, 4), 0.3, dtype=torch.bfloat16)  # each row: ‖x‖ = 0.6, so every level is 0 or 1 with p = 1/2
    c = QSGD(levels=1)
    decoded = c.decode_all(c.encode_all({"x": x}, 0, list(range(5000))), {"x": x})["x"].double()
    assert set(decoded.unique().tolist()) == {0.0, torch.tensor(0.6, dtype=torch.bfloat16).item()}
    # 20,000 draws: the standard error of the mean is 0.5 % of 0.3; a scale or rounding bias of 2 % fails
    assert abs(decoded.mean().item() / 0.3 - 1) < 0.02


def test_rounds_run_by_hand_draw_anew_each_round():
    """Outside a Trainer the round index is the number of rounds run so far (not a frozen global step),
    so QSGD's rounding (like faults and DP noise) differs from round to round."""
    import lightning_metafed as lm
    from lightning_metafed.data import SinusoidClients
    from lightning_metafed.nets import MLP

    data = SinusoidClients(num_clients=20, clients_per_round=4, support_size=5, query_size=5, seed=0)
    data.setup("fit")
    batch = data.round_batch(0)
    model = lm.MAML(MLP(1, [8], 1), compressor=QSGD(levels=1))  # weights fall between levels
    expected = [model.run_round(batch, r).aggregate for r in (0, 1)]
    first, _ = model.round_gradients(batch)
    second, _ = model.round_gradients(batch)  # no server step in between: only the draws change
    assert not all(torch.equal(first[k], second[k]) for k in first)
    for got, want in zip((first, second), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert model.communication["rounds"] == 2
