"""The upload compressors of ``lightning_metafed.functional.compress``, checked against their
definitions: hand-computed bit layouts and encodings, exact references built from plain torch ops,
an exact average over all permutations (RandK) and a statistical test with a known variance (QSGD)
for unbiasedness. Each hand case names the plausible wrong implementation ("mutation") it rules out."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_metafed.functional.compress import (
    bf16_decode,
    bf16_encode,
    index_dtype,
    pack_bits,
    qsgd_bits,
    qsgd_decode,
    qsgd_encode,
    randk_encode,
    sign_decode,
    sign_encode,
    sparse_decode,
    topk_encode,
    unpack_bits,
)

F64 = torch.float64
F32 = torch.float32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits_reference(codes: list[list[int]], bits: int) -> torch.Tensor:
    """The spec's layout written out bit by bit in plain Python."""
    rows = []
    for row in codes:
        out = [0] * math.ceil(len(row) * bits / 8)
        for j, code in enumerate(row):
            for b in range(bits):
                pos = j * bits + b
                out[pos // 8] |= ((code >> b) & 1) << (pos % 8)
        rows.append(out)
    return torch.tensor(rows, dtype=torch.uint8)


# ------------------------------------------------------------------------------ bit packing


@pytest.mark.parametrize(
    ("codes", "bits", "expected"),
    [
        # 5=101, 2=010, 7=111 -> stream 1,0,1 | 0,1,0 | 1,1,1: byte0 = 1+4+16+64+128, byte1 = 1.
        # Mutations: MSB-first bits within a code; a code straddling two bytes dropped or re-aligned.
        ([[5, 2, 7]], 3, [[213, 1]]),
        # 17=10001, 9=01001 -> stream 1,0,0,0,1 | 1,0,0,1,0: byte0 = 1+16+32, byte1 = 1.
        ([[17, 9]], 5, [[49, 1]]),
        # One bit per code: 1,0,1,1,0,0,0,0 | 1 -> 13, 1.
        ([[1, 0, 1, 1, 0, 0, 0, 0, 1]], 1, [[13, 1]]),
        # Eight bits: the bytes are the codes themselves.
        ([[0, 255, 128, 1]], 8, [[0, 255, 128, 1]]),
        # Rows are packed (and padded) independently: 1,1,0,0,1,0 -> 19 and 1,0,0,1,1,1 -> 57.
        ([[3, 0, 1], [1, 2, 3]], 2, [[19], [57]]),
    ],
)
def test_pack_bits_hand_layout(codes, bits, expected):
    packed = pack_bits(torch.tensor(codes, dtype=torch.long), bits)
    assert packed.dtype == torch.uint8
    torch.testing.assert_close(packed, torch.tensor(expected, dtype=torch.uint8), rtol=0, atol=0)
    n = len(codes[0])
    torch.testing.assert_close(unpack_bits(packed, bits, n), torch.tensor(codes, dtype=torch.int64), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 11, 16])
@pytest.mark.parametrize("n", [1, 7, 13])
def test_pack_unpack_round_trip_and_layout(bits, n):
    codes = torch.randint(0, 2**bits, (3, n), generator=_gen(bits * 100 + n))
    codes[0, 0] = 2**bits - 1  # the largest code, all bits set
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, math.ceil(n * bits / 8))
    torch.testing.assert_close(packed, _bits_reference(codes.tolist(), bits), rtol=0, atol=0)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.int64
    torch.testing.assert_close(out, codes, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("n", "dtype"),
    [(1, torch.int16), (2**15, torch.int16), (2**15 + 1, torch.int32), (2**31, torch.int32), (2**31 + 1, torch.int64)],
)
def test_index_dtype_boundaries(n, dtype):
    assert index_dtype(n) == dtype


# ------------------------------------------------------------------------------ bfloat16


