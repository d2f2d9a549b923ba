"""The compressor classes of ``lightning_metafed.compression``: argument checks, the per-parameter
``encode_all`` / ``decode_all`` round, the counter-based randomness (a pure function of seed, round,
client id, parameter index and coordinate), kept-coordinate counts and the bytes one client sends,
checked by hand for a float32 model with parameters of shapes (40, 5) and (7,)."""

from __future__ import annotations

import builtins
import math

import pytest
import torch

from lightning_metafed.compression import (
    BF16,
    QSGD,
    Compressor,
    RandK,
    SignSGD,
    TopK,
    client_numbers,
    encoded_bytes,
    round_uniforms,
)

F64 = torch.float64
F32 = torch.float32
ALL = [BF16, QSGD, TopK, RandK, SignSGD]


def _model(m: int = 3, seed: int = 0, dtype=F32) -> dict[str, torch.Tensor]:
    """Uploads of a model with parameters ``w`` (40, 5) and ``b`` (7,), n = 200 and 7."""
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(m, 40, 5, generator=gen, dtype=dtype), "b": torch.randn(m, 7, generator=gen, dtype=dtype)}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[name].keys() == b[name].keys() and all(torch.equal(a[name][p], b[name][p]) for p in a[name]) for name in a
    )


def _rows(encoded, rows) -> dict:
    return {name: {p: t[rows] for p, t in parts.items()} for name, parts in encoded.items()}


# ------------------------------------------------------------------------------ attributes and arguments


@pytest.mark.parametrize(
    ("cls", "unbiased", "random", "error_feedback"),
    [(BF16, False, False, False), (QSGD, True, True, False), (TopK, False, False, True), (RandK, True, True, False), (SignSGD, False, False, True)],
)
def test_class_attributes_and_defaults(cls, unbiased, random, error_feedback):
    c = cls()
    assert isinstance(c, Compressor)
    assert (c.unbiased, c.random, c.error_feedback, c.seed) == (unbiased, random, error_feedback, 0)
    assert (cls.unbiased, cls.random) == (unbiased, random)
    if cls in (TopK, RandK):
        assert c.fraction == 0.1
    if cls is QSGD:
        assert c.levels == 1


@pytest.mark.parametrize(
    ("make", "name", "shown"),
    [
        (lambda: QSGD(levels=0), "levels", "0"),
        (lambda: QSGD(levels=16385), "levels", "16385"),
        (lambda: QSGD(levels=2.0), "levels", "2.0"),
        (lambda: QSGD(levels=True), "levels", "True"),
        (lambda: QSGD(seed=1.5), "seed", "1.5"),
        (lambda: RandK(seed="3"), "seed", "'3'"),
        (lambda: TopK(fraction=0), "fraction", "0"),
        (lambda: TopK(fraction=1.5), "fraction", "1.5"),
        (lambda: RandK(fraction=-0.1), "fraction", "-0.1"),
        (lambda: RandK(fraction="0.5"), "fraction", "'0.5'"),
        (lambda: TopK(error_feedback=1), "error_feedback", "1"),
        (lambda: SignSGD(error_feedback="yes"), "error_feedback", "'yes'"),
        (lambda: BF16(error_feedback=0), "error_feedback", "0"),
    ],
)
def test_bad_arguments_name_argument_and_value(make, name, shown):
    with pytest.raises(ValueError, match=rf"`?{name}`?.*{shown}") as info:
        make()
    assert name in str(info.value) and shown in str(info.value)


def test_boundary_arguments_accepted():
    assert QSGD(levels=16384).levels == 16384
    assert TopK(fraction=1.0).fraction == 1.0
    assert RandK(fraction=1e-6, seed=-5).seed == -5
    assert BF16(error_feedback=True).error_feedback is True
    assert TopK(error_feedback=False).error_feedback is False


