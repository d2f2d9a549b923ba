"""Personalization metrics: adaptation curves and per-client statistics of held-out clients.

Every held-out client is adapted from the meta-parameters on its support set and scored on its
query set after ``0, 1, …, K`` steps; :class:`ClientRecords` collects one row per client across
the batches of an evaluation epoch (synced across DDP ranks by torchmetrics, each client kept once),
and :func:`client_statistics` summarizes them.

A client whose adaptation diverged (a NaN or infinite metric at some step, e.g. under a too-large
inner learning rate) keeps its non-finite values: the means over clients are then NaN or inf, as
they should be. :func:`divergence` finds such clients; the writers of artifacts never fail on them
(the CSV holds ``nan``/``inf``, the figure is drawn from the finite values only).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics import CatMetric

__all__ = [
    "ClientRecords", "client_statistics", "curve_figure", "divergence", "higher_is_better", "worst_quantile",
    "write_client_csv",
]


def higher_is_better(metric: str) -> bool:
    """Direction of a metric by name: accuracies up, losses (and anything else) down."""
    return "acc" in metric


def divergence(curves: Mapping[str, Tensor]) -> tuple[Tensor, int | None]:
    """Which clients diverged, from curves ``{metric: [N, K+1]}``: ``[N]`` bool, true where any
    metric is NaN or infinite at any step, and the first step (column: ``0`` is before adaptation)
    at which any client's metric is non-finite (``None`` when no client diverged)."""
    bad = torch.stack([~torch.isfinite(c) for c in curves.values()]).any(0)
    steps = bad.any(0).nonzero()
    return bad.any(1), (int(steps[0]) if len(steps) else None)


def worst_quantile(values: Tensor, q: float, higher_better: bool) -> Tensor:
    """The ``q``-quantile of ``values`` ``[N]`` (linear interpolation, as ``torch.quantile``) with every
    non-finite value (NaN, ±inf: a diverged client) ranked as the worst possible one.

    Finite ``values`` give exactly ``torch.quantile(values, q)``. Otherwise diverged clients count as
    ``+inf`` (``-inf`` where higher is better): the result is that infinity once the quantile reaches
    them, and the interpolated quantile of the other clients before (never NaN).
    """
    if bool(torch.isfinite(values).all()):
        return torch.quantile(values, q)
    worst = float("-inf") if higher_better else float("inf")
    ranked = torch.where(torch.isfinite(values), values, torch.full_like(values, worst)).sort().values
    position = q * (ranked.numel() - 1)
    low, high = ranked[math.floor(position)], ranked[math.ceil(position)]
    if torch.isinf(low) or torch.isinf(high):  # lerp would give inf - inf = NaN
        return low if torch.isinf(low) else high
    return torch.lerp(low, high, position - math.floor(position))


def client_statistics(pre: Tensor, post: Tensor, weights: Tensor, metric: str) -> dict[str, Tensor]:
    """Summary of one metric over clients (``pre``/``post`` ``[N]``, ``weights`` ``[N]``).

    - ``pre``/``post``: mean over clients (each client counts once);
    - ``post_weighted``: mean weighted by ``weights`` (query example counts: the pooled
      example-level metric);
    - ``post_std``: standard deviation over clients (0 for a single client);
    - ``post_worst10``: the worst 10 % boundary — the 10th percentile for metrics where higher is
      better, the 90th percentile otherwise (:func:`worst_quantile`);
    - ``improved``: fraction of clients whose metric improved with adaptation.

    Diverged clients (NaN or infinite values) are not hidden: ``pre``, ``post``, ``post_weighted``
    and ``post_std`` are then NaN or infinite (plain arithmetic); ``post_worst10`` ranks them as the
    worst clients, so it is ``+inf`` for a loss (``-inf`` where higher is better) when more than
    about 10 % of the clients diverged and finite otherwise, never NaN; ``improved`` counts a client
    with a non-finite ``pre`` or ``post`` as not improved.
    """
    up = higher_is_better(metric)
    w = weights.to(post.dtype)
    return {
        "pre": pre.mean(),
        "post": post.mean(),
        "post_weighted": (w * post).sum() / w.sum(),
        "post_std": post.std(unbiased=False) if post.numel() > 1 else post.new_zeros(()),
        "post_worst10": worst_quantile(post, 0.1 if up else 0.9, up),
        "improved": ((post > pre) if up else (post < pre)).to(post.dtype).mean(),
    }


