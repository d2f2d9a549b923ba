"""ClientApp: a SuperNode with ``partition-id = p`` is train client ``p`` of the configured data
module; its data never leaves it — it uploads only its update (train) or its metrics (evaluate).

A module with per-client state keeps the client's row on the node: in the module's store while the
process lives (one module per config and partition) and in the node's ``context.state``, which the
SuperNode holds between messages and never sends (see :mod:`lightning_metafed.flower`).

Under secure aggregation (run config ``secure-aggregation = true``) the server drives Flower's
SecAgg+ workflow: its messages carry the ``secaggplus_configs`` record and go through Flower's
``secaggplus_mod``, which answers the key-exchange stages itself and masks the update that
:func:`lightning_metafed.flower_secure.node_secure_fit` computes (see
:mod:`lightning_metafed.flower_secure`). Every other message reaches the handlers unchanged. The
library is imported only by the handlers, so the key-exchange stages stay light.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS


def secure_aggregation_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for the SecAgg+ workflow's messages (they carry its config
    record); the plain protocol's messages, which ``secaggplus_mod`` cannot read, pass through."""
    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secure_aggregation_mod])


@lru_cache(maxsize=16)  # one entry per SuperNode process; in-process runs hold one per node
def _setup(config: str, partition: int) -> tuple[Any, Any]:
    """The module and data module of client ``partition``, kept for the life of the process."""
    from lightning_metafed.flower import load_from_config

    return load_from_config(config)


def _client(context: Context) -> tuple[Any, Any, int]:
    partition = int(context.node_config["partition-id"])
    return (*_setup(str(context.run_config["config"]), partition), partition)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Adapt on the node's data and reply with the update (state stays in ``context.state``): the
    plain protocol's message, or the SecAgg+ workflow's fit instruction (a legacy ``FitIns``)."""
    model, data, partition = _client(context)
    if "fitins.parameters" in msg.content.array_records:
        from lightning_metafed.flower_secure import node_secure_fit

        return Message(node_secure_fit(model, data, partition, msg.content, context.state), reply_to=msg)
    from lightning_metafed.flower import node_train

    return Message(node_train(model, data, partition, msg.content, context.state), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalize from the node's own state and reply with the metrics."""
    from lightning_metafed.flower import node_evaluate

    model, data, partition = _client(context)
    return Message(node_evaluate(model, data, partition, msg.content, context.state), reply_to=msg)
