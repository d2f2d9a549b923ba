"""Resuming with a changed configuration: every difference is reported, and the user says which wins.

A fit resumed from a checkpoint (``trainer.fit(..., ckpt_path=...)``, ``metafed fit --ckpt_path``)
compares the checkpoint's hyperparameters with this run's, section by section:

- ``model``: the module's hyperparameters (``inner_steps``, the inner optimizer, the aggregator, ...);
- ``data``: the data module's (``clients_per_round``, ``seed``, ...);
- ``server_optimizer``: the server optimizer's class and its hyperparameters (``lr``, ``betas``, ...).
  Under an LR scheduler the configured ``lr`` (the scheduler's ``initial_lr``) is compared, not where
  the schedule has taken it, and entries a scheduler moves (``betas``, ``momentum``) are left out.

Objects (an aggregator, the inner optimizer) compare by their constructor arguments, so a checkpoint
written through the Python API and a ``class_path`` config compare alike.

:class:`ResumeCheck` (attached by every :class:`~lightning_metafed.MetaFedModule` unless the Trainer
already has one) then applies its ``prefer`` policy:

- ``"error"`` (default): stop before training and list every difference;
- ``"config"``: this run's values win. The module and data are already built from them; the server
  optimizer keeps its state (moments, step counts) with this run's hyperparameters (a schedule keeps
  its position, from this run's base lr), or starts afresh when its class changed (with a warning);
- ``"checkpoint"``: the checkpoint's values win. The ``metafed`` CLI rebuilds the module and data from
  the checkpoint's hyperparameters (so ``config.yaml`` records them); through the Python API the
  objects are already built, so differences in ``model``/``data`` stop the run with a message on how
  to build them from the checkpoint, and the server optimizer is restored as saved.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["ResumeCheck", "config_differences", "init_arguments", "optimizer_differences", "plain", "resume_differences"]

Prefer = Literal["error", "config", "checkpoint"]
#: Where a checkpoint records the server optimizer's class (``module.qualname``).
OPTIMIZER_KEY = "metafed_server_optimizer"
_SKIPPED = {"_instantiator"}
_GROUP_SKIPPED = {"params", "initial_lr", "foreach", "fused", "capturable", "differentiable", "max_lr", "min_lr"}
#: Param-group entries a scheduler may move during training (compared only without schedulers).
_SCHEDULED = {"betas", "momentum", "base_momentum", "max_momentum"}
_MISSING = "<not set>"


def plain(value: Any) -> Any:
    """A comparable form of a hyperparameter: objects by class name and attributes, namespaces and
    ``class_path``/``init_args`` dicts alike, tuples as lists.

    Args:
        value: the hyperparameter value (an object, a mapping, a namespace, a sequence or a scalar).
    """
    if isinstance(value, Mapping) or hasattr(value, "as_dict"):
        mapping = dict(value.as_dict() if hasattr(value, "as_dict") else value)
        if "class_path" in mapping:
            return {"class": str(mapping["class_path"]).rsplit(".", 1)[-1], **plain(mapping.get("init_args") or {})}
        return {str(k): plain(v) for k, v in mapping.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if hasattr(value, "__dict__") and not (inspect.isclass(value) or inspect.isroutine(value)):
        return {"class": type(value).__name__, **{k: plain(v) for k, v in init_arguments(value).items()}}
    return repr(value)


def init_arguments(obj: Any) -> dict[str, Any]:
    """``obj``'s attributes that are also arguments of its constructor (its configuration).

    Args:
        obj: the configured object (e.g. an aggregator or an inner optimizer).
    """
    try:
        accepted = set(inspect.signature(type(obj).__init__).parameters) - {"self"}
    except (TypeError, ValueError):
        return dict(vars(obj))
    return {k: v for k, v in vars(obj).items() if k in accepted}


def init_defaults(obj: Any) -> dict[str, Any]:
    """The default of every constructor argument of ``obj``'s class and its bases."""
    defaults: dict[str, Any] = {}
    for cls in reversed(type(obj).__mro__):
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        defaults.update({p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty})
    return defaults


