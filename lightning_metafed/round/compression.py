"""The compression stage of a round: clients encode their uploads, the server decodes them.

:class:`UploadCompression` sits between the client computation and the server's screening. Each
client adds the residual it kept (error feedback), encodes, and keeps what the encoding lost; the
server decodes; the uploads' size becomes the encoded size. A client whose upload holds NaN/inf
sends NaN (so the screen still rejects it) and keeps its old residual. The residuals live in a
:class:`ResidualStore` (a client-state store: rows by client id, zero for a client never seen),
which the round's owner writes back for the accepted clients, as for any per-client state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from lightning_metafed.compression import Compressor, encoded_bytes
from lightning_metafed.functional.aggregate import finite_clients
from lightning_metafed.functional.client_task import Params
from lightning_metafed.round.computation import Uploads
from lightning_metafed.round.state import InMemoryClientState, client_keys

__all__ = ["ResidualStore", "UploadCompression", "compress_uploads"]


class ResidualStore(InMemoryClientState):
    """Error-feedback residuals by client id: a client never seen has zeros shaped like the uploads
    (:meth:`gather_like`). Checkpointed like any in-memory client-state store."""

    def __init__(self) -> None:
        super().__init__(self._zeros)
        self.like: dict[str, Tensor] | None = None

    def _zeros(self, key: Any) -> Params:
        if self.like is None:
            raise ValueError("The residual store has no upload layout yet: call gather_like first")
        return {k: torch.zeros_like(v) for k, v in self.like.items()}

    def gather_like(self, client_id: Any, uploads: Mapping[str, Tensor]) -> Params:
        """The clients' residuals ``{name: [m, *shape]}`` for uploads shaped as ``uploads``, on their
        device and in their dtype (rows read back from a checkpoint may sit on another device)."""
        self.like = {k: torch.zeros_like(v[0]) for k, v in uploads.items()}
        rows = [self.rows.get(k) or self._zeros(k) for k in client_keys(client_id)]
        expected = {k: tuple(v.shape[1:]) for k, v in uploads.items()}
        for row in rows:
            if {k: tuple(v.shape) for k, v in row.items()} != expected:
                found = {k: tuple(v.shape) for k, v in row.items()}
                raise ValueError(f"Stored error-feedback residuals {found} do not match the uploads {expected}; was the net changed?")
        return {k: torch.stack([r[k].to(u.device, u.dtype) for r in rows]) for k, u in uploads.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``{"rows": {client key: {name: tensor}}}``; the rows must share names and shapes."""
        rows = state.get("rows") if isinstance(state, Mapping) else None
        if not isinstance(rows, Mapping):
            raise ValueError(f"Expected the residuals as {{'rows': {{client: {{name: tensor}}}}}}, got {type(state).__name__} without a 'rows' mapping")
        for key, row in rows.items():
            if not isinstance(row, Mapping) or not all(isinstance(t, Tensor) for t in row.values()):
                raise ValueError(f"Expected client {key!r}'s residual to be {{name: tensor}}, got {type(row).__name__}: {row!r:.80}")
        layouts = {tuple(sorted((k, tuple(t.shape)) for k, t in r.items())) for r in rows.values()}
        if len(layouts) > 1:
            raise ValueError(f"Expected every client's residual to have the same names and shapes, got {sorted(layouts)}")
        self.rows = {k: dict(r) for k, r in rows.items()}
        self.like = dict(next(iter(self.rows.values()))) if self.rows else None


def compress_uploads(
    compressor: Compressor, updates: Mapping[str, Tensor], round_idx: int, client_id: Any, residual: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, dict[str, Tensor]], Params, Params | None]:
    """The clients' side and the server's side of compression for ``updates`` ``{name: [m, *shape]}``:
    ``(encoded, decoded, new residual)``. With ``residual`` the clients encode ``u + e`` and keep
    ``u + e − decoded`` (``None`` without). Rows of non-finite clients decode to NaN and keep ``e``.

    Args:
        compressor: the compressor the clients encode with.
        updates: the clients' uploads ``{name: [m, *shape]}``.
        round_idx: the round (the compressor's randomness is a pure function of it).
        client_id: the clients' ids, which seed their random streams (``None``: row positions).
        residual: the clients' error-feedback residuals ``e``, shaped like ``updates`` (``None``: no
            error feedback).
    """
    sent = dict(updates) if residual is None else {k: u + residual[k] for k, u in updates.items()}
    encoded = compressor.encode_all(sent, round_idx, client_id)
    decoded = compressor.decode_all(encoded, sent)
    finite = finite_clients(sent) & finite_clients(decoded)
    rows = lambda v: finite.reshape(-1, *[1] * (v.dim() - 1))  # noqa: E731
    if not bool(finite.all()):
        decoded = {k: v.masked_fill(~rows(v), float("nan")) for k, v in decoded.items()}
    # A client whose upload is not finite keeps its old residual (even if a robust rule accepts it).
    kept = None if residual is None else {k: torch.where(rows(v), sent[k] - v, residual[k]) for k, v in decoded.items()}
    return encoded, decoded, kept


@dataclass(frozen=True)
class UploadCompression:
    """The round's compression: ``compressor`` and, with its error feedback, the ``residuals`` store."""

    compressor: Compressor
    residuals: ResidualStore | None = None

    def __call__(self, uploads: Uploads, round_idx: int) -> Uploads:
        residual = None
        if self.residuals is not None:
            if uploads.client_id is None:
                raise ValueError(
                    f"`compressor` = {self.compressor!r} keeps an error-feedback residual per client, which needs the "
                    "clients' ids: expected `client_id` in the TaskBatch, got None; set error_feedback=False or give ids"
                )
            residual = self.residuals.gather_like(uploads.client_id, uploads.updates)
        encoded, decoded, kept = compress_uploads(self.compressor, uploads.updates, round_idx, uploads.client_id, residual)
        return replace(uploads, updates=decoded, bytes_per_client=encoded_bytes(encoded), residual=kept)
