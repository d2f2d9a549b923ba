"""Deployment on Flower: the server holds the meta-parameters and the server optimizer; each client
adapts on data that never leaves it and uploads only its update.

The protocol is plain functions of Flower ``RecordDict``s, shared by the Flower app in
``flower_app/`` (ServerApp + ClientApp, run with ``flwr run``) and by :func:`simulate`, an
in-process run of the same functions:

- server → client (``train``): ``{"arrays": meta-parameters, "config": {"round": r}}``;
- client → server: ``{"arrays": the client's update, "metrics": {"partition": p, "weight": n, ...}}``;
- server → client (``evaluate``): the meta-parameters; client → server: pre/post metrics only.

Client ``p`` (a SuperNode's ``partition-id``) owns train client ``p`` of the data module built from
the same YAML config as ``metafed fit``; in round ``r`` it draws its support/query sets exactly as
the data module would (a pure function of seed, round and client). Requires the optional extra
``flwr`` (``pip install 'lightning-metafed[flower]'``).

Per-client state (a module with a ``client_state`` store, e.g. FedPer's heads or Ditto's personal
models) stays on the client. Client ``p``'s row lives in its own module's store, keyed by its
global id: :func:`client_train` reads it, passes it to ``client_update(meta, task, state)`` and
writes the new row back once the update is done (and finite: a non-finite upload is dropped by the
server, so its row is not kept, as in a Lightning round); :func:`client_evaluate` starts the
client's personalized model from it (``evaluation_params``). Only the upload leaves the client; an
upload may hold a subset of the parameters (FedPer's body), and the server step leaves the others
alone. A SuperNode runs each message in a fresh ClientApp process, so the row is also kept in the
node's ``context.state`` (a record the SuperNode holds locally and never sends): :func:`node_train`
and :func:`node_evaluate` restore it into the store before a message and keep it after.
:func:`simulate` keeps one module (and one such record) per partition for the whole run.

With the module's ``compressor`` a client sends its update's encoding and keeps its error-feedback
residual on the node as it keeps a state row (:mod:`lightning_metafed.flower_compression`).

The server's side of a round in the clear (:func:`replies_to_uploads`, :func:`server_update` and
their helpers) is defined in :mod:`lightning_metafed.flower_aggregation` and re-exported here.
Client-level DP (the module's ``privacy``) runs on the server as in a Lightning round: the server
clips the clear updates, sums them, adds the noise and accounts for it in a
:class:`~lightning_metafed.round.PrivacyLedger` (:func:`server_ledger`, :func:`server_update`).
Under secure aggregation (:mod:`lightning_metafed.flower_secure`) the server sees only the sum of
the uploads, so the clients clip; the ServerApp's loop is :func:`lightning_metafed.flower_server.run_server`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_metafed.data.datamodule import stack_tasks
from lightning_metafed.flower_aggregation import (  # the server side, re-exported: this module is its public path
    check_flower_module,
    public_privacy_metrics,
    replies_to_uploads,
    server_ledger,
    server_optimizer,
    server_update,
)
from lightning_metafed.flower_compression import encode_upload, keep_residual, restore_residual
from lightning_metafed.functional.aggregate import finite_clients
from lightning_metafed.round import ClientComputation

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import RecordDict

    from lightning_metafed.algorithms.base import MetaFedModule
    from lightning_metafed.data.datamodule import FederatedDataModule
    from lightning_metafed.data.task_batch import TaskBatch
    from lightning_metafed.functional.client_task import Params

STATE_RECORD = "metafed-client-state"
"""The key of a client's state row in its SuperNode's ``context.state``."""

__all__ = [
    "check_flower_module",
    "client_batch",
    "client_computation",
    "client_evaluate",
    "client_train",
    "keep_state_row",
    "load_from_config",
    "load_parameters",
    "node_evaluate",
    "node_train",
    "public_privacy_metrics",
    "replies_to_uploads",
    "restore_row",
    "server_ledger",
    "server_message",
    "server_optimizer",
    "server_update",
    "simulate",
    "stored_row",
    "with_node_state",
]


def require_flwr() -> Any:
    """Import ``flwr.app`` or raise an ``ImportError`` that says how to install it."""
    try:
        import flwr.app
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("Flower deployment needs the optional package `flwr`: pip install 'lightning-metafed[flower]'") from err
    return flwr.app


def load_from_config(config: str, overrides: Sequence[str] = ()) -> tuple[MetaFedModule, FederatedDataModule]:
    """The module and (set-up) data module a ``metafed fit --config CONFIG`` run would build.

    Args:
        config: the path of the YAML config (as for ``metafed fit --config``).
        overrides: further command-line arguments, e.g. ``["--model.inner_steps=3"]``.
    """
    from lightning_metafed.cli import build_cli

    cli = build_cli(["--config", config, "--trainer.logger=false", *overrides], run=False)
    cli.datamodule.setup("fit")
    return cli.model, cli.datamodule


def _parameters(model: MetaFedModule) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu() for k, p in model.named_parameters()}


def load_parameters(model: MetaFedModule, arrays: Any) -> None:
    """Copy the server's meta-parameters (an ``ArrayRecord`` or a ``{name: tensor}`` mapping) into ``model``.

    Args:
        model: the module whose parameters are overwritten.
        arrays: the server's meta-parameters, an ``ArrayRecord`` or a ``{name: tensor}`` mapping.
    """
    state = arrays.to_torch_state_dict() if hasattr(arrays, "to_torch_state_dict") else dict(arrays)
    params = dict(model.named_parameters())
    if set(state) != set(params):
        raise ValueError(f"Expected the parameters {sorted(params)} from the server, got {sorted(state)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.dtype))


def server_message(model: MetaFedModule, round_idx: int) -> RecordDict:
    """What the server sends a client: the meta-parameters and the round index.

    Args:
        model: the server's module, built from the run's config.
        round_idx: the round the client trains for.
    """
    app = require_flwr()
    return app.RecordDict(
        {"arrays": app.ArrayRecord(torch_state_dict=_parameters(model)), "config": app.ConfigRecord({"round": round_idx})}
    )


def client_batch(data: FederatedDataModule, partition: int, round_idx: int | None) -> TaskBatch:
    """Client ``partition``'s batch of one: its task of round ``round_idx`` (``None``: its evaluation
    task), its weight and its global id.

    Args:
        data: the set-up data module built from the same config.
        partition: the client's ``partition-id``, its position among the train clients.
        round_idx: the training round (``None``: the client's evaluation task).
    """
    train = data.population("train")
    if not 0 <= partition < len(train):
        raise ValueError(f"Expected `partition-id` in [0, {len(train)}) (the train clients), got {partition}")
    task = data.eval_task(train, partition) if round_idx is None else data.train_task(train, partition, round_idx)
    return stack_tasks([task], [float(train.size(partition))], [train.global_id(partition)])


def client_computation(model: MetaFedModule, batch: TaskBatch) -> tuple[Params, dict[str, torch.Tensor], Params | None]:
    """The batch's upload ``{name: [1, *shape]}``, its diagnostics and (with a ``client_state``
    store) the client's new state row; nothing is written yet (see :func:`keep_state_row`).

    Args:
        model: the client's module, built from the run's config.
        batch: the client's batch of one (:func:`client_batch`).
    """
    if model.client_state is None:
        updates, aux = model.client_updates_with_aux(batch)
        return updates, aux, None
    computation = ClientComputation(model.client_update, model.runner, state_store=model.client_state)
    uploads = computation.uploads(model.meta_parameters(detach=True), batch, None)
    return uploads.updates, uploads.aux, uploads.state


def keep_state_row(model: MetaFedModule, batch: TaskBatch, state: Params | None) -> None:
    """Write the client's new state row (from :func:`client_computation`) into the module's store.

    Args:
        model: the client's module, built from the run's config.
        batch: the client's batch of one (its global id keys the row).
        state: the new row, or ``None`` (nothing is written).
    """
    if state is not None:
        model.client_state.write(batch.client_id, state)


def _client_round(model: MetaFedModule, batch: TaskBatch) -> tuple[Params, dict[str, torch.Tensor]]:
    """The batch's upload and diagnostics. With a ``client_state`` store the client's row is read
    from it and, when the upload is finite (the server keeps it), its new row is written back."""
    updates, aux, state = client_computation(model, batch)
    if bool(finite_clients(updates).all()):
        keep_state_row(model, batch, state)
    return updates, aux


def client_train(model: MetaFedModule, data: FederatedDataModule, partition: int, content: RecordDict) -> RecordDict:
    """Client ``partition``: load the meta-parameters, adapt on its own data, return its update
    (a module with per-client state also updates the client's row in its own store).

    Args:
        model: the client's module, built from the run's config.
        data: the set-up data module built from the same config.
        partition: the client's ``partition-id``, its position among the train clients.
        content: the server's message (``arrays``: the meta-parameters; ``config``: the round).
    """
    app = require_flwr()
    load_parameters(model, content["arrays"])
    batch = client_batch(data, partition, int(content["config"]["round"]))
    updates, aux = _client_round(model, batch)
    weight = float(data.population("train").size(partition))
    metrics = {"partition": partition, "weight": weight, **{k: float(v[0]) for k, v in aux.items()}}
    arrays = {k: u[0].detach().cpu() for k, u in updates.items()}
    if model.compressor is not None:  # the encoding crosses the wire (see lightning_metafed.flower_compression)
        arrays = encode_upload(model, batch, updates, int(content["config"]["round"]))
    return app.RecordDict({"arrays": app.ArrayRecord(torch_state_dict=arrays), "metrics": app.MetricRecord(metrics)})


def client_evaluate(model: MetaFedModule, data: FederatedDataModule, partition: int, content: RecordDict) -> RecordDict:
    """Personalization of client ``partition`` on its own data: adapt on its support set from the
    meta-parameters (a module with per-client state: from the client's own starting point, its
    stored row), score its query set before (``pre``) and after (``post``) adaptation.

    Args:
        model: the client's module, built from the run's config.
        data: the set-up data module built from the same config.
        partition: the client's ``partition-id``, its position among the train clients.
        content: the server's message (``arrays``: the meta-parameters).
    """
    app = require_flwr()
    load_parameters(model, content["arrays"])
    batch = client_batch(data, partition, None)
    curves = model.adaptation_curves(batch)
    metrics: dict[str, float] = {"partition": partition, "n_query": float(batch.query_x.shape[1])}
    for key, curve in curves.items():
        metrics[f"{key}_pre"], metrics[f"{key}_post"] = float(curve[0, 0]), float(curve[0, -1])
    return app.RecordDict({"metrics": app.MetricRecord(metrics)})


def stored_row(model: MetaFedModule, data: FederatedDataModule, partition: int) -> Params | None:
    """Client ``partition``'s row in the module's store, or ``None`` (no store, or the client has no
    row: the store holds the rows of the clients it trained, one client per SuperNode).

    Args:
        model: the client's module, built from the run's config.
        data: the set-up data module built from the same config.
        partition: the client's ``partition-id``, its position among the train clients.
    """
    if model.client_state is None or len(model.client_state) == 0:
        return None
    row = model.client_state.gather([data.population("train").global_id(partition)])
    return {k: v[0].detach().cpu() for k, v in row.items()}


def restore_row(model: MetaFedModule, data: FederatedDataModule, partition: int, state: RecordDict) -> None:
    """Write client ``partition``'s row kept in ``state`` (a SuperNode's ``context.state``) into the module's store.

    Args:
        model: the client's module, built from the run's config.
        data: the set-up data module built from the same config.
        partition: the client's ``partition-id``, its position among the train clients.
        state: the SuperNode's node-local ``context.state`` record.
    """
    if model.client_state is None or STATE_RECORD not in state:
        return
    row = state[STATE_RECORD].to_torch_state_dict()
    key = [data.population("train").global_id(partition)]
    model.client_state.write(key, {k: v.unsqueeze(0) for k, v in row.items()})


def node_train(model: MetaFedModule, data: FederatedDataModule, partition: int, content: RecordDict, state: RecordDict) -> RecordDict:
    """A SuperNode's train message: :func:`client_train` with the client's row restored from the
    node-local ``state`` before and kept there after (it is not part of the reply).

    Args:
        model: the client's module, built from the run's config.
        data: the set-up data module built from the same config.
        partition: the client's ``partition-id``, its position among the train clients.
        content: the server's message (``arrays``: the meta-parameters; ``config``: the round).
        state: the SuperNode's node-local ``context.state`` record.
    """
    return with_node_state(client_train, model, data, partition, content, state)


def with_node_state(
    handler: Callable[..., RecordDict], model: MetaFedModule, data: FederatedDataModule, partition: int,
    content: RecordDict, state: RecordDict,
) -> RecordDict:
    """``handler(model, data, partition, content)`` with the client's row restored from the node-local
    ``state`` before and kept there after (the row is never part of the reply).

    Args:
        handler: the message handler, :func:`client_train` or :func:`client_evaluate`.
        model: the client's module, built from the run's config.
        data: the set-up data module built from the same config.
        partition: the client's ``partition-id``, its position among the train clients.
        content: the server's message, passed to ``handler``.
        state: the SuperNode's node-local ``context.state`` record.
    """
    key = data.population("train").global_id(partition)
    restore_row(model, data, partition, state)
    restore_residual(model, key, state)
    reply = handler(model, data, partition, content)
    row = stored_row(model, data, partition)
    if row is not None:
        state[STATE_RECORD] = require_flwr().ArrayRecord(torch_state_dict=row)
    keep_residual(model, key, state)
    return reply


def node_evaluate(model: MetaFedModule, data: FederatedDataModule, partition: int, content: RecordDict, state: RecordDict) -> RecordDict:
    """A SuperNode's evaluate message: :func:`client_evaluate` from the row kept in ``state``.

    Args:
        model: the client's module, built from the run's config.
        data: the set-up data module built from the same config.
        partition: the client's ``partition-id``, its position among the train clients.
        content: the server's message (``arrays``: the meta-parameters).
        state: the SuperNode's node-local ``context.state`` record.
    """
    restore_row(model, data, partition, state)
    return client_evaluate(model, data, partition, content)


def simulate(config: str, partitions: Sequence[int], rounds: int, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the Flower protocol in-process: the same messages, clients and server steps as a
    deployment whose SuperNodes have ``partition-id`` in ``partitions`` (all of them trained every
    round, so under ``privacy`` the default sampling rate is 1). Each partition keeps its own module
    (and node-local state record) for the whole run, as a SuperNode does.

    Returns the final parameters, the per-round client metrics (with ``privacy/*`` under DP), the
    evaluation metrics, every message exchanged (to check what crosses the wire), each partition's
    stored state row (``None`` without per-client state), each node's ``context.state`` record and
    the privacy ledger's summary line.

    Args:
        config: the path of the YAML config (as for ``metafed fit --config``).
        partitions: the ``partition-id`` of every simulated SuperNode.
        rounds: how many rounds to run.
        overrides: further command-line arguments for every module and data module built.
    """
    server_model, _ = load_from_config(config, overrides)
    optimizer = server_optimizer(server_model)
    ledger = server_ledger(server_model, len(partitions))
    nodes = {p: load_from_config(config, overrides) for p in partitions}
    states = {p: require_flwr().RecordDict() for p in partitions}
    messages, history = [], []
    for r in range(rounds):
        down = server_message(server_model, r)
        replies = [node_train(*nodes[p], p, down, states[p]) for p in partitions]
        messages += [down, *replies]
        history.append(server_update(server_model, optimizer, replies, r, ledger, len(partitions)))
    down = server_message(server_model, rounds)
    evaluations = [node_evaluate(*nodes[p], p, down, states[p]) for p in partitions]
    messages += [down, *evaluations]
    return {
        "parameters": _parameters(server_model),
        "history": history,
        "evaluation": [dict(e["metrics"]) for e in evaluations],
        "messages": messages,
        "client_state": {p: stored_row(*nodes[p], p) for p in partitions},
        "node_state": states,
        "privacy": None if ledger is None else ledger.summary(),
    }
