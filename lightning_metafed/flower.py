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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_metafed.communication import payload_bytes
from lightning_metafed.data.datamodule import stack_tasks
from lightning_metafed.round import Aggregation, RoundCounts, Uploads, UploadScreen, screen_and_aggregate, server_step

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import RecordDict

    from lightning_metafed.algorithms.base import MetaFedModule
    from lightning_metafed.data.datamodule import FederatedDataModule

__all__ = [
    "load_from_config",
    "server_message",
    "client_train",
    "client_evaluate",
    "server_update",
    "replies_to_uploads",
    "simulate",
]


def require_flwr() -> Any:
    """Import ``flwr.app`` or raise an ``ImportError`` that says how to install it."""
    try:
        import flwr.app
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("Flower deployment needs the optional package `flwr`: pip install 'lightning-metafed[flower]'") from err
    return flwr.app


def load_from_config(config: str, overrides: Sequence[str] = ()) -> tuple[MetaFedModule, FederatedDataModule]:
    """The module and (set-up) data module a ``metafed fit --config CONFIG`` run would build."""
    from lightning_metafed.cli import build_cli

    cli = build_cli(["--config", config, "--trainer.logger=false", *overrides], run=False)
    cli.datamodule.setup("fit")
    return cli.model, cli.datamodule


def server_optimizer(model: MetaFedModule) -> torch.optim.Optimizer:
    """The module's server optimizer (its state lives on the server across rounds)."""
    configured = model.configure_optimizers()
    return configured["optimizer"] if isinstance(configured, dict) else configured


def _parameters(model: MetaFedModule) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu() for k, p in model.named_parameters()}


