"""Shared test helpers: tiny float64 nets and problems, synthetic TaskBatches, one-client slicing,
gradient oracles (finite differences, plain autograd) and a quiet Trainer.

Test modules import them by name (``from conftest import mlp, quiet_trainer``): one definition of
each helper, parameterized by keyword so every caller's needs are met.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_metafed import TaskBatch
from lightning_metafed.functional import ClientTask, mse_loss

F64 = torch.float64

# ------------------------------------------------------------------------------ nets and batches


def sinusoid_batch(m: int, support: int = 5, query: int = 6, seed: int = 0, dtype=F64) -> TaskBatch:
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
    w = torch.randn(m, dim, classes, generator=g, dtype=F64)
    x = torch.randn(m, support + query, dim, generator=g, dtype=F64)
    y = torch.einsum("mnd,mdc->mnc", x, w).argmax(-1)
    return TaskBatch(x[:, :support], y[:, :support], x[:, support:], y[:, support:], weight=torch.full((m,), 2.0, dtype=F64))


def mlp(inp: int = 1, hidden: int = 8, out: int = 1, seed: int = 0) -> nn.Module:
    """A float64 ``Linear → Tanh → Linear`` net, initialized from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, out)).double()


def loader(*batches) -> DataLoader:
    """A DataLoader that yields the given TaskBatches one per step, unchanged."""
    return DataLoader(list(batches), batch_size=None)


def stacked(*rows) -> Tensor:
    """A float64 tensor whose rows are ``rows`` (per-client uploads written by hand)."""
    return torch.tensor(rows, dtype=F64)


def linear_problem(seed: int = 0, dim: int = 3, support: int = 4, query: int = 3):
    """Least squares ``y = x·w + b`` in float64: ``(loss_fn, {"w": [dim], "b": []}, one ClientTask)``."""
    torch.manual_seed(seed)

    def loss_fn(p, x, y, mask):
        return mse_loss(x @ p["w"] + p["b"], y, mask)

    params = {"w": torch.randn(dim, dtype=F64), "b": torch.randn((), dtype=F64)}
    x = torch.randn(support + query, dim, dtype=F64)
    y = x @ torch.randn(dim, dtype=F64) + 0.5 + 0.1 * torch.randn(support + query, dtype=F64)
    return loss_fn, params, ClientTask(x[:support], y[:support], x[support:], y[support:])


def padded_task(task: ClientTask, seed: int) -> ClientTask:
    """``task`` (4 support and 4 query examples) with masked junk examples inserted: one in the
    support set (third position) and two after the query set, drawn from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    junk_x, junk_y = torch.randn(3, 1, dtype=F64) * 3, torch.randn(3, 1, dtype=F64) * 3
    return ClientTask(
        torch.cat([task.support_x[:2], junk_x[:1], task.support_x[2:]]),
        torch.cat([task.support_y[:2], junk_y[:1], task.support_y[2:]]),
        torch.cat([task.query_x, junk_x[1:]]),
        torch.cat([task.query_y, junk_y[1:]]),
        torch.tensor([1, 1, 0, 1, 1], dtype=F64),
        torch.tensor([1, 1, 1, 1, 0, 0], dtype=F64),
    )


def stack_results(results):
    """Stack a list of equally structured (nested tuple/dict) results along a new dim 0 (a loop's
    per-client outputs, to compare with a vmapped call)."""
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(results)
    if isinstance(first, dict):
        return {k: stack_results([r[k] for r in results]) for k in first}
    return type(first)(stack_results(list(parts)) for parts in zip(*results))


@pytest.fixture(autouse=True)
def _cli_sees_no_pytest_arguments(monkeypatch):
    """Code under test that parses ``sys.argv`` (LightningCLI, argparse) must not see pytest's own
    arguments; tests pass their command lines explicitly."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture
def sin_batch() -> TaskBatch:
    return sinusoid_batch(4)


@pytest.fixture
def cls_batch() -> TaskBatch:
    return classification_batch(4)


# ------------------------------------------------------------------------------ one client of many