# ------------------------------------------------------------------------------ encode_all / decode_all


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_decode_all_shapes_and_dtypes(cls, dtype):
    updates = _model(dtype=dtype)
    encoded = cls().encode_all(updates, 0, [0, 1, 2])
    assert set(encoded) == {"w", "b"}
    assert all(t.shape[0] == 3 for parts in encoded.values() for t in parts.values())
    decoded = cls().decode_all(encoded, updates)
    assert set(decoded) == {"w", "b"}
    for name, u in updates.items():
        assert decoded[name].shape == u.shape and decoded[name].dtype == dtype
        assert torch.isfinite(decoded[name]).all()


def test_bf16_decode_all_is_per_parameter_rounding():
    updates = _model()
    decoded = BF16().decode_all(BF16().encode_all(updates, 0, None), updates)
    for name, u in updates.items():
        torch.testing.assert_close(decoded[name], u.to(torch.bfloat16).to(F32), rtol=0, atol=0)


def test_each_parameter_compressed_on_its_own():
    """Sign scale is mean |x| of each parameter, not of the whole model (mutation: one flattened vector)."""
    updates = {"w": torch.full((2, 4, 3), 10.0, dtype=F64), "b": torch.tensor([[1.0, -1.0], [2.0, -2.0]], dtype=F64)}
    decoded = SignSGD().decode_all(SignSGD().encode_all(updates, 0, None), updates)
    torch.testing.assert_close(decoded["w"], updates["w"])
    torch.testing.assert_close(decoded["b"], updates["b"])


@pytest.mark.parametrize(("fraction", "k_w", "k_b"), [(0.1, 20, 1), (0.25, 50, 2), (0.3, 60, 3), (0.5, 100, 4), (1e-4, 1, 1), (1.0, 200, 7)])
@pytest.mark.parametrize("cls", [TopK, RandK])
def test_sparse_keep_counts(cls, fraction, k_w, k_b):
    assert (k_w, k_b) == (max(1, math.ceil(fraction * 200)), max(1, math.ceil(fraction * 7)))
    updates = _model()
    encoded = cls(fraction=fraction).encode_all(updates, 0, [0, 1, 2])
    assert encoded["w"]["values"].shape == (3, k_w) and encoded["w"]["indices"].shape == (3, k_w)
    assert encoded["b"]["values"].shape == (3, k_b)
    decoded = cls(fraction=fraction).decode_all(encoded, updates)
    assert ((decoded["w"] != 0).reshape(3, -1).sum(1) == k_w).all()
    assert ((decoded["b"] != 0).sum(1) == k_b).all()


# ------------------------------------------------------------------------------ bytes on the wire


@pytest.mark.parametrize(
    ("compressor", "expected"),
    [
        (BF16(), 2 * 207),
        (BF16(error_feedback=True), 2 * 207),
        # qsgd_bits(1) = 2: w 4 + ceil(400/8) = 54, b 4 + ceil(14/8) = 6.
        (QSGD(levels=1), 54 + 6),
        # qsgd_bits(3) = 3: w 4 + 75, b 4 + ceil(21/8) = 7.
        (QSGD(levels=3), 79 + 7),
        # qsgd_bits(8) = 5: w 4 + 125, b 4 + ceil(35/8) = 9.
        (QSGD(levels=8), 129 + 9),
        # k = 20 and 1, each kept value a float32 and an int16 index.
        (TopK(fraction=0.1), (20 + 1) * 6),
        (RandK(fraction=0.1), (20 + 1) * 6),
        (TopK(fraction=0.25), (50 + 2) * 6),
        (RandK(fraction=0.25), (50 + 2) * 6),
        # scale + ceil(n/8) bytes of signs: 4 + 25 and 4 + 1.
        (SignSGD(), 29 + 5),
    ],
)
def test_encoded_bytes_by_hand(compressor, expected):
    for m in (1, 3):
        encoded = compressor.encode_all(_model(m=m), 2, list(range(m)))
        assert encoded_bytes(encoded) == expected


# ------------------------------------------------------------------------------ biased compressors


