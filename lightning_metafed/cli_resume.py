"""``metafed fit --ckpt_path PATH --resume_with checkpoint``: the checkpoint's configuration wins.

Before the CLI builds anything, :func:`checkpoint_config` writes the checkpoint's hyperparameters into
the parsed configuration: the module's (class and arguments; the net and the optimizer callables stay
as configured: the net's weights come from the checkpoint, and the callables are not hyperparameters), the data module's, and the server optimizer's (its class when the
checkpoint records it, and the hyperparameters of its first parameter group). The run's
``config.yaml`` then records what it actually runs with.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from jsonargparse import Namespace, dict_to_namespace

from lightning_metafed.checkpoint import AtomicCheckpointIO
from lightning_metafed.resume import OPTIMIZER_KEY, init_arguments

__all__ = ["checkpoint_config"]

_NOT_ARGUMENTS = {"_class_path", "_instantiator"}


def as_config(value: Any) -> Any:
    """A hyperparameter as the parser holds it: ``class_path``/``init_args`` dicts as namespaces,
    library config objects as their class path and constructor arguments (nested ones too)."""
    if isinstance(value, Mapping):
        if "class_path" in value:
            return dict_to_namespace({"class_path": value["class_path"], "init_args": dict(value.get("init_args") or {})})
        return dict(value)
    if hasattr(value, "__dict__") and type(value).__module__.startswith("lightning_metafed"):
        path = f"{type(value).__module__}.{type(value).__qualname__}"
        arguments = {k: as_config(v) for k, v in init_arguments(value).items()}
        return Namespace(class_path=path, init_args=Namespace(**arguments))
    return value


def merge_section(section: Namespace, saved: Mapping[str, Any], keep: tuple[str, ...] = ()) -> Namespace:
    """``section`` (``class_path`` + ``init_args``) with the saved class and arguments; ``keep``
    names arguments kept from ``section`` (the net)."""
    class_path = saved.get("_class_path", section.class_path)
    old = section.init_args or Namespace()
    args = Namespace() if class_path != section.class_path else old.clone()
    for key in keep:
        if key in old:
            args[key] = old[key]
    for key, value in saved.items():
        if key not in _NOT_ARGUMENTS and key not in keep:
            args[key] = as_config(value)
    return Namespace(class_path=class_path, init_args=args)


def optimizer_section(section: Namespace | None, checkpoint: Mapping[str, Any]) -> Namespace | None:
    """The server optimizer's config with the checkpoint's class (when recorded) and hyperparameters."""
    states = checkpoint.get("optimizer_states") or []
    if section is None or not states or not hasattr(section, "class_path"):
        return section
    saved = states[0]["param_groups"][0]
    group = {k: v for k, v in saved.items() if k not in ("params", "initial_lr")}
    group["lr"] = saved.get("initial_lr", saved["lr"])  # the configured lr, not where a scheduler took it
    class_path = checkpoint.get(OPTIMIZER_KEY, section.class_path)
    if class_path != section.class_path:
        module, _, name = class_path.rpartition(".")
        accepted = inspect.signature(getattr(__import__(module, fromlist=[name]), name)).parameters
        return dict_to_namespace({"class_path": class_path, "init_args": {k: v for k, v in group.items() if k in accepted}})
    args = section.init_args.clone() if section.init_args is not None else Namespace()
    for key, value in group.items():
        if key in args:
            args[key] = value
    return Namespace(class_path=class_path, init_args=args)


def checkpoint_config(config: Namespace, ckpt_path: str) -> None:
    """Write the checkpoint's module, data and server optimizer configuration into ``config``."""
    checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path, map_location="cpu", weights_only=False)
    if checkpoint.get("hyper_parameters") and config.get("model") is not None:
        model = merge_section(config.model, checkpoint["hyper_parameters"], keep=("net", "server_optimizer", "server_lr_scheduler"))
        server = optimizer_section(model.init_args.get("server_optimizer"), checkpoint)
        if server is not None:
            model.init_args["server_optimizer"] = server
        config["model"] = model
    if checkpoint.get("datamodule_hyper_parameters") and config.get("data") is not None:
        config["data"] = merge_section(config.data, checkpoint["datamodule_hyper_parameters"])
