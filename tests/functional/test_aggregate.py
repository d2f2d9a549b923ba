"""Aggregation math in ``lightning_metafed.functional.aggregate`` against independent references
(NumPy/SciPy order statistics, per-client Python loops, hand computations), the aggregator classes
against their functions, and bit-for-bit parity with the formulas the classes used before."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_metafed.aggregators import (
    Bucketing,
    CoordinateMedian,
    Mean,
    NormBoundedMean,
    TrimmedMean,
)
from lightning_metafed.data.seeding import PRIVACY, generator
from lightning_metafed.functional import (
    bucket_means,
    clip_to_norm,
    coordinate_median,
    finite_clients,
    noisy_clipped_mean,
    norm_bounded_mean,
    trimmed_mean,
    update_norms,
    weighted_mean,
)
from lightning_metafed.privacy import ClientDP

F64 = torch.float64


def _updates(m: int, seed: int, dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    """Random stacked uploads of ``m`` clients for three parameters of different shapes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (3, 2), "b": (4,), "s": ()}
    return {k: torch.randn(m, *shape, generator=gen, dtype=F64).to(dtype) for k, shape in shapes.items()}


def _client_vector(updates: dict[str, torch.Tensor], i: int) -> np.ndarray:
    """Client ``i``'s upload as one flat NumPy vector (all parameters together)."""
    return np.concatenate([u[i].numpy().ravel() for u in updates.values()])


# ------------------------------------------------------------------------ norms, clipping, finiteness


def test_update_norms_against_a_per_client_numpy_norm():
    updates = _updates(6, seed=0)
    expected = torch.tensor([np.linalg.norm(_client_vector(updates, i)) for i in range(6)], dtype=F64)
    torch.testing.assert_close(update_norms(updates), expected)


def test_clip_to_norm_against_a_per_client_loop():
    updates = _updates(7, seed=1)
    updates["w"][2] *= 1e-3  # one client well inside the bound, one far outside
    updates["b"][5] *= 1e3
    clipped, norms = clip_to_norm(updates, 1.5)
    for i in range(7):
        norm = float(np.linalg.norm(_client_vector(updates, i)))
        assert norms[i].item() == pytest.approx(norm, rel=1e-12)
        scale = min(1.0, 1.5 / norm)
        for k, u in updates.items():
            torch.testing.assert_close(clipped[k][i], u[i] * scale)
    assert update_norms(clipped).max().item() <= 1.5 + 1e-12


def test_finite_clients_against_a_loop():
    updates = _updates(5, seed=2)
    updates["w"][1, 2, 0] = float("nan")
    updates["s"][3] = float("-inf")
    expected = [all(bool(torch.isfinite(u[i]).all()) for u in updates.values()) for i in range(5)]
    assert finite_clients(updates).tolist() == expected == [True, False, True, False, True]


# ---------------------------------------------------------------------------- order statistics


@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_coordinate_median_against_numpy(m):
    updates = _updates(m, seed=3 + m)
    out = coordinate_median(updates)
    for k, u in updates.items():  # np.median averages the middle pair for an even count too
        torch.testing.assert_close(out[k], torch.from_numpy(np.asarray(np.median(u.numpy(), axis=0))))


@pytest.mark.parametrize("m, trim", [(10, 0.0), (10, 0.15), (9, 0.2), (20, 0.35), (7, 0.45)])
def test_trimmed_mean_against_scipy(m, trim):
    # scipy cuts int(trim·m) from each end; these products are far from an integer, so it is ⌊trim·m⌋
    updates = _updates(m, seed=10 + m)
    out = trimmed_mean(updates, trim)
    for k, u in updates.items():
        torch.testing.assert_close(out[k], torch.from_numpy(np.asarray(stats.trim_mean(u.numpy(), trim, axis=0))))


@pytest.mark.parametrize("m, trim", [(100, 0.29), (10, 0.3), (20, 0.35), (3, 0.49), (2, 0.49), (1, 0.3)])
def test_trimmed_mean_trims_the_exact_floor_or_falls_back_to_the_median(m, trim):
    # ⌊trim·m⌋ in exact rational arithmetic; 0.29·100 and 0.35·20 are inexact in floating point
    k = math.floor(Fraction(str(trim)) * m)
    updates = _updates(m, seed=20 + m)
    out = trimmed_mean(updates, trim)
    for name, u in updates.items():
        s = np.sort(u.numpy(), axis=0)
        expected = np.median(s, axis=0) if m - 2 * k < 1 else s[k : m - k].mean(axis=0)
        torch.testing.assert_close(out[name], torch.from_numpy(np.asarray(expected)))


# ------------------------------------------------------------------- norm-bounded mean, bucketing


