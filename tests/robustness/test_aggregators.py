"""Robust aggregators against hand-computed values, and their argument checks."""

from __future__ import annotations

import pytest
import torch
from conftest import stacked

from lightning_metafed.aggregators import (
    Bucketing,
    CoordinateMedian,
    Mean,
    NormBoundedMean,
    TrimmedMean,
    update_norms,
)


def test_coordinate_median_by_hand():
    updates = {"w": stacked([1.0, -5.0], [100.0, 2.0], [3.0, 0.0]), "b": stacked([7.0], [-1.0], [2.0])}
    out = CoordinateMedian()(updates)
    torch.testing.assert_close(out["w"], stacked(3.0, 0.0))
    torch.testing.assert_close(out["b"], stacked(2.0))


def test_coordinate_median_of_an_even_count_is_the_mean_of_the_middle_pair():
    out = CoordinateMedian()({"w": stacked([1.0], [10.0], [4.0], [-3.0])})
    torch.testing.assert_close(out["w"], stacked(2.5))  # middle pair (1, 4); torch.median would give 1


def test_trimmed_mean_by_hand():
    # 5 clients, trim 0.2 → drop 1 from each end per coordinate
    w = stacked([1.0, 50.0], [2.0, -1.0], [3.0, 0.0], [4.0, 1.0], [1000.0, 2.0])
    out = TrimmedMean(0.2)({"w": w})
    torch.testing.assert_close(out["w"], stacked((2.0 + 3.0 + 4.0) / 3, (0.0 + 1.0 + 2.0) / 3))


def test_trimmed_mean_trims_floor_of_trim_times_m_even_when_the_product_is_inexact():
    # 0.29 * 100 is 28.999... in floating point; 29 huge outliers must all be trimmed
    w = torch.cat([torch.full((29, 1), 1e6, dtype=torch.float64), torch.arange(71, dtype=torch.float64).view(-1, 1)])
    assert TrimmedMean(0.29)({"w": w})["w"].item() < 100


def test_trimmed_mean_with_zero_trim_is_the_mean_and_falls_back_to_the_median_when_nothing_is_left():
    w = stacked([1.0], [2.0], [9.0])
    torch.testing.assert_close(TrimmedMean(0.0)({"w": w})["w"], stacked(4.0))
    # trim 0.49 of 2 clients keeps both (k = 0); of 3 clients k = 1 leaves the median
    torch.testing.assert_close(TrimmedMean(0.49)({"w": w})["w"], stacked(2.0))


def test_norm_bounded_mean_by_hand():
    # client norms over all parameters: 5 (scaled to 1) and 0.5 (kept)
    updates = {"a": stacked([3.0], [0.3]), "b": stacked([4.0], [0.4])}
    torch.testing.assert_close(update_norms(updates), stacked(5.0, 0.5))
    out = NormBoundedMean(1.0, weighted=False)(updates)
    torch.testing.assert_close(out["a"], stacked((0.6 + 0.3) / 2))
    torch.testing.assert_close(out["b"], stacked((0.8 + 0.4) / 2))
    weighted = NormBoundedMean(1.0)(updates, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(weighted["a"], stacked((0.6 + 3 * 0.3) / 4))


def test_robust_aggregators_resist_one_huge_client_where_the_mean_does_not():
    honest = torch.randn(9, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1 + 1.0
    updates = {"w": torch.cat([honest, torch.full((1, 20), -1e6, dtype=torch.float64)])}
    assert Mean(weighted=False)(updates)["w"].mean() < -1e4
    for agg in (CoordinateMedian(), TrimmedMean(0.1), NormBoundedMean(10.0, weighted=False)):
        assert (agg(updates)["w"] - 1.0).abs().max() < 1.0, agg


def test_bucketing_applies_the_rule_to_bucket_means_by_hand():
    w = stacked([1.0], [3.0], [10.0], [20.0], [-4.0])  # buckets of 2: means 2, 15, -4 (last bucket smaller)
    torch.testing.assert_close(Bucketing(CoordinateMedian(), 2)({"w": w})["w"], stacked(2.0))
    torch.testing.assert_close(Bucketing(Mean(weighted=False), 1)({"w": w})["w"], stacked(6.0))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: TrimmedMean(0.5), "`trim` in \\[0, 0.5\\), got 0.5"),
        (lambda: TrimmedMean(-0.1), "`trim`"),
        (lambda: NormBoundedMean(0.0), "`max_norm` to be a finite number > 0, got 0.0"),
        (lambda: NormBoundedMean(float("nan")), "`max_norm`"),
        (lambda: Bucketing(CoordinateMedian(), 0), "`bucket_size` to be an integer >= 1, got 0"),
        (lambda: Bucketing("median"), "`aggregator` to be an Aggregator, got str"),
    ],
)
def test_bad_arguments_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()