@pytest.mark.parametrize("dtype", [F32, F64])
def test_bf16_encode_decode_matches_bfloat16_rounding(dtype):
    x = torch.randn(3, 11, generator=_gen(1), dtype=dtype) * 10.0 ** torch.arange(-5, 6, dtype=dtype)
    x[0, :5] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-40], dtype=dtype)
    x[1, 0] = 1 + 2**-8 + 2**-20  # just above the halfway point 1 + 2**-8 between 1 and 1 + 2**-7
    enc = bf16_encode(x)
    assert set(enc) == {"bits"}
    assert enc["bits"].dtype == torch.int16 and enc["bits"].shape == (3, 11)
    torch.testing.assert_close(enc["bits"], x.to(torch.bfloat16).view(torch.int16), rtol=0, atol=0)
    out = bf16_decode(enc, dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, x.to(torch.bfloat16).to(dtype), rtol=0, atol=0)
    assert out[1, 0].item() == 1 + 2**-7  # rounded to nearest, not truncated to 1.0
    x[2, 3] = float("nan")
    assert torch.isnan(bf16_decode(bf16_encode(x), dtype)[2, 3])


# ------------------------------------------------------------------------------ QSGD


@pytest.mark.parametrize(("levels", "bits"), [(1, 2), (2, 3), (3, 3), (4, 4), (7, 4), (8, 5), (16384, 16)])
def test_qsgd_bits(levels, bits):
    assert qsgd_bits(levels) == bits


def test_qsgd_hand_case():
    # x = [3, -4]: norm 5; s = 2: r = [1.2, 1.6], p = [0.2, 0.6]; u = [0.1, 0.7] -> l = [2, 1].
    # codes = 2 + [+2, -1] = [4, 1] in 3 bits: stream 0,0,1 | 1,0,0 -> one byte 4 + 8 = 12.
    # Mutations: rounding by u > p (gives l = [1, 2]); codes without the +s offset; wrong sign.
    x = torch.tensor([[3.0, -4.0]], dtype=F64)
    enc = qsgd_encode(x, 2, torch.tensor([[0.1, 0.7]], dtype=F64))
    assert set(enc) == {"norm", "codes"}
    assert enc["norm"].dtype == F64 and enc["norm"].shape == (1, 1)
    torch.testing.assert_close(enc["norm"], torch.tensor([[5.0]], dtype=F64))
    assert enc["codes"].dtype == torch.uint8
    torch.testing.assert_close(enc["codes"], torch.tensor([[12]], dtype=torch.uint8), rtol=0, atol=0)
    out = qsgd_decode(enc, 2, 2, F64)
    torch.testing.assert_close(out, torch.tensor([[5.0, -2.5]], dtype=F64), rtol=0, atol=1e-15)


def test_qsgd_levels_reference_and_grid():
    """Random x and uniforms against the spec's formula; every decoded value is norm·k/s with an
    integer |k| <= s of x's sign (or 0), and |k| is floor(r) or floor(r) + 1."""
    for s in (1, 3, 5, 16384):
        x = torch.randn(4, 9, generator=_gen(s), dtype=F64)
        x[1] = 0.0
        x[2, 0], x[2, 1:] = 2.0, 0.0  # a single non-zero coordinate: r = s exactly (clamp case)
        u = torch.rand(4, 9, generator=_gen(10 + s), dtype=F64)
        enc = qsgd_encode(x, s, u)
        assert enc["codes"].shape == (4, math.ceil(9 * qsgd_bits(s) / 8))
        out = qsgd_decode(enc, s, 9, F64)
        norm = x.norm(dim=1, keepdim=True)
        torch.testing.assert_close(enc["norm"], norm)
        r = s * x.abs() / norm.clamp_min(1e-300)
        level = (r.floor() + (u < r - r.floor()).double()).clamp(max=s)
        torch.testing.assert_close(out, norm * torch.sign(x) * level / s, rtol=1e-12, atol=1e-15)
        k = torch.where(norm > 0, out * s / norm.clamp_min(1e-300), torch.zeros_like(out))
        torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-9)
        assert (k.abs() <= s + 1e-9).all()
        assert ((torch.sign(k.round()) == torch.sign(x)) | (k.round() == 0)).all()
        torch.testing.assert_close(out[1], torch.zeros(9, dtype=F64), rtol=0, atol=0)  # zero row, no NaN
        torch.testing.assert_close(out[2], x[2], rtol=0, atol=1e-15)
        assert torch.equal(enc["codes"], qsgd_encode(x, s, u.clone())["codes"])  # deterministic given u


