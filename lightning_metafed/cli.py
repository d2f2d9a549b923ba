"""The ``metafed`` command: LightningCLI over every algorithm and client source.

Examples::

    metafed fit --config configs/sinusoid/maml.yaml
    metafed fit --model MAML --model.net lightning_metafed.nets.MLP --data SinusoidClients
    metafed test --config configs/sinusoid/maml.yaml --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
    metafed fit --config configs/sinusoid/maml.yaml --print_config

A mistake (a bad value, an unreadable file) is reported as one paragraph; ``--debug`` (or
``METAFED_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lightning_metafed.algorithms.base import MetaFedModule
from lightning_metafed.checkpoint import AtomicCheckpointIO
from lightning_metafed.cli_errors import debug_requested, report
from lightning_metafed.cli_resume import checkpoint_config
from lightning_metafed.data.datamodule import FederatedDataModule
from lightning_metafed.files import load_torch_file
from lightning_metafed.resume import ResumeCheck, resume_differences

__all__ = ["MetaFedCLI", "build_cli", "main"]


class MetaFedCLI(LightningCLI):
    """LightningCLI with our defaults: seeded runs, TensorBoard logs under ``lightning_logs/``, a
    checkpoint callback keeping ``last.ckpt`` and the best ``val/loss_post``, checkpoints written
    atomically (:class:`~lightning_metafed.checkpoint.AtomicCheckpointIO`, unless another checkpoint
    plugin is given), and (``fit`` only) a test of the best checkpoint on the held-out clients when
    training ends. ``validate``/``test``/``predict`` need ``--ckpt_path`` (or ``--allow_untrained
    true``); a resumed ``fit`` whose configuration differs from its checkpoint stops and lists the
    differences unless ``--resume_with config`` or ``--resume_with checkpoint`` says which wins."""

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # `--trainer.enable_checkpointing=false` turns our checkpoint callback off instead of clashing with it.
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        callbacks = [*callbacks, ResumeCheck(self._subcommand_config().get("resume_with", "error"))]
        return super()._instantiate_trainer(config, callbacks)

    def _subcommand_config(self) -> Any:
        return self.config.get(self.subcommand, self.config) if self.subcommand else self.config

    def _parse_ckpt_path(self) -> None:
        # LightningCLI merges a checkpoint's module hyperparameters into the config. Evaluation keeps
        # that (the module is rebuilt as it was trained); a resumed fit does not: ResumeCheck compares
        # the two and `--resume_with` decides. An unreadable checkpoint is named either way.
        if self.config.get("subcommand") == "fit":
            return
        try:
            super()._parse_ckpt_path()
        except Exception:
            path = self.config[self.config.subcommand].get("ckpt_path")
            if path and os.path.isfile(path):
                load_torch_file(path, "checkpoint", weights_only=True, map_location="cpu")  # raises the clear error
            raise

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        if self.subcommand == "fit" and config.get("ckpt_path") and config.get("resume_with") == "checkpoint":
            checkpoint_config(config, config["ckpt_path"])

    def before_fit(self) -> None:
        # A resume whose configuration differs stops here, before the run writes its log directory.
        config = self._subcommand_config()
        if config.get("ckpt_path") and config.get("resume_with", "error") == "error" and os.path.isfile(config["ckpt_path"]):
            checkpoint = AtomicCheckpointIO().load_checkpoint(config["ckpt_path"], map_location="cpu", weights_only=False)
            ResumeCheck("error").apply(checkpoint, *resume_differences(checkpoint, self.model, self.datamodule))

    def _refuse_untrained(self) -> None:
        config = self._subcommand_config()
        if config.get("ckpt_path") is None and not config.get("allow_untrained", False):
            raise ValueError(
                f"`metafed {self.subcommand}` needs `--ckpt_path`: without it the freshly initialised model (random "
                "meta-parameters) would be evaluated. Pass --ckpt_path PATH (e.g. "
                "lightning_logs/version_0/checkpoints/last.ckpt), or --allow_untrained true to evaluate the initialisation"
            )

    def before_validate(self) -> None:
        self._refuse_untrained()

    def before_test(self) -> None:
        self._refuse_untrained()

    def before_predict(self) -> None:
        self._refuse_untrained()

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
        parser.add_argument(
            "--resume_with",
            type=Literal["error", "config", "checkpoint"],
            default="error",
            help="fit --ckpt_path only: when this run's configuration differs from the checkpoint's, stop and "
            "list the differences (error), or let this run's values (config) or the checkpoint's (checkpoint) win",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="validate/test/predict: evaluate the model as configured when no --ckpt_path is given",
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
    """The CLI over every algorithm and client source (``args`` as for LightningCLI).

    Args:
        args: the command-line arguments (a list of strings, a dict or a namespace; ``None`` reads ``sys.argv``).
        run: run the subcommand (``True``) or only parse and instantiate the classes (``False``).
    """
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
    """Entry point of the ``metafed`` console script: a mistake is printed as one paragraph and
    exits with status 2 (``--debug`` or ``METAFED_DEBUG=1``: the full traceback).

    Args:
        args: the command-line arguments (a list of strings, a dict or a namespace; ``None`` reads ``sys.argv``).
    """
    if args is None:  # LightningCLI reads sys.argv itself; it must not see --debug
        debug, rest = debug_requested(sys.argv[1:])
        sys.argv[1:] = rest
    elif isinstance(args, (list, tuple)):
        debug, args = debug_requested(list(args))
    else:  # a dict or namespace of arguments
        debug, _ = debug_requested([])
    try:
        build_cli(args)
    except Exception as error:  # noqa: BLE001 - report() re-raises what is not a user error
        if debug:
            raise
        sys.exit(report(error))
    finally:
        # A DDP run leaves its process group open; tearing it down before exit keeps the gloo
        # threads from aborting the interpreter at shutdown.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    main()
