"""``Aggregator.degenerate_reason``: which arguments make a robust rule a plain mean for a round size,
and that what the reason claims (a plain mean; a suggested value that acts) is true of the rule."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_metafed.aggregators import (
    Aggregator,
    Bucketing,
    CoordinateMedian,
    Mean,
    NormBoundedMean,
    TrimmedMean,
)
from lightning_metafed.functional.aggregate import trim_count, weighted_mean

F64 = torch.float64


def random_updates(m: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(m, 3, 2, generator=g, dtype=F64), "b": torch.randn(m, generator=g, dtype=F64) ** 3}


def is_plain_mean(aggregator: Aggregator, m: int) -> bool:
    """Whether ``aggregator`` gives the unweighted mean of ``m`` random clients' updates."""
    updates = random_updates(m, seed=m)
    out, mean = aggregator(updates), weighted_mean(updates)
    return all(torch.allclose(out[k], mean[k], rtol=1e-12, atol=1e-12) for k in updates)


def suggested(pattern: str, reason: str) -> str:
    found = re.search(pattern, reason)
    assert found, (pattern, reason)
    return found.group(1)


def test_trimmed_mean_reason_names_trim_round_size_and_values_that_act():
    reason = TrimmedMean(trim=0.1).degenerate_reason(8)
    assert reason == (
        "TrimmedMean(trim=0.1) trims floor(0.1 × 8) = 0 clients per side in a round of 8 clients: it is a plain mean; "
        "use trim >= 0.125 or at least 10 clients per round"
    )
    assert TrimmedMean(trim=0.125).degenerate_reason(8) is None
    assert TrimmedMean(trim=0.1).degenerate_reason(10) is None and TrimmedMean(trim=0.1).degenerate_reason(9) is not None
    assert TrimmedMean(trim=0.29).degenerate_reason(100) is None  # the helper's floor of an inexact product
    assert trim_count(100, 0.29) == 29


@pytest.mark.parametrize("trim", [0.0, 0.05, 0.1, 0.2, 0.3, 0.49])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 10, 21, 40])
def test_trimmed_mean_reason_is_given_exactly_when_the_rule_is_the_plain_mean(trim, m):
    aggregator = TrimmedMean(trim=trim)
    reason = aggregator.degenerate_reason(m)
    if m <= 2:  # no trim below 0.5 drops one of two values
        assert reason is not None and is_plain_mean(aggregator, m)
        return
    assert (reason is not None) == is_plain_mean(aggregator, m), reason
    if reason is not None:
        new_trim = float(suggested(r"use trim >= ([0-9.e-]+)", reason))
        assert new_trim < 0.5 and TrimmedMean(trim=new_trim).degenerate_reason(m) is None
        assert not is_plain_mean(TrimmedMean(trim=new_trim), m)
        if trim > 0:
            least = int(suggested(r"at least (\d+) clients per round", reason))
            assert aggregator.degenerate_reason(least) is None and aggregator.degenerate_reason(least - 1) is not None


def test_trimmed_mean_without_trim_or_with_tiny_rounds_says_what_is_needed():
    assert TrimmedMean(trim=0.0).degenerate_reason(2).endswith("use at least 3 clients per round and trim > 0")
    assert TrimmedMean(trim=0.0).degenerate_reason(10).endswith("use trim >= 0.1")
    assert TrimmedMean(trim=0.3).degenerate_reason(1).endswith("in a round of 1 client: it is a plain mean; use at least 4 clients per round")
    assert TrimmedMean(trim=0.1).degenerate_reason(3).endswith("use trim >= 0.3334 or at least 10 clients per round")


@pytest.mark.parametrize("m", [1, 2, 3, 4, 9])
def test_coordinate_median_of_one_or_two_clients_is_their_mean(m):
    reason = CoordinateMedian().degenerate_reason(m)
    assert (reason is not None) == (m <= 2) == is_plain_mean(CoordinateMedian(), m)
    if m == 2:
        assert reason == (
            "CoordinateMedian() of a round of 2 clients is the mean of the two values per coordinate: it is a plain mean; "
            "use at least 3 clients per round"
        )


def test_bucketing_with_one_bucket_is_the_plain_mean_whatever_the_inner_rule():
    aggregator = Bucketing(CoordinateMedian(), bucket_size=8)
    reason = aggregator.degenerate_reason(8)
    assert reason == (
        "Bucketing(bucket_size=8) puts all 8 clients of a round in one bucket: the aggregate is their plain mean, "
        "whatever the inner rule CoordinateMedian(); use bucket_size <= 3 or more clients per round"
    )
    assert is_plain_mean(aggregator, 8) and is_plain_mean(Bucketing(TrimmedMean(0.2), bucket_size=12), 8)
    assert Bucketing(CoordinateMedian(), bucket_size=3).degenerate_reason(8) is None
    assert not is_plain_mean(Bucketing(CoordinateMedian(), bucket_size=3), 8)
    assert Bucketing(CoordinateMedian(), bucket_size=4).degenerate_reason(8) is not None  # 2 buckets, see below
    assert "of a round of 1 client is its update" in aggregator.degenerate_reason(1)


def test_bucketing_delegates_to_its_inner_rule_with_the_number_of_buckets():
    aggregator = Bucketing(CoordinateMedian(), bucket_size=4)
    reason = aggregator.degenerate_reason(8)
    assert reason.startswith(
        "Bucketing(bucket_size=4) turns a round of 8 clients into 2 bucket means, which its inner rule treats as a round "
        "of 2 clients (bucket_size <= 3 would make enough buckets for it to act): CoordinateMedian() of a round of 2 clients"
    )
    assert is_plain_mean(aggregator, 8)  # two equal buckets: the median of their means is the mean
    inner = Bucketing(TrimmedMean(trim=0.1), bucket_size=2)
    assert "TrimmedMean(trim=0.1) trims floor(0.1 × 5) = 0 clients per side in a round of 5 clients" in inner.degenerate_reason(10)
    assert is_plain_mean(inner, 10)
    assert inner.degenerate_reason(20) is None and not is_plain_mean(inner, 20)
    nested = Bucketing(Bucketing(CoordinateMedian(), bucket_size=2), bucket_size=2)
    assert nested.degenerate_reason(12) is None and not is_plain_mean(nested, 12)  # 6 buckets of 3 buckets
    assert "into 2 bucket means" in nested.degenerate_reason(8) and is_plain_mean(nested, 8)  # 4 buckets of 2 buckets


@pytest.mark.parametrize("aggregator", [Mean(), Mean(weighted=False), NormBoundedMean(max_norm=0.5)], ids=repr)
@pytest.mark.parametrize("m", [1, 2, 3, 16])
def test_rules_without_a_round_size_argument_never_degenerate(aggregator, m):
    assert aggregator.degenerate_reason(m) is None


def test_a_custom_rule_acts_by_default():
    class First(Aggregator):
        def __call__(self, updates, weights=None):
            return {k: u[0] for k, u in updates.items()}

    assert First().degenerate_reason(1) is None and First().degenerate_reason(100) is None


@pytest.mark.parametrize("aggregator", [Mean(), CoordinateMedian(), TrimmedMean(), Bucketing(CoordinateMedian())], ids=repr)
@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "8"])
def test_bad_round_size_is_named(aggregator, bad):
    with pytest.raises(ValueError, match=r"Expected `round_size` to be an integer >= 1, got"):
        aggregator.degenerate_reason(bad)
