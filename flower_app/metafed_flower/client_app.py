"""ClientApp: a SuperNode with ``partition-id = p`` is train client ``p`` of the configured data
module; its data never leaves it — it uploads only its update (train) or its metrics (evaluate).

A module with per-client state keeps the client's row on the node: in the module's store while the
process lives (one module per config and partition) and in the node's ``context.state``, which the
SuperNode holds between messages and never sends (see :mod:`lightning_metafed.flower`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from lightning_metafed.flower import load_from_config, node_evaluate, node_train

app = ClientApp()


@lru_cache(maxsize=4)
def _setup(config: str, partition: int) -> tuple[Any, Any]:
    """The module and data module of client ``partition``, kept for the life of the process."""
    return load_from_config(config)


def _client(context: Context) -> tuple[Any, Any, int]:
    partition = int(context.node_config["partition-id"])
    return (*_setup(str(context.run_config["config"]), partition), partition)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Adapt on the node's data and reply with the update (state stays in ``context.state``)."""
    model, data, partition = _client(context)
    return Message(node_train(model, data, partition, msg.content, context.state), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalize from the node's own state and reply with the metrics."""
    model, data, partition = _client(context)
    return Message(node_evaluate(model, data, partition, msg.content, context.state), reply_to=msg)