def test_qsgd_zero_row_float32():
    x = torch.zeros(2, 5, dtype=F32)
    x[1] = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    enc = qsgd_encode(x, 4, torch.rand(2, 5, generator=_gen(3), dtype=F64))
    assert enc["norm"].dtype == F32
    out = qsgd_decode(enc, 4, 5, F32)
    assert out.dtype == F32 and torch.isfinite(out).all()
    torch.testing.assert_close(out[0], torch.zeros(5, dtype=F32), rtol=0, atol=0)


def test_qsgd_unbiased_statistically():
    """T independent encodings of one x: their mean is within 5 standard errors of x per coordinate,
    where the per-coordinate variance is norm²/s²·p(1−p). The bound is below 0.1·|x_j|/2.1, so a
    decoder off in scale by 10 % (|1.1·mean − x| >= 0.1·|x| − 1.1·bound) fails it, as checked below."""
    s, trials = 4, 12000
    x = torch.tensor([3.0, -2.0, 1.5, -1.0, 2.5, 0.8, -1.2, 2.0], dtype=F64)
    norm = x.norm()
    r = s * x.abs() / norm
    p = r - r.floor()
    se = norm / s * torch.sqrt(p * (1 - p) / trials)
    bound = 5 * se + 1e-12
    assert (bound < 0.1 * x.abs() / 2.1).all()
    u = torch.rand(trials, x.numel(), generator=_gen(2024), dtype=F64)
    enc = qsgd_encode(x.expand(trials, -1).clone(), s, u)
    mean = qsgd_decode(enc, s, x.numel(), F64).mean(0)
    assert ((mean - x).abs() <= bound).all(), (mean - x) / se
    assert ((1.1 * mean - x).abs() > bound).all()
    assert ((0.9 * mean - x).abs() > bound).all()


# ------------------------------------------------------------------------------ top-k / rand-k


def test_topk_hand_case_and_decode():
    # |x| ranks: row 0 keeps -9 and 7 (mutation: largest signed values would keep 7 and 2);
    # row 1 keeps its own top 2 (mutation: one index set shared across rows).
    x = torch.tensor([[1.0, -9.0, 2.0, 7.0, 0.5], [6.0, 0.1, -0.2, 0.3, -5.0]], dtype=F64)
    enc = topk_encode(x, 2)
    assert set(enc) == {"values", "indices"}
    assert enc["values"].shape == (2, 2) and enc["indices"].shape == (2, 2)
    assert enc["indices"].dtype == torch.int16
    assert [sorted(row) for row in enc["indices"].tolist()] == [[1, 3], [0, 4]]
    torch.testing.assert_close(enc["values"], x.gather(1, enc["indices"].long()), rtol=0, atol=0)
    out = sparse_decode(enc, 5, F64)
    expected = torch.tensor([[0.0, -9.0, 0.0, 7.0, 0.0], [6.0, 0.0, 0.0, 0.0, -5.0]], dtype=F64)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert sparse_decode(enc, 5, F32).dtype == F32


def test_topk_random_matches_sort_reference():
    n, k = 40000, 37  # n > 2**15: int32 indices
    x = torch.randn(2, n, generator=_gen(5), dtype=F64)
    enc = topk_encode(x, k)
    assert enc["indices"].dtype == torch.int32
    for i in range(2):
        ref = set(x[i].abs().argsort(descending=True)[:k].tolist())
        assert set(enc["indices"][i].long().tolist()) == ref
    dense = sparse_decode(enc, n, F64)
    kept = dense != 0
    assert kept.sum().item() == 2 * k
    torch.testing.assert_close(dense[kept], x[kept], rtol=0, atol=0)


