"""Pluggable server-side aggregators: ``aggregator(updates, weights) -> aggregated update``.

``updates`` maps a parameter name to the clients' stacked uploads ``[m, *shape]``; ``weights`` is
``[m]`` (e.g. client sample counts) or ``None``. Subclass :class:`Aggregator` for your own rule;
set ``is_mean = True`` only if the result is the (weighted) mean, which lets the module use its
one-backward fast path.

Robust aggregators bound what a minority of bad clients can do to a round:

- :class:`CoordinateMedian`: per coordinate, the median of the clients' values (Yin et al., 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"); tolerates fewer than
  half of the clients being arbitrary.
- :class:`TrimmedMean`: per coordinate, drop the ``⌊trim·m⌋`` largest and smallest values and
  average the rest (same paper); tolerates a ``trim`` fraction of arbitrary clients.
- :class:`NormBoundedMean`: scale each client's whole update down to norm ``max_norm`` at most, then
  average (Sun et al., 2019, "Can You Really Backdoor Federated Learning?"); bounds each client's
  influence to ``max_norm / m`` but does not remove it.
- :class:`Bucketing`: average groups of ``bucket_size`` clients, then apply a robust rule to the
  group means (Karimireddy, He & Jaggi, 2022, "Byzantine-Robust Learning on Heterogeneous Datasets
  via Bucketing"): the robust rule sees less client-to-client variance, which is what makes plain
  coordinate-wise rules lose accuracy on heterogeneous (non-IID) clients.

Rules that look at whole updates and their distances to each other, built for Byzantine clients:

- :class:`Krum` / :class:`MultiKrum`: keep the update(s) closest to their ``m − f − 2`` nearest
  neighbours (Blanchard et al., 2017, "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent").
- :class:`Bulyan`: Krum selection of ``m − 2f`` updates, then a coordinate-wise trimmed average
  around the median (El Mhamdi, Guerraoui & Rouault, 2018).
- :class:`CenteredClip`: iterated clipping of every update around a center (Karimireddy, He & Jaggi,
  2021); with :class:`Bucketing` it is the rule of Karimireddy, He & Jaggi (2022) for
  heterogeneous clients.

The math of every rule is a pure function in :mod:`lightning_metafed.functional.aggregate`; these
classes are the configurable (LightningCLI / checkpoint) wrappers around it. The module rejects
non-finite uploads before any aggregator sees them.

A robust rule can do nothing in small rounds (a trimmed mean that trims ``⌊trim·m⌋ = 0`` clients, a
single bucket, the median of two values): :meth:`Aggregator.degenerate_reason` says so for a round
size, in one sentence naming the argument and a value that would make the rule act (the sentences
are written in ``lightning_metafed.degenerate_rounds``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from lightning_metafed._validation import (
    ConfigObject,
    check_int,
    check_positive,
    check_range,
)
from lightning_metafed.degenerate_rounds import bucketing_reason, byzantine_reason, median_reason, trimmed_mean_reason
from lightning_metafed.functional.aggregate import (
    bucket_means,
    bulyan,
    centered_clip,
    clip_to_norm,
    coordinate_median,
    finite_clients,
    krum,
    multi_krum,
    norm_bounded_mean,
    trimmed_mean,
    update_norms,
    weighted_mean,
)

__all__ = [
    "Aggregator", "Mean", "CoordinateMedian", "TrimmedMean", "NormBoundedMean", "Bucketing",
    "Krum", "MultiKrum", "Bulyan", "CenteredClip",
    "update_norms", "clip_to_norm", "finite_clients",
]


class Aggregator(ConfigObject):
    """Base class for aggregators."""

    #: True when ``__call__`` returns the (weighted) mean of the updates.
    is_mean: bool = False
    #: True when ``__call__`` uses the per-client weights.
    uses_weights: bool = False

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def degenerate_reason(self, round_size: int) -> str | None:
        """Why this rule reduces to a plain mean in rounds of ``round_size`` clients (or, for the
        rules that assume ``num_byzantine`` bad clients, why such rounds are too small for their
        guarantee), or ``None``.

        The reason is one sentence naming the argument, its value, the round size and a value that
        would make the rule act. The default (for :class:`Mean`, :class:`NormBoundedMean` and custom
        rules) is ``None``: the rule is taken to act at every round size.
        """
        check_int("round_size", round_size, minimum=1)
        return None


class Mean(Aggregator):
    """Mean of the client updates, weighted by the TaskBatch's ``weight`` when ``weighted=True``
    (:func:`~lightning_metafed.functional.aggregate.weighted_mean`).

    Example:
        >>> import torch
        >>> from lightning_metafed.aggregators import Mean
        >>> updates = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}  # 3 clients
        >>> weights = torch.tensor([1.0, 1.0, 2.0])  # e.g. sample counts
        >>> Mean()(updates, weights)["w"]
        tensor([3.5000, 4.5000])
        >>> Mean(weighted=False)(updates, weights)["w"]
        tensor([3., 4.])
    """

    is_mean = True

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = bool(weighted)
        self.uses_weights = self.weighted

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        return weighted_mean(updates, weights if self.weighted else None)


class CoordinateMedian(Aggregator):
    """Coordinate-wise median of the client updates (unweighted;
    :func:`~lightning_metafed.functional.aggregate.coordinate_median`).

    With an even number of clients it is the mean of the two middle values (so two clients give
    their mean, not the lower one as ``torch.median`` would).

    Example:
        One client of four uploads garbage; the median of each coordinate ignores it:

        >>> import torch
        >>> from lightning_metafed.aggregators import CoordinateMedian
        >>> updates = {"w": torch.tensor([[1.0, -1.0], [2.0, 0.0], [3.0, 1.0], [100.0, -100.0]])}
        >>> CoordinateMedian()(updates)["w"]
        tensor([ 2.5000, -0.5000])
        >>> print(CoordinateMedian().degenerate_reason(round_size=2))
        CoordinateMedian() of a round of 2 clients is the mean of the two values per coordinate:
        it is a plain mean; use at least 3 clients per round
    """

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        return coordinate_median(updates)

    def degenerate_reason(self, round_size: int) -> str | None:
        """A reason for rounds of 1 or 2 clients: the median of one value is that value, of two their mean."""
        return median_reason(check_int("round_size", round_size, minimum=1))


class TrimmedMean(Aggregator):
    """Coordinate-wise ``trim``-trimmed mean (unweighted): per coordinate, the ``⌊trim·m⌋``
    largest and ``⌊trim·m⌋`` smallest client values are dropped and the rest averaged
    (:func:`~lightning_metafed.functional.aggregate.trimmed_mean`).

    Args:
        trim: fraction trimmed from *each* end, in ``[0, 0.5)``; ``0`` is the plain mean. When
            ``⌊trim·m⌋`` would leave no value (tiny rounds) the median is used instead.

    Example:
        >>> import torch
        >>> from lightning_metafed.aggregators import TrimmedMean
        >>> updates = {"w": torch.tensor([[1.0], [2.0], [3.0], [4.0], [100.0]])}  # 5 clients
        >>> TrimmedMean(trim=0.2)(updates)["w"]  # drops 1 value per side: mean of 2, 3, 4
        tensor([3.])
        >>> TrimmedMean(trim=0.1)(updates)["w"]  # floor(0.1 × 5) = 0: the plain mean
        tensor([22.])
        >>> TrimmedMean(trim=0.1).degenerate_reason(round_size=5) is not None
        True
    """

    def __init__(self, trim: float = 0.1) -> None:
        self.trim = check_range("trim", trim, 0, 0.5)

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        return trimmed_mean(updates, self.trim)

    def degenerate_reason(self, round_size: int) -> str | None:
        """A reason when ``⌊trim·m⌋`` (``trim_count``) is 0
        for ``m = round_size``: no client is trimmed, so the rule is the plain mean."""
        return trimmed_mean_reason(self.trim, check_int("round_size", round_size, minimum=1))


class NormBoundedMean(Aggregator):
    """Mean of the client updates after scaling each down to norm ``max_norm`` at most
    (:func:`~lightning_metafed.functional.aggregate.norm_bounded_mean`).

    The norm is taken over all parameters of a client's update together. ``weighted=True`` weights
    the mean by the TaskBatch's ``weight``.

    Example:
        >>> import torch
        >>> from lightning_metafed.aggregators import NormBoundedMean
        >>> updates = {"w": torch.tensor([[30.0, 40.0], [0.3, 0.4]])}  # norms 50 and 0.5
        >>> NormBoundedMean(max_norm=1.0, weighted=False)(updates)["w"]  # mean of (0.6, 0.8) and (0.3, 0.4)
        tensor([0.4500, 0.6000])
    """

    def __init__(self, max_norm: float = 1.0, weighted: bool = True) -> None:
        self.max_norm = check_positive("max_norm", max_norm)
        self.weighted = bool(weighted)
        self.uses_weights = self.weighted

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        return norm_bounded_mean(updates, self.max_norm, weights if self.weighted else None)


class Bucketing(Aggregator):
    """``aggregator`` applied to the means of consecutive groups of ``bucket_size`` clients
    (:func:`~lightning_metafed.functional.aggregate.bucket_means`).

    The datamodule samples a round's clients in random order, so consecutive groups are random
    buckets. The last bucket may be smaller. A bucket holding one Byzantine client is Byzantine:
    with a fraction ``f`` of bad clients up to ``bucket_size · f`` of the buckets can be bad, so the
    inner rule must tolerate that (the median tolerates < 1/2).

    Args:
        aggregator: the robust rule applied to the bucket means (e.g. ``CoordinateMedian()``).
        bucket_size: clients per bucket (``1`` is ``aggregator`` itself).
    """

    def __init__(self, aggregator: Aggregator, bucket_size: int = 2) -> None:
        if not isinstance(aggregator, Aggregator):
            raise ValueError(f"Expected `aggregator` to be an Aggregator, got {type(aggregator).__name__}")
        self.aggregator = aggregator
        self.bucket_size = check_int("bucket_size", bucket_size, minimum=1)

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        return self.aggregator(bucket_means(updates, self.bucket_size))

    def degenerate_reason(self, round_size: int) -> str | None:
        """A reason when ``bucket_size >= round_size`` (one bucket: the plain mean of the round, whatever
        the inner rule), or when the inner rule degenerates on the ``⌈round_size / bucket_size⌉``
        bucket means (its reason, which then counts buckets as clients)."""
        return bucketing_reason(self.bucket_size, self.aggregator, check_int("round_size", round_size, minimum=1))


class Krum(Aggregator):
    """The single client update with the lowest Krum score, its summed squared distance to its
    ``m − f − 2`` nearest other updates (:func:`~lightning_metafed.functional.aggregate.krum`).

    Args:
        num_byzantine: ``f``, the Byzantine clients a round is assumed to hold (the paper needs
            ``m >= 2f + 3``).

    Example:
        Four honest clients agree; the fifth is far away and is not chosen:

        >>> import torch
        >>> from lightning_metafed.aggregators import Krum
        >>> updates = {"w": torch.tensor([[1.0, 1.0], [1.1, 0.9], [0.9, 1.0], [1.0, 1.1], [-50.0, 50.0]])}
        >>> Krum(num_byzantine=1)(updates)["w"]
        tensor([1., 1.])
        >>> Krum(num_byzantine=1).degenerate_reason(round_size=4) is not None  # needs m >= 2f + 3
        True
    """

    #: Rounds of fewer than ``factor · f + 3`` clients do not meet the rule's bound.
    factor = 2

    def __init__(self, num_byzantine: int = 1) -> None:
        self.num_byzantine = check_int("num_byzantine", num_byzantine, minimum=0)

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        return krum(updates, self.num_byzantine)

    def degenerate_reason(self, round_size: int) -> str | None:
        """A reason when ``round_size < factor·f + 3``: too few clients for the rule's guarantee."""
        return byzantine_reason(self, self.factor, self.num_byzantine, check_int("round_size", round_size, minimum=1))


