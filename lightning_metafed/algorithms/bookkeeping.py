"""The module's Lightning hooks for its round ledgers: checkpoint state, fit start and summary, round logging."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lightning_metafed.algorithms.trainer_access import attached_trainer
from lightning_metafed.round import RoundLedgers, RoundResult

__all__ = ["CHECKPOINT_FORMAT", "CLIENT_STATE_KEY", "LedgerHooks", "RESIDUALS_KEY"]

#: Layout version of what a module adds to a checkpoint (0: written before the version was recorded;
#: formats 0 and 1 hold the same keys).
CHECKPOINT_FORMAT = 1
#: Where a per-client state store with ``state_dict``/``load_state_dict`` is kept in a checkpoint.
CLIENT_STATE_KEY = "metafed_client_state"
#: Where the compressor's error-feedback residuals are kept in a checkpoint.
RESIDUALS_KEY = "metafed_upload_residuals"


class LedgerHooks:
    """Mixin for :class:`~lightning_metafed.MetaFedModule`: its ``ledgers`` in checkpoints and on the console."""

    ledgers: RoundLedgers
    trainer: Any
    global_step: int
    log: Any

    @property
    def communication(self) -> dict[str, int]:
        """Cumulative communication (``rounds``, ``download_bytes``, ``upload_bytes``; checkpointed)."""
        return self.ledgers.communication.totals

    @property
    def fault_counts(self) -> dict[str, int]:
        """Cumulative fault and robustness counts (checkpointed)."""
        return self.ledgers.faults.totals

    def privacy_spent(self) -> float:
        """``ε`` at ``privacy.delta`` after the rounds so far (Opacus accountant); ``0`` before any."""
        if self.ledgers.privacy is None:
            raise ValueError("`privacy_spent()` needs the module's `privacy` (a ClientDP)")
        return self.ledgers.privacy.epsilon()

    def on_fit_start(self) -> None:
        ledger = self.ledgers.privacy
        if ledger is not None:
            ledger.resolve_sample_rate(self.trainer.datamodule)  # fail before the first round when q is unknown
            ledger.resolve_noise_seed(self.trainer.strategy.broadcast)  # every DDP process adds the same noise

    def _stores(self) -> dict[str, Any]:
        """The per-client stores a checkpoint holds, by checkpoint key."""
        stores = {CLIENT_STATE_KEY: getattr(self, "client_state", None), RESIDUALS_KEY: getattr(self, "upload_residuals", None)}
        return {k: s for k, s in stores.items() if s is not None and hasattr(s, "state_dict")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.update(self.ledgers.state_dict())
        for key, store in self._stores().items():
            checkpoint[key] = store.state_dict()
        checkpoint["metafed_format"] = CHECKPOINT_FORMAT

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        found = checkpoint.get("metafed_format", 0)
        if not isinstance(found, int) or found > CHECKPOINT_FORMAT:
            raise ValueError(
                f"The checkpoint was written by a newer lightning-metafed (checkpoint format {found!r}); this version "
                f"reads formats 0 to {CHECKPOINT_FORMAT}. Upgrade lightning-metafed to load it."
            )
        if self._fitting():
            self.ledgers.load_state_dict(checkpoint)
            for key, store in self._stores().items():
                if key not in checkpoint:
                    continue
                try:
                    store.load_state_dict(checkpoint[key])
                except ValueError as error:
                    raise ValueError(f"The checkpoint's {key!r} entry: {error}") from error
        # Else evaluating a checkpoint (e.g. test of the best one after fit) loads its weights only:
        # the run's communication, fault counts and privacy spent so far must not roll back.

    def _fitting(self) -> bool:
        trainer = attached_trainer(self)  # None: a plain load_from_checkpoint
        return trainer is None or trainer.state.fn == TrainerFn.FITTING

    def on_fit_end(self) -> None:
        for line in self.ledgers.summaries():
            rank_zero_info(line)

    def write_client_rows(self, result: RoundResult) -> None:
        """Store the accepted clients' new per-client state and error-feedback residuals."""
        if result.new_state is not None:
            self.client_state.write(result.new_state.client_id, result.new_state.rows)
        if result.new_residuals is not None:
            self.upload_residuals.write(result.new_residuals.client_id, result.new_residuals.rows)

    def log_round(self, result: RoundResult, m: int, logging_step: bool, optimizer: Any) -> None:
        """Log a round: ``train/meta_loss`` every round; the update norm, server learning rate and
        the ledgers' metrics at logging steps only (the logger would not write them otherwise)."""
        meta_loss = result.diagnostics.get("query_loss", result.diagnostics.get("support_loss"))
        if meta_loss is not None:
            self.log("train/meta_loss", meta_loss, on_step=True, prog_bar=True, batch_size=m)
        self.log("round", float(self.global_step), on_step=True, prog_bar=True, logger=False, batch_size=m)
        if not logging_step:
            return
        if result.aggregate is not None:
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in result.aggregate.values())).float()
            self.log("train/update_norm", norm, on_step=True, batch_size=m)
        self.log("train/server_lr", float(optimizer.param_groups[0]["lr"]), on_step=True, batch_size=m)
        for key, value in self.ledgers.metrics().items():
            self.log(key, float(value), on_step=True, batch_size=m)