def _load_parameters(model: MetaFedModule, arrays: Any) -> None:
    state = arrays.to_torch_state_dict()
    params = dict(model.named_parameters())
    if set(state) != set(params):
        raise ValueError(f"Expected the parameters {sorted(params)} from the server, got {sorted(state)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.dtype))


def server_message(model: MetaFedModule, round_idx: int) -> RecordDict:
    """What the server sends a client: the meta-parameters and the round index."""
    app = require_flwr()
    return app.RecordDict(
        {"arrays": app.ArrayRecord(torch_state_dict=_parameters(model)), "config": app.ConfigRecord({"round": round_idx})}
    )


def client_train(model: MetaFedModule, data: FederatedDataModule, partition: int, content: RecordDict) -> RecordDict:
    """Client ``partition``: load the meta-parameters, adapt on its own data, return its update."""
    app = require_flwr()
    if model.client_state is not None:
        raise ValueError(
            f"{type(model).__name__} keeps per-client state (`client_state`), which the Flower deployment does not "
            "carry between rounds yet; run it with `metafed fit`."
        )
    _load_parameters(model, content["arrays"])
    round_idx = int(content["config"]["round"])
    train = data.population("train")
    if not 0 <= partition < len(train):
        raise ValueError(f"Expected `partition-id` in [0, {len(train)}) (the train clients), got {partition}")
    task = data.train_task(train, partition, round_idx)
    weight = float(train.size(partition))
    batch = stack_tasks([task], [weight], [train.global_id(partition)])
    updates, aux = model.client_updates_with_aux(batch)
    metrics = {"partition": partition, "weight": weight, **{k: float(v[0]) for k, v in aux.items()}}
    return app.RecordDict(
        {"arrays": app.ArrayRecord(torch_state_dict={k: u[0].detach().cpu() for k, u in updates.items()}), "metrics": app.MetricRecord(metrics)}
    )


def client_evaluate(model: MetaFedModule, data: FederatedDataModule, partition: int, content: RecordDict) -> RecordDict:
    """Personalization of client ``partition`` on its own data: adapt on its support set from the
    meta-parameters, score its query set before (``pre``) and after (``post``) adaptation."""
    app = require_flwr()
    _load_parameters(model, content["arrays"])
    train = data.population("train")
    task = data.eval_task(train, partition)
    batch = stack_tasks([task], [float(train.size(partition))], [train.global_id(partition)])
    curves = model.adaptation_curves(batch)
    metrics: dict[str, float] = {"partition": partition, "n_query": float(task[2].shape[0])}
    for key, curve in curves.items():
        metrics[f"{key}_pre"], metrics[f"{key}_post"] = float(curve[0, 0]), float(curve[0, -1])
    return app.RecordDict({"metrics": app.MetricRecord(metrics)})


def replies_to_uploads(replies: Sequence[RecordDict]) -> tuple[Uploads, list[RecordDict]]:
    """The clients' updates (in partition order) as the round's :class:`~lightning_metafed.round.Uploads`."""
    replies = sorted(replies, key=lambda r: int(r["metrics"]["partition"]))
    states = [r["arrays"].to_torch_state_dict() for r in replies]
    updates = {name: torch.stack([s[name] for s in states]) for name in states[0]}
    weights = torch.tensor([float(r["metrics"]["weight"]) for r in replies])
    partitions = [int(r["metrics"]["partition"]) for r in replies]
    upload = payload_bytes({k: u[0] for k, u in updates.items()})
    return Uploads(updates, {}, weights, partitions, upload), replies


def server_update(
    model: MetaFedModule, optimizer: torch.optim.Optimizer, replies: Sequence[RecordDict], round_idx: int = 0
) -> dict[str, float]:
    """Aggregate the clients' updates (in partition order) with the module's aggregator and take
    a server-optimizer step; returns the mean of the accepted clients' metrics.

    The same server-side stages as a Lightning round (:mod:`lightning_metafed.round.pipeline`):
    non-finite updates are screened out (``reject_nonfinite``), the aggregator combines the rest, a
    non-finite aggregate raises, and :func:`~lightning_metafed.round.server_step` applies it. The
    module's simulated ``faults`` do not apply (a deployment has real ones), and ``privacy`` is
    refused: this server step adds no noise, so it would not give the guarantee the config asks for.
    """
    if model.privacy is not None:
        raise ValueError(
            f"`privacy` ({model.privacy!r}) is applied by the Lightning round only; the Flower server step adds no "
            "noise. Remove it from the config for a Flower deployment."
        )
    uploads, replies = replies_to_uploads(replies)
    counts = RoundCounts(sampled=len(replies), survivors=len(replies))
    screen = UploadScreen(faults=None, reject_nonfinite=model.reject_nonfinite)
    aggregate, uploads, _ = screen_and_aggregate(uploads, screen, Aggregation(model.aggregator), round_idx, counts)
    server_step(optimizer, dict(model.named_parameters()), aggregate)
    accepted = set(uploads.client_id)
    replies = [r for r in replies if int(r["metrics"]["partition"]) in accepted]  # rejected clients' metrics are left out
    keys = [k for k in replies[0]["metrics"] if k not in ("partition", "weight")]
    return {k: sum(float(r["metrics"][k]) for r in replies) / len(replies) for k in keys}


def simulate(config: str, partitions: Sequence[int], rounds: int, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the Flower protocol in-process: the same messages, clients and server steps as a
    deployment whose SuperNodes have ``partition-id`` in ``partitions``.

    Returns the final parameters, the per-round client metrics, the evaluation metrics, and every
    message exchanged (to check what crosses the wire).
    """
    server_model, data = load_from_config(config, overrides)
    optimizer = server_optimizer(server_model)
    client_model, client_data = load_from_config(config, overrides)
    messages, history = [], []
    for r in range(rounds):
        down = server_message(server_model, r)
        replies = [client_train(client_model, client_data, p, down) for p in partitions]
        messages += [down, *replies]
        history.append(server_update(server_model, optimizer, replies, r))
    down = server_message(server_model, rounds)
    evaluations = [client_evaluate(client_model, client_data, p, down) for p in partitions]
    messages += [down, *evaluations]
    return {
        "parameters": _parameters(server_model),
        "history": history,
        "evaluation": [dict(e["metrics"]) for e in evaluations],
        "messages": messages,
    }