class MultiKrum(Krum):
    """Mean of the ``keep`` client updates with the lowest Krum scores
    (:func:`~lightning_metafed.functional.aggregate.multi_krum`).

    Args:
        num_byzantine: ``f``, the Byzantine clients a round is assumed to hold (scores use the
            ``m − f − 2`` nearest other updates; the paper needs ``m >= 2f + 3``).
        keep: how many of the lowest-scored updates to average; ``None`` keeps ``m − f``.
    """

    def __init__(self, num_byzantine: int = 1, keep: int | None = None) -> None:
        super().__init__(num_byzantine)
        self.keep = None if keep is None else check_int("keep", keep, minimum=1)

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        m = next(iter(updates.values())).shape[0]
        keep = self.keep if self.keep is not None else max(1, m - self.num_byzantine)
        return multi_krum(updates, self.num_byzantine, keep)


class Bulyan(Krum):
    """Bulyan (:func:`~lightning_metafed.functional.aggregate.bulyan`): ``m − 2f`` updates chosen by
    repeated Krum, then per coordinate the mean of the ``m − 4f`` chosen values closest to their
    median. The paper needs ``m >= 4f + 3``.

    Args:
        num_byzantine: ``f``, the Byzantine clients a round is assumed to hold.
    """

    factor = 4

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        return bulyan(updates, self.num_byzantine)


