"""Pluggable server-side aggregators: ``aggregator(updates, weights) -> aggregated update``.

``updates`` maps a parameter name to the clients' stacked uploads ``[m, *shape]``; ``weights`` is
``[m]`` (e.g. client sample counts) or ``None``. Subclass :class:`Aggregator` for robust or private
aggregation; set ``is_mean = True`` only if the result is the (weighted) mean, which lets the module
use its one-backward fast path.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_metafed.functional.aggregate import weighted_mean

__all__ = ["Aggregator", "Mean"]


class Aggregator:
    """Base class for aggregators."""

    #: True when ``__call__`` returns the (weighted) mean of the updates.
    is_mean: bool = False
    #: True when ``__call__`` uses the per-client weights.
    uses_weights: bool = False

    def __call__(self, updates: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class Mean(Aggregator):
    """Mean of the client updates, weighted by the TaskBatch's ``weight`` when ``weighted=True``."""

    is_mean = True

    def __init__(self, weighted: bool = True):
        self.weighted = bool(weighted)
        self.uses_weights = self.weighted

    def __call__(self, updates, weights=None):
        return weighted_mean(updates, weights if self.weighted else None)


# Checkpoints store the aggregator in their hyperparameters; allow torch.load(weights_only=True) to read it.
# A custom Aggregator subclass should be registered the same way.
torch.serialization.add_safe_globals([Mean])
