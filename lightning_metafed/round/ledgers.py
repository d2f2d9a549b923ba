"""Bookkeeping across rounds: communication, faults and robustness, privacy spent.

Each ledger records :class:`~lightning_metafed.round.pipeline.RoundResult` values, owns its logged
metric names, its console summary and its checkpoint state (``state_dict``/``load_state_dict``,
under its own checkpoint key). :class:`RoundLedgers` holds the ones a module needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from lightning_metafed.faults import ClientFaults
from lightning_metafed.privacy import ClientDP
from lightning_metafed.round.pipeline import RoundCounts, RoundResult

__all__ = ["CommunicationMeter", "CountingLedger", "FaultLedger", "PrivacyLedger", "RoundLedgers"]


class CountingLedger:
    """A ledger whose checkpoint state is its ``totals`` (named integer counts)."""

    totals: dict[str, int]

    def state_dict(self) -> dict[str, int]:
        return dict(self.totals)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.totals = {**self.totals, **state}


class CommunicationMeter(CountingLedger):
    """Bytes that crossed the client/server line: every sampled client downloads the parameters,
    every surviving client uploads its update. Logged as ``comm/*``."""

    key = "metafed_communication"

    def __init__(self) -> None:
        self.totals = {"rounds": 0, "download_bytes": 0, "upload_bytes": 0}
        #: The last recorded round's numbers (empty before one); not checkpointed.
        self.last: dict[str, int] = {}

    def record(self, result: RoundResult) -> None:
        down = result.counts.sampled * result.download_bytes
        up = result.counts.survivors * result.upload_bytes
        self.totals["rounds"] += 1
        self.totals["download_bytes"] += down
        self.totals["upload_bytes"] += up
        self.last = {
            "download_bytes": down,
            "upload_bytes": up,
            "download_bytes_per_client": result.download_bytes,
            "upload_bytes_per_client": result.upload_bytes,
            "total_download_bytes": self.totals["download_bytes"],
            "total_upload_bytes": self.totals["upload_bytes"],
        }

    def metrics(self) -> dict[str, float]:
        return {f"comm/{k}": float(v) for k, v in self.last.items()}

    def summary(self) -> str | None:
        c = self.totals
        if not c["rounds"]:
            return None
        last = self.last  # empty when a resumed fit had no rounds left to run
        per_client = (
            f" (per client per round: {last['download_bytes_per_client'] / 1e3:.2f} kB down, "
            f"{last['upload_bytes_per_client'] / 1e3:.2f} kB up)"
            if last
            else ""
        )
        return (
            f"Communication over {c['rounds']} rounds: {c['download_bytes'] / 1e6:.3f} MB downloaded, "
            f"{c['upload_bytes'] / 1e6:.3f} MB uploaded{per_client}"
        )


class FaultLedger(CountingLedger):
    """Dropouts, Byzantine uploads, rejected (non-finite) uploads and skipped rounds, this round
    and in total. Logged as ``faults/*`` (with ``faults``) and ``robust/*`` (with rejection).

    Args:
        faults: the module's simulated faults (``None``: none; the ``faults/*`` metrics are then not logged).
        reject_nonfinite: whether non-finite uploads are rejected (then ``robust/*`` is logged).
    """

    key = "metafed_faults"

    def __init__(self, faults: ClientFaults | None = None, reject_nonfinite: bool = True):
        self.faults = faults
        self.reject_nonfinite = reject_nonfinite
        self.totals = {"dropped_clients": 0, "byzantine_uploads": 0, "rejected_uploads": 0, "skipped_rounds": 0}
        self.last = RoundCounts(0, 0)

    def record(self, result: RoundResult) -> None:
        counts = self.last = result.counts
        self.totals["dropped_clients"] += counts.dropped
        self.totals["byzantine_uploads"] += counts.byzantine
        self.totals["rejected_uploads"] += counts.rejected
        self.totals["skipped_rounds"] += int(result.aggregate is None)

    def record_nonfinite(self) -> int:
        """Count a round skipped because it was not finite (``on_nonfinite="skip"``); returns the total.
        The key exists once such a round happened, so earlier checkpoints read back unchanged."""
        self.totals["nonfinite_rounds"] = self.totals.get("nonfinite_rounds", 0) + 1
        return self.totals["nonfinite_rounds"]

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        last, totals = self.last, self.totals
        if self.faults is not None:
            out["faults/dropped"] = last.dropped
            out["faults/dropped_total"] = totals["dropped_clients"]
            out["faults/skipped_rounds"] = totals["skipped_rounds"]
            if self.faults.byzantine_fraction > 0:
                out["faults/byzantine"] = last.byzantine
                out["faults/byzantine_total"] = totals["byzantine_uploads"]
        if self.reject_nonfinite:
            out["robust/rejected"] = last.rejected
            out["robust/rejected_total"] = totals["rejected_uploads"]
        if "nonfinite_rounds" in totals:
            out["robust/nonfinite_rounds"] = totals["nonfinite_rounds"]
        return out

    def summary(self) -> str | None:
        f = self.totals
        if self.faults is None and not any(f.values()):
            return None
        return (
            f"Faults: {f['dropped_clients']} client dropouts, {f['skipped_rounds']} rounds skipped, "
            f"{f['byzantine_uploads']} Byzantine uploads, {f['rejected_uploads']} non-finite uploads rejected"
            + (f", {f['nonfinite_rounds']} non-finite rounds skipped" if "nonfinite_rounds" in f else "")
        )


class PrivacyLedger:
    """The privacy spent by client-level DP (an Opacus accountant, one step per round, skipped
    rounds included), the sampling rate ``q`` and the fit's noise seed. Logged as ``privacy/*``.

    Under adaptive clipping it also holds the current clip norm (``clip_norm``; checkpointed, logged
    as ``privacy/clip_norm``). The checkpoint holds the accountant's history (and that clip norm)
    only: a drawn noise seed is never written anywhere, or whoever reads the checkpoint could
    regenerate and subtract the noise.

    Args:
        privacy: the module's client-level DP, whose accountant, sampling rate and clip norm it tracks.
    """

    key = "metafed_privacy"

    def __init__(self, privacy: ClientDP):
        self.privacy = privacy
        self.accountant = privacy.make_accountant()
        self.sample_rate: float | None = privacy.sample_rate
        self.noise_seed: int | None = None
        self.last_clipped = 0
        #: This round's clip norm, ``privacy.clip_norm`` at first, then (adaptive clipping) the last round's update.
        self.clip_norm = privacy.clip_norm

    def resolve_noise_seed(self, broadcast: Callable[[int], int] | None = None) -> int:
        """Draw the fit's noise seed (``broadcast`` makes every DDP process use rank 0's)."""
        seed = self.privacy.resolve_seed()
        self.noise_seed = int(broadcast(seed)) if broadcast is not None else seed
        return self.noise_seed

    def seed(self) -> int:
        return self.noise_seed if self.noise_seed is not None else self.resolve_noise_seed()

    def resolve_sample_rate(self, datamodule: Any) -> float:
        """``q``: ``privacy.sample_rate``, else clients per round / train clients of ``datamodule``."""
        if self.sample_rate is not None:
            per_round = getattr(datamodule, "clients_per_round", None)
            if per_round is not None:
                self.privacy.sum_noise_multiplier(per_round)  # adaptive clipping: σ_b must leave noise for the sum
            return self.sample_rate
        from lightning_metafed.data.datamodule import FederatedDataModule

        if not isinstance(datamodule, FederatedDataModule):
            raise ValueError(
                "`privacy` needs the client sampling rate: pass ClientDP(sample_rate=...) or fit with a "
                f"lightning_metafed FederatedDataModule, got {type(datamodule).__name__}"
            )
        if datamodule.client_sampling != "uniform":
            raise ValueError(
                f"`privacy` assumes uniform client sampling; the datamodule has client_sampling={datamodule.client_sampling!r}"
            )
        self.privacy.sum_noise_multiplier(datamodule.clients_per_round)  # adaptive clipping: σ_b must leave noise for the sum
        self.sample_rate = datamodule.clients_per_round / len(datamodule.population("train"))
        return self.sample_rate

    def record(self, result: RoundResult) -> None:
        # Every round counts, skipped ones included (conservative: skipping depends on no data).
        self.count_round()
        self.last_clipped = result.counts.clipped
        if result.counts.next_clip_norm is not None:
            self.clip_norm = result.counts.next_clip_norm

    def count_round(self) -> None:
        """One more round spent (also a round skipped because it was not finite: it used the data)."""
        self.accountant.step(noise_multiplier=self.privacy.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self) -> float:
        """``ε`` at ``privacy.delta`` after the rounds so far; ``0`` before any."""
        if not self.accountant.history:
            return 0.0
        if self.privacy.noise_multiplier == 0:  # no noise, no privacy (the PRV accountant cannot say so itself)
            return math.inf
        return float(self.accountant.get_epsilon(delta=self.privacy.delta))

    def metrics(self) -> dict[str, float]:
        out = {"privacy/epsilon": self.epsilon(), "privacy/clipped": self.last_clipped}
        if self.privacy.adaptive:
            out["privacy/clip_norm"] = self.clip_norm
        return out

    def summary(self) -> str | None:
        if not self.accountant.history:
            return None
        p = self.privacy
        return (
            f"Privacy: client-level ({self.epsilon():.3g}, {p.delta:g})-DP after {sum(h[-1] for h in self.accountant.history)} "
            f"rounds ({p.accountant.upper()} accountant, sampling rate q={self.sample_rate:.4g}, noise multiplier "
            f"{p.noise_multiplier:g}, {self._clip_words()})"
        )

    def _clip_words(self) -> str:
        p = self.privacy
        if not p.adaptive:
            return f"clip norm {p.clip_norm:g}"
        return f"adaptive clip norm {p.clip_norm:g} → {self.clip_norm:.4g}, target quantile {p.target_quantile:g}"

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"accountant": self.accountant.state_dict()}
        if self.privacy.adaptive:
            state["clip_norm"] = self.clip_norm
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        # A fixed-clipping config resumed from an adaptive checkpoint clips at its own, configured norm.
        self.clip_norm = state.get("clip_norm", self.privacy.clip_norm) if self.privacy.adaptive else self.privacy.clip_norm


class RoundLedgers:
    """The ledgers of one module: communication and faults always, privacy under ``privacy``.

    Args:
        faults: the module's simulated faults (``None``: none).
        reject_nonfinite: whether non-finite uploads are rejected.
        privacy: the module's client-level DP (``None``: no privacy ledger).
    """

    def __init__(self, faults: ClientFaults | None, reject_nonfinite: bool, privacy: ClientDP | None):
        self.communication = CommunicationMeter()
        self.faults = FaultLedger(faults, reject_nonfinite)
        self.privacy = None if privacy is None else PrivacyLedger(privacy)

    def all(self) -> list[Any]:
        return [x for x in (self.communication, self.faults, self.privacy) if x is not None]

    def record(self, result: RoundResult) -> None:
        for ledger in self.all():
            ledger.record(result)

    def record_nonfinite(self, result: RoundResult | None) -> int:
        """A round skipped because it was not finite: its result (``None`` when the uploads failed)
        is recorded, or else the privacy it spent; returns the number of such rounds."""
        if result is not None:
            self.record(result)
        elif self.privacy is not None:
            self.privacy.count_round()
        return self.faults.record_nonfinite()

    def metrics(self) -> dict[str, float]:
        return {k: v for ledger in self.all() for k, v in ledger.metrics().items()}

    def summaries(self) -> list[str]:
        return [s for s in (ledger.summary() for ledger in self.all()) if s is not None]

    def state_dict(self) -> dict[str, Any]:
        """``{checkpoint key: state}`` of every ledger."""
        return {ledger.key: ledger.state_dict() for ledger in self.all()}

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore every ledger whose key is in ``checkpoint`` (older checkpoints may lack some)."""
        for ledger in self.all():
            if ledger.key in checkpoint:
                ledger.load_state_dict(checkpoint[ledger.key])
