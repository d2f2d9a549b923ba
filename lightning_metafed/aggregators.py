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

The math of every rule is a pure function in :mod:`lightning_metafed.functional.aggregate`; these
classes are the configurable (LightningCLI / checkpoint) wrappers around it. The module rejects
non-finite uploads before any aggregator sees them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_metafed._validation import (
    ConfigObject,
    check_int,
    check_positive,
    check_range,
)
from lightning_metafed.functional.aggregate import (
    bucket_means,
    clip_to_norm,
    coordinate_median,
    finite_clients,
    norm_bounded_mean,
    trimmed_mean,
    update_norms,
    weighted_mean,
)

__all__ = [
    "Aggregator", "Mean", "CoordinateMedian", "TrimmedMean", "NormBoundedMean", "Bucketing",
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


class Mean(Aggregator):
    """Mean of the client updates, weighted by the TaskBatch's ``weight`` when ``weighted=True``
    (:func:`~lightning_metafed.functional.aggregate.weighted_mean`)."""

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
    """

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        return coordinate_median(updates)


class TrimmedMean(Aggregator):
    """Coordinate-wise ``trim``-trimmed mean (unweighted): per coordinate, the ``⌊trim·m⌋``
    largest and ``⌊trim·m⌋`` smallest client values are dropped and the rest averaged
    (:func:`~lightning_metafed.functional.aggregate.trimmed_mean`).

    Args:
        trim: fraction trimmed from *each* end, in ``[0, 0.5)``; ``0`` is the plain mean. When
            ``⌊trim·m⌋`` would leave no value (tiny rounds) the median is used instead.
    """

    def __init__(self, trim: float = 0.1) -> None:
        self.trim = check_range("trim", trim, 0, 0.5)

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        return trimmed_mean(updates, self.trim)


class NormBoundedMean(Aggregator):
    """Mean of the client updates after scaling each down to norm ``max_norm`` at most
    (:func:`~lightning_metafed.functional.aggregate.norm_bounded_mean`).

    The norm is taken over all parameters of a client's update together. ``weighted=True`` weights
    the mean by the TaskBatch's ``weight``.
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


# Checkpoints store the aggregator in their hyperparameters; allow torch.load(weights_only=True) to read it.
# A custom Aggregator subclass should be registered the same way.
torch.serialization.add_safe_globals([Mean, CoordinateMedian, TrimmedMean, NormBoundedMean, Bucketing])
