"""Shared pieces of the benchmarks: the sinusoid workload, timing, and reference implementations."""

from __future__ import annotations

import contextlib
import io
import math
import statistics
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import lightning_metafed as lm


def sinusoid_batch(m: int, shots: int = 10, seed: int = 0) -> lm.TaskBatch:
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(m, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(m, 1, 1, generator=g) * math.pi
    x = torch.rand(m, 2 * shots, 1, generator=g) * 10 - 5
    y = amp * torch.sin(x + phase)
    return lm.TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def mlp(hidden: int = 40, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def raw_task_loss(net: nn.Module, alpha: float, steps: int):
    """The hand-written torch.func floor: K second-order SGD steps, query MSE."""

    def loss(params, sx, sy):
        return ((functional_call(net, params, (sx,)) - sy) ** 2).mean()

    def task_loss(params, sx, sy, qx, qy):
        for _ in range(steps):
            g = grad(loss)(params, sx, sy)
            params = {k: params[k] - alpha * g[k] for k in params}
        return loss(params, qx, qy)

    return task_loss


def raw_vmap_mean_grads(net, batch, alpha, steps):
    """``vmap(task_loss)(...).mean().backward()``: the mean meta-gradient with one backward."""
    params = dict(net.named_parameters())
    for p in params.values():
        p.grad = None
    losses = vmap(raw_task_loss(net, alpha, steps), in_dims=(None, 0, 0, 0, 0))(
        params, batch.support_x, batch.support_y, batch.query_x, batch.query_y
    )
    losses.mean().backward()
    return {k: p.grad for k, p in params.items()}


def raw_vmap_per_client_grads(net, batch, alpha, steps):
    """``vmap(grad(task_loss))``: every client's own meta-gradient."""
    params = {k: p.detach() for k, p in net.named_parameters()}
    return vmap(grad(raw_task_loss(net, alpha, steps)), in_dims=(None, 0, 0, 0, 0))(
        params, batch.support_x, batch.support_y, batch.query_x, batch.query_y
    )


def plain_loop_grads(net, batch, alpha, steps):
    """A Python loop over clients with plain autograd (create_graph=True inner steps)."""
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    for p in params:
        p.grad = None
    total = 0.0
    for i in range(batch.num_clients):
        fast = dict(zip(names, params))
        for _ in range(steps):
            loss = ((functional_call(net, fast, (batch.support_x[i],)) - batch.support_y[i]) ** 2).mean()
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: w - alpha * g for (n, w), g in zip(fast.items(), grads)}
        total = total + ((functional_call(net, fast, (batch.query_x[i],)) - batch.query_y[i]) ** 2).mean()
    (total / batch.num_clients).backward()
    return {n: p.grad for n, p in net.named_parameters()}


def higher_loop_grads(net, batch, alpha, steps):
    """The same round written with ``higher`` (one innerloop_ctx per client)."""
    import higher

    for p in net.parameters():
        p.grad = None
    opt = torch.optim.SGD(net.parameters(), lr=alpha)
    for i in range(batch.num_clients):
        with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(((fnet(batch.support_x[i]) - batch.support_y[i]) ** 2).mean())
            (((fnet(batch.query_x[i]) - batch.query_y[i]) ** 2).mean() / batch.num_clients).backward()
    return {n: p.grad for n, p in net.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def fit_and_test(model: pl.LightningModule, data: pl.LightningDataModule) -> float:
    """One quiet CPU fit of ``data``'s rounds (no logger, checkpoints or validation), then the
    post-adaptation test accuracy ``test/acc_post`` of the fitted ``model``. Lightning's log level is
    left alone (it is process-wide: the scripts' worker processes lower it themselves)."""
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
        return float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc_post"])
