"""Checks of the arguments every algorithm shares, run before any training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_metafed._validation import check_int
from lightning_metafed.aggregators import Aggregator, Mean
from lightning_metafed.compression import Compressor
from lightning_metafed.data.task_batch import TaskBatch
from lightning_metafed.faults import ClientFaults
from lightning_metafed.functional.adapt import select_params
from lightning_metafed.inner import InnerOptimizer
from lightning_metafed.privacy import ClientDP

__all__ = ["as_batch", "check_common_arguments", "check_net", "check_norm_layers", "resolve_adapt_names"]


def check_norm_layers(net: nn.Module) -> None:
    """Reject normalization layers with running statistics.

    Their in-place running-stat updates cannot be vectorized with ``vmap`` and, in a loop, would
    silently mix the statistics of different clients.
    """
    for name, module in net.named_modules():
        if getattr(module, "track_running_stats", False) and getattr(module, "running_mean", None) is not None:
            kind = type(module).__name__
            raise ValueError(
                f"`net` module {name!r} ({kind}) tracks running statistics (track_running_stats=True): "
                f"its in-place updates would mix the statistics of different clients and cannot be vectorized "
                f"with vmap. Use {kind}(..., track_running_stats=False), nn.GroupNorm or nn.LayerNorm instead."
            )


def check_net(net: Any) -> nn.Module:
    if not isinstance(net, nn.Module):
        raise ValueError(f"Expected `net` to be a torch.nn.Module, got {type(net).__name__}")
    check_norm_layers(net)
    return net


def _check_type(name: str, value: Any, kind: type, path: str) -> None:
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"Expected `{name}` to be a {path}, got {type(value).__name__}")


def check_common_arguments(
    inner_steps: int,
    eval_inner_steps: int | None,
    task: str,
    client_chunk_size: int | None,
    inner_optimizer: Any,
    aggregator: Any,
    faults: Any,
    privacy: Any,
    compressor: Any = None,
) -> None:
    """``ValueError`` naming the first argument that is out of range or of the wrong type."""
    check_int("inner_steps", inner_steps, minimum=0)
    if eval_inner_steps is not None:
        check_int("eval_inner_steps", eval_inner_steps, minimum=0)
    if task not in ("regression", "classification"):
        raise ValueError(f"Expected `task` to be 'regression' or 'classification', got {task!r}")
    if client_chunk_size is not None:
        check_int("client_chunk_size", client_chunk_size, minimum=1)
    if not isinstance(inner_optimizer, InnerOptimizer):
        raise ValueError(
            "Expected `inner_optimizer` to be a lightning_metafed.inner.InnerOptimizer (SGD, Adam, "
            f"TorchOptimizer), got {type(inner_optimizer).__name__}"
        )
    _check_type("aggregator", aggregator, Aggregator, "lightning_metafed.aggregators.Aggregator")
    _check_type("faults", faults, ClientFaults, "lightning_metafed.faults.ClientFaults")
    _check_type("privacy", privacy, ClientDP, "lightning_metafed.privacy.ClientDP")
    _check_type("compressor", compressor, Compressor, "lightning_metafed.compression.Compressor (BF16, QSGD, TopK, RandK, SignSGD)")
    if privacy is not None and not isinstance(aggregator, Mean):
        raise ValueError(
            f"`privacy` ({privacy!r}) aggregates by clipping, summing and adding noise, so `aggregator` must be "
            f"the default Mean, got {aggregator!r}"
        )


def as_batch(batch: Any) -> TaskBatch:
    if isinstance(batch, TaskBatch):
        return batch
    if isinstance(batch, Mapping):
        return TaskBatch(**batch)
    raise ValueError(f"Expected `batch` to be a lightning_metafed.TaskBatch (or a dict of its fields), got {type(batch).__name__}")


def resolve_adapt_names(net: nn.Module, patterns: Sequence[str] | str | None, argument: str = "adapt_params") -> list[str] | None:
    """The net parameter names an inner loop adapts (``None``: all of them)."""
    if patterns is None:
        return None
    return select_params([n for n, _ in net.named_parameters()], patterns, argument)