def client_task(tasks: ClientTask | TaskBatch, i: int) -> ClientTask:
    """Client ``i`` of stacked tasks (a ``ClientTask`` with a client dim, or a ``TaskBatch``), unbatched.

    Tensor fields lose their client dim; ``None`` (and an unbatched ``num_steps``) stay as they are.
    """
    if isinstance(tasks, TaskBatch):
        tasks = tasks.tasks()
    return ClientTask(*(t[i] if isinstance(t, Tensor) else t for t in tasks))


def client_rows(x: Tensor, mask: Tensor | None, j: int) -> Tensor:
    """Client ``j``'s rows of a padded batch tensor ``[m, n, ...]``, padding removed."""
    return x[j] if mask is None else x[j][mask[j].bool()]


# ------------------------------------------------------------------------- functional problems


def mse_fn(net: nn.Module) -> Callable:
    """The functional loss ``loss_fn(params, x, y, mask)`` of ``net`` under (masked) MSE."""

    def loss_fn(p, x, y, mask):
        return mse_loss(torch.func.functional_call(net, p, (x,)), y, mask)

    return loss_fn


def mlp_problem(seed: int = 0, inp: int = 1, hidden: int = 4, out: int = 1, support: int = 5, query: int = 6):
    """``(net, loss_fn, params, task)``: a tiny tanh MLP (:func:`mlp`), its functional MSE loss, a
    detached float64 copy of its parameters and one client task ``y = sin(x·w) + noise``."""
    net = mlp(inp, hidden, out, seed=seed)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    x = torch.rand(support + query, inp, dtype=F64) * 4 - 2
    w = torch.randn(inp, out, dtype=F64)
    y = torch.sin(x @ w) + 0.1 * torch.randn(support + query, out, dtype=F64)
    return net, mse_fn(net), params, ClientTask(x[:support], y[:support], x[support:], y[support:])


# ------------------------------------------------------------------------------- gradient oracles


def plain_mse(net: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Unmasked MSE of ``net`` at ``params`` with plain operations (independent of ``mse_loss``)."""
    return ((torch.func.functional_call(net, params, (x,)) - y) ** 2).mean()


def autograd_grad(net: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """∇ of :func:`plain_mse` at ``params`` with classic ``torch.autograd.grad`` (not torch.func)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(plain_mse(net, leaves, x, y), list(leaves.values()))
    return dict(zip(leaves, grads))


def finite_difference_grad(objective: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor], h: float = 1e-6):
    """Central finite differences of a scalar ``objective(params)``, one coordinate at a time."""
    grads = {}
    for name, value in params.items():
        fd = torch.zeros_like(value)
        for i in range(value.numel()):
            plus = {k: v.clone() for k, v in params.items()}
            minus = {k: v.clone() for k, v in params.items()}
            plus[name].view(-1)[i] += h
            minus[name].view(-1)[i] -= h
            fd.view(-1)[i] = (objective(plus) - objective(minus)) / (2 * h)
        grads[name] = fd
    return grads


# ------------------------------------------------------------------------------------- Trainer


def quiet_trainer(**overrides) -> pl.Trainer:
    """A one-device CPU Trainer without logger, checkpoints, progress bar, summary, sanity check or
    validation batches; any argument can be overridden (``limit_val_batches=1.0`` to validate)."""
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    with warnings.catch_warnings():
        # the CPU is chosen on purpose (tiny float64 runs); on a GPU host Lightning would point that out each time
        warnings.filterwarnings("ignore", "GPU available but not used", UserWarning)
        return pl.Trainer(**{**defaults, **overrides})


#: For tests that fit on a bare training DataLoader on purpose (validation has its own tests): Lightning's
#: notice that the module's ``validation_step`` has no ``val_dataloader`` is expected there.
FIT_WITHOUT_VALIDATION = pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no `val_dataloader`:UserWarning"
)


def console_text(capsys, caplog) -> str:
    """Everything the run showed a user: stdout, stderr and log records (``rank_zero_info`` goes
    through Python logging, which pytest captures in ``caplog`` rather than on a stream)."""
    captured = capsys.readouterr()
    return captured.out + captured.err + caplog.text