class CenteredClip(Aggregator):
    """Centered clipping (:func:`~lightning_metafed.functional.aggregate.centered_clip`): from a
    center ``v``, ``iterations`` times ``v ← v + mean_i (Δ_i − v)·min(1, τ/‖Δ_i − v‖)``, so each
    client moves the aggregate by at most ``τ/m`` per iteration.

    Args:
        tau: ``τ``, the clipping radius (in update-norm units: pick it near the honest clients'
            distance to their mean).
        iterations: how many times the center is re-clipped.
        start: the first center: ``"median"`` (the coordinate-wise median of the round, robust and
            stateless) or ``"zero"`` (then one iteration is :class:`NormBoundedMean`). The paper starts
            from the previous round's aggregate with client momentum, which this stateless rule does
            not keep.
    """

    def __init__(self, tau: float = 1.0, iterations: int = 3, start: Literal["median", "zero"] = "median") -> None:
        self.tau = check_positive("tau", tau)
        self.iterations = check_int("iterations", iterations, minimum=1)
        if start not in ("median", "zero"):
            raise ValueError(f"Expected `start` to be 'median' or 'zero', got {start!r}")
        self.start = start

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        if self.start == "median":
            center = coordinate_median(updates)
        else:
            center = {name: torch.zeros_like(u[0]) for name, u in updates.items()}
        return centered_clip(updates, self.tau, self.iterations, center)


# Checkpoints store the aggregator in their hyperparameters; allow torch.load(weights_only=True) to read it.
# A custom Aggregator subclass should be registered the same way.
torch.serialization.add_safe_globals(
    [Mean, CoordinateMedian, TrimmedMean, NormBoundedMean, Bucketing, Krum, MultiKrum, Bulyan, CenteredClip]
)