def test_topk_decodes_exactly_the_largest_coordinates():
    updates = _model(dtype=F64, seed=4)
    decoded = TopK(fraction=0.1).decode_all(TopK(fraction=0.1).encode_all(updates, 0, None), updates)
    for name, k in (("w", 20), ("b", 1)):
        x, d = updates[name].reshape(3, -1), decoded[name].reshape(3, -1)
        for i in range(3):
            top = x[i].abs().argsort(descending=True)[:k]
            mask = torch.zeros_like(x[i], dtype=torch.bool)
            mask[top] = True
            torch.testing.assert_close(d[i][mask], x[i][mask], rtol=0, atol=0)
            assert (d[i][~mask] == 0).all()


def test_signsgd_decoded_norm_not_larger():
    for seed in range(5):
        updates = _model(dtype=F64, seed=seed)
        updates["w"][0] *= torch.linspace(0, 5, 200, dtype=F64).reshape(40, 5)  # uneven magnitudes
        decoded = SignSGD().decode_all(SignSGD().encode_all(updates, seed, None), updates)
        for name, u in updates.items():
            x, d = u.reshape(3, -1), decoded[name].reshape(3, -1)
            assert (d.norm(dim=1) <= x.norm(dim=1) * (1 + 1e-12)).all()
            torch.testing.assert_close(d.abs(), x.abs().mean(1, keepdim=True).expand_as(d))
            assert ((d > 0) == (x >= 0)).all()


# ------------------------------------------------------------------------------ randomness


@pytest.mark.parametrize("cls", [QSGD, RandK])
def test_randomness_is_a_pure_function_of_seed_round_and_client(cls):
    updates = _model(m=2, dtype=F64)
    ids = torch.tensor([3, 7], dtype=torch.int64)
    base = cls(seed=1).encode_all(updates, 5, ids)
    assert _same(base, cls(seed=1).encode_all({k: v.clone() for k, v in updates.items()}, 5, ids.clone()))
    assert not _same(base, cls(seed=1).encode_all(updates, 6, ids))  # another round
    assert not _same(base, cls(seed=2).encode_all(updates, 5, ids))  # another seed
    other = cls(seed=1).encode_all(updates, 5, torch.tensor([4, 7]))  # client 3 replaced by client 4
    assert not _same(_rows(base, [0]), _rows(other, [0]))
    assert _same(_rows(base, [1]), _rows(other, [1]))


@pytest.mark.parametrize("cls", [QSGD, RandK])
def test_client_encoding_independent_of_other_clients(cls):
    both = _model(m=2, dtype=F64, seed=9)
    alone = {k: v[1:] for k, v in both.items()}
    swapped = {k: v.flip(0) for k, v in both.items()}
    enc_both = cls(seed=3).encode_all(both, 2, [3, 7])
    enc_alone = cls(seed=3).encode_all(alone, 2, [7])
    enc_swapped = cls(seed=3).encode_all(swapped, 2, [7, 3])
    assert _same(_rows(enc_both, [1]), enc_alone)
    assert _same(_rows(enc_both, [1, 0]), enc_swapped)


@pytest.mark.parametrize("cls", [QSGD, RandK])
def test_client_id_forms(cls):
    updates = _model(m=2, dtype=F64, seed=2)
    c = cls(seed=0)
    as_tensor = c.encode_all(updates, 1, torch.tensor([0, 1], dtype=torch.int64))
    assert _same(as_tensor, c.encode_all(updates, 1, [0, 1]))
    assert _same(as_tensor, c.encode_all(updates, 1, None))  # None: row positions 0, 1
    names = c.encode_all(updates, 1, ["f0000_12", "alice"])
    assert _same(names, c.encode_all(updates, 1, ["".join(["f0000", "_12"]), "ali" + "ce"]))
    assert not _same(_rows(names, [0]), _rows(c.encode_all(updates, 1, ["f0000_13", "alice"]), [0]))
    assert _same(_rows(names, [1]), _rows(c.encode_all(updates, 1, ["f0000_13", "alice"]), [1]))


