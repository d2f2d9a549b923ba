"""ClientApp: a SuperNode with ``partition-id = p`` is train client ``p`` of the configured data
module; its data never leaves it — it uploads only its update (train) or its metrics (evaluate)."""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from lightning_metafed.flower import client_evaluate, client_train, load_from_config

app = ClientApp()


@lru_cache(maxsize=2)
def _setup(config: str):
    return load_from_config(config)


@app.train()
def train(msg: Message, context: Context) -> Message:
    model, data = _setup(str(context.run_config["config"]))
    return Message(client_train(model, data, int(context.node_config["partition-id"]), msg.content), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model, data = _setup(str(context.run_config["config"]))
    return Message(client_evaluate(model, data, int(context.node_config["partition-id"]), msg.content), reply_to=msg)
