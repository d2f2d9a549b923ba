"""ServerApp: holds the meta-parameters and the server optimizer (its state kept across rounds);
each round sends the parameters to every client, aggregates their updates with the module's
aggregator and takes a server step."""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from lightning_metafed.flower import (
    load_from_config,
    server_message,
    server_optimizer,
    server_update,
)

app = ServerApp()


def _wait_for_nodes(grid: Grid, count: int, timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise RuntimeError(f"Only {len(nodes)} of {count} SuperNodes connected within {timeout:.0f} s")
        time.sleep(0.5)


def _exchange(grid: Grid, nodes: list[int], content, message_type: str) -> list:
    messages = [Message(content=content, dst_node_id=n, message_type=message_type) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=600))
    errors = [r.error for r in replies if r.has_error()]
    if errors or len(replies) != len(nodes):
        raise RuntimeError(f"Expected {len(nodes)} replies, got {len(replies)} ({len(errors)} errors: {errors[:2]})")
    return [r.content for r in replies]


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    model, _ = load_from_config(str(cfg["config"]))
    optimizer = server_optimizer(model)
    nodes = _wait_for_nodes(grid, int(cfg["num-nodes"]))
    for r in range(int(cfg["rounds"])):
        replies = _exchange(grid, nodes, server_message(model, r), MessageType.TRAIN)
        metrics = server_update(model, optimizer, replies, r)
        print(f"round {r}: {len(replies)} updates aggregated; " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    evaluations = _exchange(grid, nodes, server_message(model, int(cfg["rounds"])), MessageType.EVALUATE)
    keys = [k for k in evaluations[0]["metrics"] if k not in ("partition", "n_query")]
    means = {k: sum(float(e["metrics"][k]) for e in evaluations) / len(evaluations) for k in keys}
    print("evaluation: " + ", ".join(f"{k}={v:.4f}" for k, v in means.items()), flush=True)
    if cfg.get("output"):
        torch.save({k: p.detach().cpu() for k, p in model.named_parameters()}, str(cfg["output"]))