def test_randk_hand_case():
    # The k = 2 smallest draws of row 0 are at 3 and 1, of row 1 at 0 and 2; values scaled by n/k = 2.
    # Mutations: the k largest draws; no n/k scaling; x's own largest coordinates.
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=F64)
    u = torch.tensor([[0.9, 0.2, 0.5, 0.1], [0.05, 0.7, 0.3, 0.8]], dtype=F64)
    enc = randk_encode(x, 2, u)
    assert enc["indices"].dtype == torch.int16 and enc["values"].shape == (2, 2)
    assert [sorted(row) for row in enc["indices"].tolist()] == [[1, 3], [0, 2]]
    torch.testing.assert_close(enc["values"], 2 * x.gather(1, enc["indices"].long()), rtol=0, atol=0)
    expected = torch.tensor([[0.0, 4.0, 0.0, 8.0], [10.0, 0.0, 14.0, 0.0]], dtype=F64)
    torch.testing.assert_close(sparse_decode(enc, 4, F64), expected, rtol=0, atol=0)


def test_randk_exactly_unbiased_over_all_permutations():
    """Uniform draws that rank the coordinates in every one of the n! orders, equally often: the
    mean decode is x exactly (E over uniform = x), for several k."""
    n = 5
    x = torch.tensor([1.5, -2.0, 0.25, 4.0, -3.0], dtype=F64)
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=F64)
    u = (perms + 0.5) / n
    xs = x.expand(perms.shape[0], -1).clone()
    for k in (1, 2, 3, 5):
        mean = sparse_decode(randk_encode(xs, k, u), n, F64).mean(0)
        torch.testing.assert_close(mean, x, rtol=1e-12, atol=1e-12)


def test_randk_nonfinite_rows_become_nan():
    x = torch.tensor([[1.0, float("nan"), 3.0, 4.0], [1.0, 2.0, float("inf"), 4.0], [1.0, 2.0, 3.0, 4.0]])
    # Rows 0 and 1 keep only finite coordinates (the non-finite one is not among the k = 2 chosen).
    u = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.1, 0.2, 0.9, 0.8], [0.1, 0.2, 0.9, 0.8]], dtype=F64)
    enc = randk_encode(x, 2, u)
    assert torch.isnan(enc["values"][:2]).all()
    torch.testing.assert_close(enc["values"][2].sort().values, torch.tensor([2.0, 4.0]), rtol=0, atol=0)


# ------------------------------------------------------------------------------ sign


def test_sign_hand_case():
    # Signs 0,1,1,0,1,1,0,1 | 1 (0 counts as >= 0): byte0 = 2+4+16+32+128 = 182, byte1 = 1.
    # Mutations: bit 1 for x > 0 only (bit 1 of byte0 lost); scale = max|x| or ||x||_2/n.
    x = torch.tensor([[-1.0, 0.0, 2.0, -3.0, 4.0, 5.0, -6.0, 7.0, 0.5]], dtype=F64)
    enc = sign_encode(x)
    assert set(enc) == {"scale", "signs"}
    torch.testing.assert_close(enc["scale"], torch.tensor([[28.5 / 9]], dtype=F64))
    torch.testing.assert_close(enc["signs"], torch.tensor([[182, 1]], dtype=torch.uint8), rtol=0, atol=0)
    out = sign_decode(enc, 9, F64)
    signs = torch.tensor([[-1.0, 1, 1, -1, 1, 1, -1, 1, 1]], dtype=F64)
    torch.testing.assert_close(out, 28.5 / 9 * signs)


def test_sign_random_rows():
    x = torch.randn(3, 21, generator=_gen(8), dtype=F32)
    enc = sign_encode(x)
    assert enc["scale"].shape == (3, 1) and enc["scale"].dtype == F32
    assert enc["signs"].shape == (3, 3) and enc["signs"].dtype == torch.uint8
    out = sign_decode(enc, 21, F32)
    ref = x.abs().mean(1, keepdim=True) * torch.where(x >= 0, 1.0, -1.0)
    torch.testing.assert_close(out, ref)