class ClientRecords(nn.Module):
    """Per-client evaluation rows of one epoch: id, support/query sizes and metric curves.

    Rows are packed into one ``[m, 3 + Σ_metrics (K+1)]`` float64 tensor per batch so a single
    torchmetrics ``CatMetric`` gathers them across ranks; :meth:`compute` drops duplicated clients
    (a distributed sampler pads ranks by repeating clients).
    """

    def __init__(self):
        super().__init__()
        # float64 rows: client ids stay exact up to 2**53 (the default float32 would round them past 2**24).
        self.rows = CatMetric(nan_strategy="disable").set_dtype(torch.float64)
        self.keys: list[str] = []
        self.steps = 0

    def update(self, client_id: Tensor, n_support: Tensor, n_query: Tensor, curves: Mapping[str, Tensor]) -> None:
        self.keys = list(curves)
        self.steps = next(iter(curves.values())).shape[1]
        columns = [client_id, n_support, n_query]
        packed = torch.cat(
            [torch.stack([c.to(torch.float64) for c in columns], dim=1)] + [curves[k].to(torch.float64) for k in self.keys], dim=1
        )
        self.rows.update(packed)

    def compute(self) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """``(client_id, n_support, n_query, {metric: [N, K+1]})``, one row per distinct client."""
        rows = self.rows.compute()
        ids = rows[:, 0]
        keep = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        seen: set[int] = set()
        for i, cid in enumerate(ids.tolist()):
            if cid not in seen:
                seen.add(cid)
                keep[i] = True
        rows = rows[keep]
        curves = {k: rows[:, 3 + j * self.steps : 3 + (j + 1) * self.steps] for j, k in enumerate(self.keys)}
        return rows[:, 0].long(), rows[:, 1].long(), rows[:, 2].long(), curves

    def reset(self) -> None:
        self.rows.reset()


def write_client_csv(path: Path, client_id: Tensor, n_support: Tensor, n_query: Tensor, curves: Mapping[str, Tensor]) -> None:
    """One row per client: ``client_id, n_support, n_query, <metric>_pre, <metric>_post, ...``.

    Non-finite values are written as they are (``nan``, ``inf``, ``-inf``; ``float()`` reads them back).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["client_id", "n_support", "n_query"] + [f"{k}_{s}" for k in curves for s in ("pre", "post")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(len(client_id)):
            row: list = [int(client_id[i]), int(n_support[i]), int(n_query[i])]
            for curve in curves.values():
                row += [float(curve[i, 0]), float(curve[i, -1])]
            writer.writerow(row)


def curve_figure(curves: Mapping[str, Tensor], title: str):
    """A matplotlib figure of each metric's client-mean vs adaptation steps.

    Drawn from the finite values only (the mean and percentiles at each step are over the clients
    whose metric is finite there; the title counts the diverged clients). ``None`` without
    matplotlib, or when no value is finite (nothing to draw).
    """
    finite = {k: torch.where(torch.isfinite(c), c.double(), math.nan).cpu() for k, c in curves.items()}
    if not any(bool(torch.isfinite(c).any()) for c in finite.values()):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    diverged = int(divergence(curves)[0].sum())
    if diverged:
        title = f"{title} ({diverged} of {len(next(iter(curves.values())))} clients diverged; their non-finite values are left out)"
    fig, axes = plt.subplots(1, len(finite), figsize=(4 * len(finite), 3), squeeze=False)
    for ax, (key, curve) in zip(axes[0], finite.items()):
        low, high = torch.nanquantile(curve, torch.tensor([0.1, 0.9], dtype=torch.float64), dim=0)
        steps = list(range(curve.shape[1]))
        ax.plot(steps, curve.nanmean(0).tolist(), marker="o", label="mean over clients")
        ax.fill_between(steps, low.tolist(), high.tolist(), alpha=0.2, label="10th–90th percentile")
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def format_summary(stats: Mapping[str, Mapping[str, Tensor]], stage: str, num_clients: int, diverged: int = 0) -> str:
    """A compact table: metric × {pre, post, worst-10 %, weighted post, improved}; non-finite values
    print as ``nan``/``inf``, and a last line counts the ``diverged`` clients when there are any."""
    lines = [f"{stage}: personalization on {num_clients} held-out clients", f"{'metric':<10}{'pre':>10}{'post':>10}{'worst-10%':>11}{'weighted':>10}{'improved':>10}"]
    for metric, s in stats.items():
        lines.append(
            f"{metric:<10}{float(s['pre']):>10.4f}{float(s['post']):>10.4f}{float(s['post_worst10']):>11.4f}"
            f"{float(s['post_weighted']):>10.4f}{float(s['improved']):>10.2%}"
        )
    if diverged:
        lines.append(f"{diverged} of {num_clients} clients diverged (non-finite metrics): the means include them")
    return "\n".join(lines)
