"""Per-client task losses and metrics with optional example masks (padding).

``pred`` is ``[N, ...]`` for one client's ``N`` examples; ``mask`` (optional) is ``[N]`` with 1 for
real examples and 0 for padding. Reductions are means over the real examples only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

__all__ = ["masked_mean", "mse_loss", "cross_entropy_loss", "accuracy"]


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-example ``values`` ``[N]`` over the entries where ``mask`` is 1.

    Args:
        values: per-example values ``[N]``.
        mask: ``[N]``, 1 for real examples and 0 for padding; ``None``: every example is real.
    """
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def mse_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error; ``target`` is reshaped to ``pred``'s shape (``[N]`` vs ``[N, 1]``).

    Args:
        pred: the predictions ``[N, ...]``.
        target: the targets, ``N`` examples of ``pred``'s shape.
        mask: ``[N]``, 1 for real examples and 0 for padding; ``None``: every example is real.
    """
    diff = pred - target.reshape(pred.shape).to(pred.dtype)
    per_example = (diff * diff).reshape(pred.shape[0], -1).mean(dim=1)
    return masked_mean(per_example, mask)


def cross_entropy_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy of ``logits`` ``[N, C]`` against integer class labels ``[N]``.

    Args:
        logits: the class scores ``[N, C]``.
        target: the integer class labels ``[N]``.
        mask: ``[N]``, 1 for real examples and 0 for padding; ``None``: every example is real.
    """
    per_example = nnf.cross_entropy(logits, target.long(), reduction="none")
    return masked_mean(per_example, mask)


def accuracy(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Fraction of examples whose arg-max class equals the label.

    Args:
        logits: the class scores ``[N, C]``.
        target: the integer class labels ``[N]``.
        mask: ``[N]``, 1 for real examples and 0 for padding; ``None``: every example is real.
    """
    correct = (logits.argmax(dim=-1) == target.long()).to(logits.dtype if logits.is_floating_point() else torch.float32)
    return masked_mean(correct, mask)
