"""What a module reads of its Trainer, through public Lightning APIs only."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_metafed.round import World

__all__ = ["attached_trainer", "grad_scale", "is_logging_step", "round_world"]


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


def grad_scale(trainer: pl.Trainer) -> float:
    """The loss scale of a mixed-precision gradient scaler (``1`` without one): the scaler divides
    ``.grad`` by it in the optimizer step, so the server step multiplies the aggregate by it first."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0