def test_norm_bounded_mean_against_a_per_client_loop():
    updates = _updates(5, seed=30)
    weights = torch.tensor([1.0, 4.0, 2.0, 0.5, 3.0], dtype=F64)
    out = norm_bounded_mean(updates, 0.8, weights)
    unweighted = norm_bounded_mean(updates, 0.8)
    scales = [min(1.0, 0.8 / float(np.linalg.norm(_client_vector(updates, i)))) for i in range(5)]
    for k, u in updates.items():
        expected = sum(weights[i] * scales[i] * u[i] for i in range(5)) / weights.sum()
        torch.testing.assert_close(out[k], expected)
        torch.testing.assert_close(unweighted[k], sum(scales[i] * u[i] for i in range(5)) / 5)


@pytest.mark.parametrize("m, size", [(7, 3), (6, 2), (4, 1), (3, 5)])
def test_bucket_means_against_a_loop(m, size):
    updates = _updates(m, seed=40 + m)
    out = bucket_means(updates, size)
    for k, u in updates.items():
        starts = range(0, m, size)
        expected = torch.stack([sum(u[j] for j in range(a, min(a + size, m))) / (min(a + size, m) - a) for a in starts])
        assert out[k].shape == (math.ceil(m / size), *u.shape[1:])
        torch.testing.assert_close(out[k], expected)


# ------------------------------------------------------------------------------- DP aggregate


def test_noisy_clipped_mean_by_hand():
    # client norms over both parameters: 5 (scaled by 2/5) and 1 (kept); 3 clients were sampled
    updates = {"a": torch.tensor([[3.0], [0.6]], dtype=F64), "b": torch.tensor([[4.0, 0.0], [0.8, 0.0]], dtype=F64)}
    noise = {"a": torch.tensor([0.3], dtype=F64), "b": torch.tensor([-0.6, 0.9], dtype=F64)}
    out, norms = noisy_clipped_mean(updates, 2.0, noise, 3)
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0], dtype=F64))
    torch.testing.assert_close(out["a"], torch.tensor([(1.2 + 0.6 + 0.3) / 3], dtype=F64))
    torch.testing.assert_close(out["b"], torch.tensor([(1.6 + 0.8 - 0.6) / 3, 0.9 / 3], dtype=F64))


def test_noisy_clipped_mean_casts_the_noise_to_the_clipped_sum():
    updates = {"w": torch.ones(2, 3, dtype=torch.float32)}
    noise = {"w": torch.full((3,), 1 / 3, dtype=F64)}
    out, _ = noisy_clipped_mean(updates, 100.0, noise, 2)
    assert out["w"].dtype == torch.float32
    torch.testing.assert_close(out["w"], torch.full((3,), (2 + 1 / 3) / 2, dtype=torch.float32))


# --------------------------------------------------------------------- classes equal functions


WEIGHTS = torch.tensor([3.0, 1.0, 2.0, 5.0, 1.0, 4.0, 2.0])


@pytest.mark.parametrize(
    "aggregator, function",
    [
        (Mean(), lambda u: weighted_mean(u, WEIGHTS)),
        (Mean(weighted=False), weighted_mean),
        (CoordinateMedian(), coordinate_median),
        (TrimmedMean(0.2), lambda u: trimmed_mean(u, 0.2)),
        (NormBoundedMean(0.7), lambda u: norm_bounded_mean(u, 0.7, WEIGHTS)),
        (NormBoundedMean(0.7, weighted=False), lambda u: norm_bounded_mean(u, 0.7)),
        (Bucketing(TrimmedMean(0.3), 2), lambda u: trimmed_mean(bucket_means(u, 2), 0.3)),
    ],
    ids=["mean", "unweighted-mean", "median", "trimmed", "norm-bounded", "unweighted-norm-bounded", "bucketing"],
)
def test_each_aggregator_class_equals_its_function(aggregator, function):
    updates = _updates(7, seed=50)
    out, expected = aggregator(updates, WEIGHTS), function(updates)
    assert list(out) == list(updates)
    for k in updates:
        assert torch.equal(out[k], expected[k]), k


def test_client_dp_aggregate_equals_the_function_with_its_drawn_noise():
    dp = ClientDP(clip_norm=0.9, noise_multiplier=1.3)
    updates = _updates(6, seed=51)
    out, norms = dp.aggregate(updates, sampled=8, seed=4, round_idx=2)
    noise = dp.noise({k: u[0] for k, u in updates.items()}, seed=4, round_idx=2)
    expected, expected_norms = noisy_clipped_mean(updates, 0.9, noise, 8)
    assert torch.equal(norms, expected_norms)
    assert all(torch.equal(out[k], expected[k]) for k in updates)
    assert all(torch.equal(dp.clip(updates)[0][k], clip_to_norm(updates, 0.9)[0][k]) for k in updates)


# ------------------------------------------------- bit-for-bit parity with the former class bodies