def config_differences(
    section: str, saved: Mapping[str, Any] | None, current: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> list[str]:
    """``"section.key: checkpoint X, this run Y"`` for every hyperparameter that differs. A key the
    checkpoint lacks (written by an older version) counts only when this run's value is not its default.

    Args:
        section: the prefix of every line (``"model"``, ``"data"``, ``"server_optimizer"``).
        saved: the checkpoint's hyperparameters (``None``: none saved).
        current: this run's hyperparameters.
        defaults: the constructor defaults, for keys the checkpoint lacks (``None``: none).
    """
    saved, defaults = dict(saved or {}), dict(defaults or {})
    lines = []
    for key in sorted((set(saved) | set(current)) - _SKIPPED):
        if key == "_class_path" and (key not in saved or key not in current):
            continue  # one side was built in Python, the other by the CLI
        if key not in saved and key in defaults and plain(current.get(key)) == plain(defaults[key]):
            continue
        old, new = plain(saved.get(key, _MISSING)), plain(current.get(key, _MISSING))
        if old != new:
            lines.append(f"{section}.{key}: checkpoint {old!r}, this run {new!r}")
    return lines


def optimizer_class(optimizer: Any) -> str:
    cls = type(optimizer)
    cls = cls.__mro__[1] if cls.__name__.startswith("LightningOptimizer") else cls
    return f"{cls.__module__}.{cls.__qualname__}"


def optimizer_differences(checkpoint: Mapping[str, Any], fresh: Any) -> tuple[list[str], bool]:
    """Differences between the checkpoint's server optimizer and a freshly built one: the lines, and
    whether the class changed (recorded class, or else different hyperparameter names).

    Args:
        checkpoint: the loaded checkpoint dict (its ``optimizer_states``).
        fresh: the server optimizer this run built.
    """
    states = checkpoint.get("optimizer_states") or []
    if not states:
        return [], False
    scheduled = bool(checkpoint.get("lr_schedulers"))
    saved_group = group_hyperparameters(states[0]["param_groups"][0], scheduled)
    new_group = group_hyperparameters(fresh.param_groups[0], scheduled)
    saved_class, new_class = checkpoint.get(OPTIMIZER_KEY), optimizer_class(fresh)
    changed = saved_class != new_class if saved_class is not None else set(saved_group) != set(new_group)
    if changed:
        was = saved_class or f"an optimizer with {sorted(saved_group)}"
        return [f"server_optimizer: checkpoint {was}, this run {new_class}"], True
    return config_differences("server_optimizer", saved_group, new_group), False


def group_hyperparameters(group: Mapping[str, Any], scheduled: bool) -> dict[str, Any]:
    """A param group's configured hyperparameters: a scheduler's ``initial_lr`` stands for ``lr`` (the
    scheduled value moves every step), and with a scheduler the entries it may move are left out."""
    out = {k: v for k, v in group.items() if k not in _GROUP_SKIPPED and not (scheduled and k in _SCHEDULED)}
    if "initial_lr" in group:
        out["lr"] = group["initial_lr"]
    return out


def apply_config_optimizer(checkpoint: dict[str, Any], fresh: Any, class_changed: bool) -> None:
    """``prefer="config"``: the checkpoint's optimizer state gets this run's hyperparameters (or is
    replaced by the fresh optimizer's when the class changed); schedulers start from the new lrs."""
    if class_changed:
        checkpoint["optimizer_states"][0] = fresh.state_dict()
        checkpoint["lr_schedulers"] = []
        rank_zero_warn("Resuming with a different server optimizer class: its state (moments, step counts) starts afresh.")
        return
    scheduled = bool(checkpoint.get("lr_schedulers"))
    for saved, new in zip(checkpoint["optimizer_states"][0]["param_groups"], fresh.param_groups):
        old_base, new_base = saved.get("initial_lr", saved["lr"]), new.get("initial_lr", new["lr"])
        saved.update({k: v for k, v in group_hyperparameters(new, scheduled).items() if k != "lr"})
        # Where the schedule stands is kept; its base moves to this run's lr.
        saved["lr"] = saved["lr"] * new_base / old_base if scheduled and old_base else new_base
        if "initial_lr" in saved:
            saved["initial_lr"] = new_base
    for scheduler in checkpoint.get("lr_schedulers") or []:
        if "base_lrs" in scheduler:
            scheduler["base_lrs"] = [group.get("initial_lr", group["lr"]) for group in fresh.param_groups]


class ResumeCheck(Callback):
    """Reports every difference between a resumed checkpoint's hyperparameters and this run's,
    then lets ``prefer`` decide: ``"error"`` (default), ``"config"`` or ``"checkpoint"`` (see
    :mod:`lightning_metafed.resume`). Also records the server optimizer's class in checkpoints."""

    def __init__(self, prefer: Prefer = "error") -> None:
        if prefer not in ("error", "config", "checkpoint"):
            raise ValueError(f"Expected `prefer` (`--resume_with`) to be 'error', 'config' or 'checkpoint', got {prefer!r}")
        self.prefer = prefer

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.optimizers:
            checkpoint[OPTIMIZER_KEY] = optimizer_class(trainer.optimizers[0])

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.apply(checkpoint, *resume_differences(checkpoint, pl_module, trainer.datamodule))

    def apply(self, checkpoint: dict[str, Any], built: list[str], optimizer_lines: list[str], fresh: Any, class_changed: bool) -> None:
        """Carry out ``prefer`` for the differences found."""
        lines = built + optimizer_lines
        if not lines:
            return
        listing = "\n".join(f"  - {line}" for line in lines)
        if self.prefer == "error" or (self.prefer == "checkpoint" and (built or class_changed)):
            raise ValueError(resume_error(self.prefer, listing))
        if self.prefer == "config":
            apply_config_optimizer(checkpoint, fresh, class_changed)
            rank_zero_info(f"Resuming with this run's values where they differ from the checkpoint:\n{listing}")
        else:
            rank_zero_info(f"Resuming with the checkpoint's server optimizer hyperparameters:\n{listing}")


def resume_differences(
    checkpoint: Mapping[str, Any], module: pl.LightningModule, datamodule: Any
) -> tuple[list[str], list[str], Any, bool]:
    """The differences in ``model``/``data`` hyperparameters, those of the server optimizer, a fresh
    server optimizer built by ``module``, and whether the optimizer's class changed.

    Args:
        checkpoint: the loaded checkpoint dict.
        module: this run's module (it builds the fresh server optimizer).
        datamodule: this run's data module, or ``None`` (its hyperparameters are then not compared).
    """
    built = config_differences("model", checkpoint.get("hyper_parameters"), module.hparams, init_defaults(module))
    if datamodule is not None and "datamodule_hyper_parameters" in checkpoint:
        saved = checkpoint["datamodule_hyper_parameters"]
        built += config_differences("data", saved, datamodule.hparams, init_defaults(datamodule))
    fresh = module.configure_optimizers()
    fresh = fresh["optimizer"] if isinstance(fresh, Mapping) else fresh
    optimizer_lines, class_changed = optimizer_differences(checkpoint, fresh)
    return built, optimizer_lines, fresh, class_changed


def resume_error(prefer: str, listing: str) -> str:
    if prefer == "checkpoint":
        return (
            "The checkpoint's module, data or server optimizer class differ from the objects this run built, and "
            f"`prefer='checkpoint'` cannot rebuild them here:\n{listing}\nBuild them from the checkpoint's "
            "hyperparameters (`checkpoint['hyper_parameters']`, `checkpoint['datamodule_hyper_parameters']`), or run "
            "`metafed fit --resume_with checkpoint`, which does."
        )
    return (
        f"This run's configuration differs from the checkpoint it resumes:\n{listing}\nChoose which wins: "
        "`--resume_with config` (this run's values; the server optimizer keeps its state) or `--resume_with checkpoint` "
        "(the checkpoint's values); in Python, `Trainer(callbacks=[lightning_metafed.ResumeCheck(prefer=...)])`."
    )
