"""Why a robust aggregator does nothing, or loses its guarantee, in rounds of a given size: the
sentences that :meth:`Aggregator.degenerate_reason <lightning_metafed.aggregators.Aggregator.degenerate_reason>`
returns for the rules of :mod:`lightning_metafed.aggregators`.

A trimmed mean that trims ``⌊trim·m⌋ = 0`` clients, a single bucket and the median of one or two
values are plain means; Krum, Multi-Krum and Bulyan need ``m >= factor·f + 3`` clients to tolerate
``f`` Byzantine ones. Each reason is one sentence naming the argument, its value, the round size
and a value that would make the rule act; ``None`` means the rule acts. ``MetaFedModule`` checks
its aggregator against the round size at ``setup`` (``algorithms/setup_checks.py``).
"""

from __future__ import annotations

import math

from lightning_metafed.functional.aggregate import trim_count

__all__ = ["bucketing_reason", "byzantine_reason", "median_reason", "trimmed_mean_reason"]


def median_reason(m: int) -> str | None:
    """``CoordinateMedian``'s reason for rounds of ``m`` clients: the median of one value is that
    value, of two their mean."""
    if m > 2:
        return None
    what = "that client's update" if m == 1 else "the mean of the two values per coordinate"
    return (
        f"CoordinateMedian() of a round of {m} client{'s' if m > 1 else ''} is {what}: "
        "it is a plain mean; use at least 3 clients per round"
    )


def trimmed_mean_reason(trim: float, m: int) -> str | None:
    """``TrimmedMean(trim)``'s reason for rounds of ``m`` clients: ``⌊trim·m⌋`` (``trim_count``) is 0,
    so no client is trimmed; the fix names the smallest ``trim`` or round size that trims one."""
    if trim_count(m, trim) > 0:
        return None
    if m >= 3:  # some trim below 0.5 drops a client of m
        fix = f"use trim >= {_smallest_trim(m)}"
        fix += f" or at least {_smallest_trimmed_round(trim)} clients per round" if trim > 0 else ""
    else:
        fix = f"use at least {_smallest_trimmed_round(trim) if trim > 0 else 3} clients per round"
        fix += "" if trim > 0 else " and trim > 0"
    return (
        f"TrimmedMean(trim={trim!r}) trims floor({trim!r} × {m}) = 0 clients per side in a round of "
        f"{m} client{'s' if m > 1 else ''}: it is a plain mean; {fix}"
    )


def bucketing_reason(bucket_size: int, inner: object, m: int) -> str | None:
    """``Bucketing(inner, bucket_size)``'s reason for rounds of ``m`` clients: one bucket (the plain
    mean of the round, whatever ``inner``), or ``inner``'s own reason on the ``⌈m / bucket_size⌉``
    bucket means, with the largest smaller ``bucket_size`` that would make enough buckets for it."""
    buckets = math.ceil(m / bucket_size)
    name = f"Bucketing(bucket_size={bucket_size})"
    if m == 1:
        return f"{name} of a round of 1 client is its update, whatever the inner rule {inner!r}: use more clients per round"
    reason = inner.degenerate_reason(buckets) if buckets > 1 else None
    if buckets > 1 and reason is None:
        return None
    # the largest smaller bucket_size whose number of buckets the inner rule acts on
    sizes = range(min(bucket_size, m) - 1, 0, -1)
    smaller = next((s for s in sizes if inner.degenerate_reason(math.ceil(m / s)) is None), None)
    fix = None if smaller is None else f"bucket_size <= {smaller}" if smaller > 1 else "bucket_size=1"
    if buckets == 1:
        return (
            f"{name} puts all {m} clients of a round in one bucket: the aggregate is their plain mean, whatever the "
            f"inner rule {inner!r}; use {fix + ' or ' if fix else ''}more clients per round"
        )
    return (
        f"{name} turns a round of {m} clients into {buckets} bucket means, which its inner rule treats as a round "
        f"of {buckets} clients{f' ({fix} would make enough buckets for it to act)' if fix else ''}: {reason}"
    )


def byzantine_reason(rule: object, factor: int, num_byzantine: int, m: int) -> str | None:
    """The reason of ``rule`` (Krum, Multi-Krum, Bulyan) for rounds of ``m < factor·f + 3`` clients,
    ``f = num_byzantine``: too few clients for the rule's guarantee."""
    need = factor * num_byzantine + 3
    if m >= need:
        return None
    return (
        f"{rule!r} needs at least {factor}·num_byzantine + 3 = {need} clients per round to tolerate "
        f"{num_byzantine} Byzantine client(s), got rounds of {m}: use a smaller num_byzantine or more clients per round"
    )


def _smallest_trim(m: int) -> float:
    """A short ``trim`` (4 significant digits, rounded up) that trims at least one client of ``m``."""
    exact = 1 / m
    scale = 10 ** (math.floor(math.log10(exact)) - 3)
    short = float(f"{math.ceil(exact / scale) * scale:.4g}")
    return short if trim_count(m, short) >= 1 else exact


def _smallest_trimmed_round(trim: float) -> int:
    """The smallest round size ``m`` in which ``trim > 0`` trims a client (``trim_count(m, trim) >= 1``)."""
    m = max(1, math.ceil((1 - 1e-9) / trim))
    while trim_count(m, trim) < 1:
        m += 1
    while m > 1 and trim_count(m - 1, trim) >= 1:
        m -= 1
    return m