def _old_median(updates):
    out = {}
    for name, u in updates.items():
        s = torch.sort(u, dim=0).values
        m = s.shape[0]
        out[name] = (s[(m - 1) // 2] + s[m // 2]) / 2
    return out


def _old_trimmed(updates, trim):
    out = {}
    for name, u in updates.items():
        m = u.shape[0]
        k = int(trim * m + 1e-9)
        if m - 2 * k < 1:
            return _old_median(updates)
        out[name] = torch.sort(u, dim=0).values[k : m - k].mean(0)
    return out


def _old_clip(updates, max_norm):
    norms = torch.sqrt(sum((u.flatten(1).double() ** 2).sum(1) for u in updates.values()))
    norms = norms.to(next(iter(updates.values())).dtype)
    factor = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return {k: u * factor.view(-1, *([1] * (u.dim() - 1))) for k, u in updates.items()}, norms


def _old_buckets(updates, size):
    return {name: torch.stack([b.mean(0) for b in torch.split(u, size, dim=0)]) for name, u in updates.items()}


def _old_dp(updates, clip, sigma, sampled, seed, round_idx):
    clipped, norms = _old_clip(updates, clip)
    gen = generator(seed, PRIVACY, round_idx)
    like = {k: u[0] for k, u in clipped.items()}
    noise = {
        k: (sigma * clip * torch.randn(like[k].shape, generator=gen, dtype=F64)).to(like[k].device, like[k].dtype)
        for k in sorted(like)
    }
    return {k: (u.sum(0) + noise[k]) / sampled for k, u in clipped.items()}, norms


def _assert_identical(got, want):
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, F64, "mixed"])
@pytest.mark.parametrize("m", [1, 4, 9, 100])
def test_functions_are_bit_identical_to_the_former_class_implementations(m, dtype):
    updates = _updates(m, seed=60 + m, dtype=F64 if dtype == "mixed" else dtype)
    del updates["s"]  # the former flatten(1) failed on a scalar parameter's [m] uploads; the functions take them
    if dtype == "mixed":  # float32 first: the norms are float32 and the float64 parameter promotes
        updates = {"h": updates["w"].float(), **updates}
    weights = torch.rand(m, generator=torch.Generator().manual_seed(m)) + 0.5
    _assert_identical(coordinate_median(updates), _old_median(updates))
    for trim in (0.0, 0.1, 0.29, 0.49):
        _assert_identical(trimmed_mean(updates, trim), _old_trimmed(updates, trim))
    clipped, norms = clip_to_norm(updates, 0.6)
    old_clipped, old_norms = _old_clip(updates, 0.6)
    _assert_identical({**clipped, "norms": norms}, {**old_clipped, "norms": old_norms})
    _assert_identical(norm_bounded_mean(updates, 0.6, weights), weighted_mean(old_clipped, weights))
    for size in (1, 2, 3):
        _assert_identical(bucket_means(updates, size), _old_buckets(updates, size))
    out, norms = ClientDP(clip_norm=0.6, noise_multiplier=1.1).aggregate(updates, m + 2, seed=7, round_idx=m)
    old_out, old_norms = _old_dp(updates, 0.6, 1.1, m + 2, seed=7, round_idx=m)
    _assert_identical({**out, "norms": norms}, {**old_out, "norms": old_norms})


# ------------------------------------------------------------------------------- argument checks


NOISE = {"w": torch.zeros(2, dtype=F64)}


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda u: trimmed_mean(u, 0.5), "`trim` in \\[0, 0.5\\), got 0.5"),
        (lambda u: trimmed_mean(u, -0.1), "`trim` in \\[0, 0.5\\), got -0.1"),
        (lambda u: trimmed_mean(u, True), "`trim` in \\[0, 0.5\\), got True"),
        (lambda u: clip_to_norm(u, 0.0), "`max_norm` to be a finite number > 0, got 0.0"),
        (lambda u: norm_bounded_mean(u, float("nan")), "`max_norm` to be a finite number > 0, got nan"),
        (lambda u: bucket_means(u, 0), "`bucket_size` to be an integer >= 1, got 0"),
        (lambda u: bucket_means(u, 2.0), "`bucket_size` to be an integer >= 1, got 2.0"),
        (lambda u: noisy_clipped_mean(u, -1.0, NOISE, 3), "`clip_norm` to be a finite number > 0, got -1.0"),
        (lambda u: noisy_clipped_mean(u, 1.0, NOISE, 0), "`denominator` to be a finite number > 0, got 0"),
        (lambda u: coordinate_median({}), "`updates` to hold at least one parameter, got an empty mapping"),
        (lambda u: update_norms({}), "`updates` to hold at least one parameter, got an empty mapping"),
        (lambda u: trimmed_mean({"w": u["w"][:0]}, 0.1), "at least one client along dim 0, got 0"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call({"w": torch.ones(3, 2, dtype=F64)})
