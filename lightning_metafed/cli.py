"""The ``metafed`` command: LightningCLI over every algorithm and client source.

Examples::

    metafed fit --config configs/sinusoid/maml.yaml
    metafed fit --model MAML --model.net lightning_metafed.nets.MLP --data SinusoidClients
    metafed test --config configs/sinusoid/maml.yaml --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
    metafed fit --config configs/sinusoid/maml.yaml --print_config
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lightning_metafed.algorithms.base import MetaFedModule
from lightning_metafed.checkpoint import AtomicCheckpointIO
from lightning_metafed.data.datamodule import FederatedDataModule

__all__ = ["MetaFedCLI", "build_cli", "main"]


class MetaFedCLI(LightningCLI):
    """LightningCLI with our defaults: seeded runs, TensorBoard logs under ``lightning_logs/``, a
    checkpoint callback keeping ``last.ckpt`` and the best ``val/loss_post``, checkpoints written
    atomically (:class:`~lightning_metafed.checkpoint.AtomicCheckpointIO`, unless another checkpoint
    plugin is given), and (``fit`` only) a test of the best checkpoint on the held-out clients when
    training ends."""

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # `--trainer.enable_checkpointing=false` turns our checkpoint callback off instead of clashing with it.
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default writer
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss_post",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "round{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="fit only: evaluate the best checkpoint on the test clients when training ends",
        )

    def after_fit(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        trainer = self.trainer
        if config.get("test_after_fit", True) and not trainer.interrupted and trainer.datamodule is not None:
            has_best = bool(getattr(trainer.checkpoint_callback, "best_model_path", ""))
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)
        log_dir = trainer.log_dir  # on every process: it is a collective under DDP
        if log_dir is not None:
            rank_zero_info(f"Logs and checkpoints: {log_dir}  (view with: tensorboard --logdir {log_dir})")


def build_cli(args: Any = None, run: bool = True) -> MetaFedCLI:
    """The CLI over every algorithm and client source (``args`` as for LightningCLI)."""
    return MetaFedCLI(
        MetaFedModule,
        FederatedDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: Any = None) -> None:
    """Entry point of the ``metafed`` console script."""
    try:
        build_cli(args)
    finally:
        # A DDP run leaves its process group open; tearing it down before exit keeps the gloo
        # threads from aborting the interpreter at shutdown.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    main()
