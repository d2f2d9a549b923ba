"""What a module reads of its Trainer, through public Lightning APIs only."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_metafed.round import World

__all__ = ["attached_trainer", "count_step_without_update", "grad_scaler", "is_logging_step", "round_sizes", "round_world"]


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The module's Trainer, or ``None`` when it is used on its own."""
    try:
        return module.trainer
    except RuntimeError:  # not attached to a Trainer
        return None


def round_world(module: pl.LightningModule) -> World:
    """The processes sharing a round: the Trainer's world under DDP, else one process."""
    trainer = attached_trainer(module)
    if trainer is None or trainer.world_size == 1:
        return World()

    def reduce_sum(tensor: Any) -> Any:
        return trainer.strategy.reduce(tensor, reduce_op="sum")

    return World(trainer.world_size, trainer.global_rank, module.all_gather, reduce_sum)


def is_logging_step(trainer: pl.Trainer | None) -> bool:
    """Whether the logger writes this round's values (every ``log_every_n_steps`` rounds and the last)."""
    if trainer is None or trainer.logger is None or trainer.log_every_n_steps == 0:
        return False
    # One optimizer step per round, so the step about to be taken is `global_step + 1`.
    return (trainer.global_step + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop


def grad_scaler(trainer: pl.Trainer | None) -> Any:
    """The mixed-precision gradient scaler (``torch.amp.GradScaler``) of ``precision="16-mixed"``, or
    ``None``. It divides ``.grad`` by its scale in the optimizer step, so the server step writes
    ``scaler.scale(aggregate)``; the fast path's backward runs on the loss times that scale."""
    return None if trainer is None else getattr(trainer.precision_plugin, "scaler", None)


def count_step_without_update(optimizer: Any) -> None:
    """A round without an update that still counts as one optimizer step (the round index is the
    step count). Under a gradient scaler ``optimizer.step()`` would fail without gradients, so only
    Lightning's step hooks run (they count manual optimization steps); a plain optimizer steps with
    no gradients, which leaves its parameters and state alone."""
    optimizer.zero_grad(set_to_none=True)
    before, after = getattr(optimizer, "_on_before_step", None), getattr(optimizer, "_on_after_step", None)
    if before is None or after is None:
        optimizer.step()
        return
    before()
    after()


def round_sizes(trainer: pl.Trainer | None, sampled: int | None, population: int | None, needed_by: str) -> tuple[int, int]:
    """``(|S|, N)``: clients sampled per round and train clients, from the Trainer's data module when
    it has them (``sampled`` and ``population``, when given, must agree with it), else as given."""
    datamodule = None if trainer is None else getattr(trainer, "datamodule", None)
    if not (hasattr(datamodule, "clients_per_round") and hasattr(datamodule, "population")):
        datamodule = None
    known = {"sampled_per_round": sampled, "population": population}
    if datamodule is not None:
        found = {"sampled_per_round": datamodule.clients_per_round, "population": len(datamodule.population("train"))}
        for name, value in found.items():
            if known[name] is not None and known[name] != value:
                raise ValueError(f"Expected `{name}` = {value} (the data module's), got {known[name]}")
        known = found
    missing = [name for name, value in known.items() if value is None]
    if missing:
        raise ValueError(
            f"{needed_by} needs {' and '.join(f'`{n}`' for n in missing)}: pass them, or fit with a "
            "FederatedDataModule that has them"
        )
    return known["sampled_per_round"], known["population"]