def test_string_ids_do_not_use_python_hash(monkeypatch):
    """Python's ``hash`` of a str changes from process to process (PYTHONHASHSEED); a stable hash
    must not call it. Patching ``builtins.hash`` leaves the keys unchanged."""
    ids = ["f0000_12", "alice", "bob"]
    before = client_numbers(ids, 3)
    assert before.dtype == torch.int64 and before.shape == (3,) and len(set(before.tolist())) == 3
    monkeypatch.setattr(builtins, "hash", lambda obj: 12345)
    torch.testing.assert_close(client_numbers(list(ids), 3), before, rtol=0, atol=0)


def test_client_numbers_and_round_uniforms():
    torch.testing.assert_close(client_numbers(None, 4), torch.arange(4), rtol=0, atol=0)
    torch.testing.assert_close(client_numbers([5, 2], 2), torch.tensor([5, 2]), rtol=0, atol=0)
    import numpy as np  # NumPy integers are ids like Python ints (not hashed as text)

    torch.testing.assert_close(client_numbers([np.int64(5), np.int32(2)], 2), torch.tensor([5, 2]), rtol=0, atol=0)
    u = round_uniforms(0, 3, torch.tensor([1, 2]), 0, 1000)
    assert u.shape == (2, 1000) and (u >= 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.03 and not torch.equal(u[0], u[1])
    torch.testing.assert_close(round_uniforms(0, 3, torch.tensor([2]), 0, 1000), u[1:], rtol=0, atol=0)
    assert not torch.equal(round_uniforms(0, 3, torch.tensor([1]), 1, 1000), u[:1])  # parameter index


@pytest.mark.parametrize("cls", [QSGD, RandK])
def test_parameters_numbered_in_sorted_name_order(cls):
    x = _model(m=2, dtype=F64, seed=6)["b"]
    c = cls(seed=0)
    ab = c.encode_all({"a": x, "b": x.clone()}, 0, [1, 2])
    ba = c.encode_all({"b": x.clone(), "a": x}, 0, [1, 2])
    assert _same(ab, ba)  # insertion order does not matter
    assert not _same({"p": ab["a"]}, {"p": ab["b"]})  # index 0 and index 1 draw different streams
    # "a" stays at index 0 whatever the other name is, as long as it sorts after "a".
    assert _same({"p": ab["a"]}, {"p": c.encode_all({"z": x.clone(), "a": x}, 0, [1, 2])["a"]})


@pytest.mark.parametrize("make", [lambda: QSGD(levels=4, seed=4), lambda: RandK(fraction=0.3, seed=4)], ids=["QSGD", "RandK"])
def test_class_randomness_unbiased_over_many_clients(make):
    """m clients upload the same x with distinct ids (independent draws): the mean decode is x
    within 5 standard errors of each coordinate. The bound is below 0.1·|x_j|/2.1, so a decoded scale
    off by 10 % (|1.1·mean − x| >= 0.1·|x| − 1.1·bound) fails it, as checked on 1.1 × the mean."""
    m = 20000
    x = torch.tensor([3.0, -2.0, 1.5, -1.0, 2.5, 0.8, -1.2], dtype=F64)
    c = make()
    updates = {"b": x.expand(m, -1).clone()}
    decoded = c.decode_all(c.encode_all(updates, 0, torch.arange(100, 100 + m)), updates)["b"]
    if isinstance(c, QSGD):
        r = c.levels * x.abs() / x.norm()
        p = r - r.floor()
        var = x.norm() ** 2 / c.levels**2 * p * (1 - p)
    else:
        var = x**2 * (7 / 3 - 1)  # n = 7, k = 3
    bound = 5 * torch.sqrt(var / m) + 1e-12
    assert (bound < 0.1 * x.abs() / 2.1).all()
    mean = decoded.mean(0)
    assert ((mean - x).abs() <= bound).all(), (mean - x) / bound * 5
    assert ((1.1 * mean - x).abs() > bound).all()
