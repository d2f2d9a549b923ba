"""Communication accounting: bytes of the tensors that cross the client/server line."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

__all__ = ["payload_bytes"]


def payload_bytes(tensors: Mapping[str, Tensor]) -> int:
    """``Σ numel × element_size`` of one message (a dict of tensors)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
