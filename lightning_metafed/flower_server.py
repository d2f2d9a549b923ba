"""The server of a Flower deployment: :class:`FlowerServer` (the module's parameters, its server
optimizer and, under ``privacy``, its privacy ledger) and :func:`run_server`, the ServerApp's loop.

Each round goes one of two ways, chosen by the run config's ``secure-aggregation``:

- in the clear (default): the server sends every node the parameters, receives each client's
  update and runs the same screen, aggregator (or client-level DP: clip, sum, noise) and server
  step as a Lightning round (:func:`~lightning_metafed.flower.server_update`);
- under secure aggregation (:mod:`lightning_metafed.flower_secure`): Flower's SecAgg+ workflow
  gives the server only the sum of the surviving clients' uploads, and
  :meth:`FlowerServer.update_from_sum` turns it into the step: a (weighted) mean, or under DP
  ``ClientDP.aggregate_sum`` of the clients' own clipped updates (noise and the division by the
  clients *messaged* are the server's, as in a Lightning round) and, under adaptive clipping,
  ``ClientDP.next_clip_norm`` from the securely summed count of unclipped clients.

Under ``privacy`` one accountant step is taken per round (halted rounds included) at sampling
rate 1 (every node trains every round), and :func:`run_server` prints ``privacy/epsilon`` (and
the adaptive clip norm) each round and the ledger's summary at the end. The noise is added by the
server after it has seen the sum: the guarantee covers the parameters the server publishes, not the
server itself, nor the clients' training and evaluation metrics it prints (as in simulation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from lightning_metafed.flower import load_from_config, require_flwr, server_message
from lightning_metafed.flower_aggregation import (
    check_flower_module,
    public_privacy_metrics,
    server_ledger,
    server_optimizer,
    server_update,
)
from lightning_metafed.flower_secure import (
    UNCLIPPED,
    WEIGHT,
    SecureAggregation,
    SecureRounds,
    check_secure_module,
)
from lightning_metafed.round import RoundCounts, RoundResult, server_step
from lightning_metafed.round.pipeline import check_finite_aggregate

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import Context, RecordDict

    from lightning_metafed.algorithms.base import MetaFedModule
    from lightning_metafed.functional.client_task import Params

__all__ = ["FlowerServer", "exchange", "run_server", "wait_for_nodes"]


class FlowerServer:
    """The server state of a deployment with ``num_nodes`` SuperNodes, every one of which is sent
    each training round; ``secure``: the SecAgg+ settings, or ``None``.

    Refuses, before any round, a module whose clients need server state (SCAFFOLD), and under
    secure aggregation any aggregator but ``Mean`` and a fixed clip norm above ``clipping-range``.
    """

    def __init__(self, model: MetaFedModule, num_nodes: int, secure: SecureAggregation | None = None):
        if secure is None:
            check_flower_module(model)
        else:
            check_secure_module(model)
        self.messaged = num_nodes
        if secure is not None:
            secure.check_round_size(num_nodes)
            secure.check_clip_norm(model.privacy)
        self.model, self.secure = model, secure
        self.optimizer = server_optimizer(model)
        self.ledger = server_ledger(model, num_nodes)
        #: The clients whose uploads the last round aggregated.
        self.survivors = 0

    def parameter_arrays(self) -> list[Any]:
        """The meta-parameters as NumPy arrays, in ``named_parameters`` order (the secure messages' order)."""
        return [p.detach().cpu().numpy() for _, p in self.model.named_parameters()]

    def secure_config(self, round_idx: int) -> dict[str, Any]:
        """The config every client gets with the parameters under secure aggregation: the round, the
        clipping range and, under DP, this round's clip norm (and whether to report ``b_i``), else
        under ``Mean(weighted=True)`` the weight scale ``secagg-max-weight``."""
        config: dict[str, Any] = {"round": round_idx, "clipping-range": float(self.secure.clipping_range)}
        if self.ledger is not None:
            config["clip-norm"] = self.round_clip_norm()
            config["report-unclipped"] = bool(self.model.privacy.adaptive)
        elif self.model.aggregator.weighted:
            config["weight-scale"] = float(self.secure.max_weight)
        return config

    def round_clip_norm(self) -> float:
        """The clip norm the clients use this round under secure aggregation: the ledger's, capped at
        ``clipping-range`` (a clipped update has no coordinate beyond its norm, so none is refused)."""
        return min(float(self.ledger.clip_norm), float(self.secure.clipping_range))

    def update(self, replies: list[RecordDict], round_idx: int) -> dict[str, float]:
        """The round in the clear: :func:`~lightning_metafed.flower.server_update` on the clients' replies."""
        self.survivors = len(replies)
        return server_update(self.model, self.optimizer, replies, round_idx, self.ledger, self.messaged)

    def update_from_sum(self, total: Params, survivors: int, round_idx: int) -> dict[str, float]:
        """The round from the securely aggregated ``total`` ``{name: sum over the survivors}`` (with
        the extra arrays ``:weight`` / ``:unclipped``): the aggregate, the server step and the ledger."""
        total = dict(total)
        unclipped, weight = total.pop(UNCLIPPED, None), total.pop(WEIGHT, None)
        counts = RoundCounts(sampled=self.messaged, survivors=survivors)
        if self.ledger is not None:
            aggregate, counts = self._private_aggregate(total, unclipped, counts, round_idx)
        else:
            denominator = float(weight[0]) if weight is not None else float(survivors)
            aggregate = {k: v / denominator for k, v in total.items()}
        check_finite_aggregate(aggregate, round_idx)
        server_step(self.optimizer, dict(self.model.named_parameters()), aggregate)
        self.survivors = survivors
        return self._record(RoundResult(aggregate, {}, counts, 0, 0))

    def _private_aggregate(
        self, total: Params, unclipped: torch.Tensor | None, counts: RoundCounts, round_idx: int
    ) -> tuple[Params, RoundCounts]:
        privacy, clip, seed = self.model.privacy, self.round_clip_norm(), self.ledger.seed()
        # Quantization moves each clipped coordinate by less than one step: the noise covers that too.
        sensitivity = clip + math.sqrt(sum(t.numel() for t in total.values())) * self.secure.step()
        aggregate = privacy.aggregate_sum(total, counts.sampled, seed, round_idx, sensitivity)
        if not privacy.adaptive:
            return aggregate, counts
        if unclipped is None:
            raise ValueError(
                f"Round {round_idx}: the secure sum holds no {UNCLIPPED!r} array, which adaptive clipping needs from every "
                "client (`report-unclipped`); the clients must load the same config as the server"
            )
        count = round(float(unclipped[0]))  # a sum of 0/1 values, off by far less than 1/2 after quantization
        following = privacy.next_clip_norm(clip, count, counts.survivors, counts.sampled, seed, round_idx)
        return aggregate, replace(counts, clipped=counts.survivors - count, next_clip_norm=following)

    def skip_round(self, round_idx: int) -> dict[str, float]:
        """A round without an aggregate (too few clients survived): the step counts, the parameters
        stay, the privacy ledger counts the round (the clients used their data)."""
        server_step(self.optimizer, dict(self.model.named_parameters()), None)
        self.survivors = 0
        return self._record(RoundResult(None, {}, RoundCounts(sampled=self.messaged, survivors=0), 0, 0))

    def _record(self, result: RoundResult) -> dict[str, float]:
        if self.ledger is None:
            return {}
        self.ledger.record(result)
        return public_privacy_metrics(self.ledger)

    def summary(self) -> str | None:
        """The privacy ledger's summary line (``None`` without ``privacy``)."""
        return None if self.ledger is None else self.ledger.summary()


def wait_for_nodes(grid: Any, count: int, timeout: float = 120.0) -> list[int]:
    """The first ``count`` node ids (sorted) once that many SuperNodes are connected."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise RuntimeError(f"Only {len(nodes)} of {count} SuperNodes connected within {timeout:.0f} s")
        time.sleep(0.5)


def exchange(grid: Any, nodes: list[int], content: RecordDict, message_type: str, timeout: float = 600.0) -> list[RecordDict]:
    """Send ``content`` to every node and return the replies' contents; raise unless all replied."""
    from flwr.app import Message

    messages = [Message(content=content, dst_node_id=n, message_type=message_type) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    errors = [r.error for r in replies if r.has_error()]
    if errors or len(replies) != len(nodes):
        raise RuntimeError(f"Expected {len(nodes)} replies, got {len(replies)} ({len(errors)} errors: {errors[:2]})")
    return [r.content for r in replies]


def _line(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def run_server(grid: Any, context: Context, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ServerApp's main loop: ``rounds`` training rounds (in the clear, or through SecAgg+ when
    the run config says ``secure-aggregation = true``), then one evaluation of every node; ``log``
    gets one line per round, the evaluation means and the privacy summary.

    Returns the final parameters, the per-round server metrics, the evaluation replies' metrics and
    the privacy summary (``None`` without ``privacy``). ``log`` defaults to a flushed ``print``.
    """
    log = partial(print, flush=True) if log is None else log
    cfg = context.run_config
    model, _ = load_from_config(str(cfg["config"]))
    secure = SecureAggregation.from_run_config(cfg)
    server = FlowerServer(model, int(cfg["num-nodes"]), secure=secure)  # refuses a bad config before waiting
    nodes = wait_for_nodes(grid, server.messaged)
    secure_rounds = None if secure is None else SecureRounds(grid, context, server, nodes, secure)
    message_type = require_flwr().MessageType
    history = []
    for r in range(int(cfg["rounds"])):
        if secure_rounds is None:
            metrics = server.update(exchange(grid, nodes, server_message(model, r), message_type.TRAIN), r)
            head = f"{server.survivors} updates aggregated"
        else:
            metrics = secure_rounds(r)
            head = f"{server.survivors} of {len(nodes)} updates securely aggregated"
            failed = secure_rounds.failures
            head += f" ({len(failed)} failed: {failed[0]})" if failed else ""
        history.append(metrics)
        log(f"round {r}: {head}" + (f"; {_line(metrics)}" if metrics else ""))
    evaluations = exchange(grid, nodes, server_message(model, int(cfg["rounds"])), message_type.EVALUATE)
    keys = [k for k in evaluations[0]["metrics"] if k not in ("partition", "n_query")]
    log("evaluation: " + _line({k: sum(float(e["metrics"][k]) for e in evaluations) / len(evaluations) for k in keys}))
    summary = server.summary()
    if summary is not None:
        log(summary)
    return {
        "parameters": {k: p.detach().cpu().clone() for k, p in model.named_parameters()},
        "history": history,
        "evaluation": [dict(e["metrics"]) for e in evaluations],
        "privacy": summary,
    }
