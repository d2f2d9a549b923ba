"""Shared fixtures: tiny float64 nets and synthetic TaskBatches."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_metafed import TaskBatch


def sinusoid_batch(m: int, support: int = 5, query: int = 6, seed: int = 0, dtype=torch.float64) -> TaskBatch:
    """m sinusoid clients (amplitude in [0.1, 5], phase in [0, π], x in [−5, 5])."""
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(m, 1, 1, generator=g, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(m, 1, 1, generator=g, dtype=dtype) * math.pi
    x = torch.rand(m, support + query, 1, generator=g, dtype=dtype) * 10 - 5
    y = amp * torch.sin(x + phase)
    weight = torch.arange(1, m + 1, dtype=dtype)
    return TaskBatch(x[:, :support], y[:, :support], x[:, support:], y[:, support:], weight=weight, client_id=list(range(m)))


def classification_batch(m: int, support: int = 6, query: int = 8, dim: int = 4, classes: int = 3, seed: int = 0) -> TaskBatch:
    """m linearly separable-ish clients, each with its own rotation of a shared rule."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, dim, classes, generator=g, dtype=torch.float64)
    x = torch.randn(m, support + query, dim, generator=g, dtype=torch.float64)
    y = torch.einsum("mnd,mdc->mnc", x, w).argmax(-1)
    return TaskBatch(x[:, :support], y[:, :support], x[:, support:], y[:, support:], weight=torch.full((m,), 2.0, dtype=torch.float64))


def mlp(inp: int = 1, hidden: int = 8, out: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, out)).double()


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or validation (override any)."""
    defaults = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.fixture
def sin_batch() -> TaskBatch:
    return sinusoid_batch(4)


@pytest.fixture
def cls_batch() -> TaskBatch:
    return classification_batch(4)
