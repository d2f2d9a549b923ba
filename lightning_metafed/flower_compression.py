"""Compressed uploads on Flower: the module's ``compressor`` applied to what crosses the wire.

A client encodes its update exactly as in a simulated round (the same pure function of the
compressor's seed, the round and the client's global id, with its error-feedback residual added)
and sends, under each parameter's name, the encoding's bytes (one ``uint8`` array: values, indices,
scales) instead of the full-precision values, so Flower's message shrinks by the compression ratio
(its per-array overhead, about 130 bytes, is the same as before). The server knows each
encoding's layout from the parameter's shape and the compressor, and decodes before screening and
aggregation. The residual stays on
the client: in the module's residual store while the process lives, and in the SuperNode's
``context.state`` (record :data:`RESIDUAL_RECORD`, never sent) between messages.

Secure aggregation sums dense masked vectors, so it cannot carry sparse or scaled encodings; a
compressor under ``secure-aggregation`` is refused (see :mod:`lightning_metafed.flower_secure`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from lightning_metafed.compression import Compressor
from lightning_metafed.functional.aggregate import finite_clients
from lightning_metafed.round import compress_uploads

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import RecordDict

    from lightning_metafed.algorithms.base import MetaFedModule
    from lightning_metafed.data.task_batch import TaskBatch
    from lightning_metafed.functional.client_task import Params

__all__ = ["RESIDUAL_RECORD", "decode_arrays", "encode_upload", "keep_residual", "restore_residual"]

RESIDUAL_RECORD = "metafed-upload-residual"
"""The key of a client's error-feedback residual in its SuperNode's ``context.state``."""


def encode_upload(model: MetaFedModule, batch: TaskBatch, updates: Params, round_idx: int) -> dict[str, torch.Tensor]:
    """The arrays client ``batch.client_id[0]`` sends for its update ``{name: [1, *shape]}``: under
    each parameter's name, its encoding's parts (in sorted part order) as one ``uint8`` array. With
    error feedback the client's residual is read from the module's store and, when the update is
    finite (the server keeps it), the new one written."""
    store = model.upload_residuals
    residual = None if store is None else store.gather_like(batch.client_id, updates)
    encoded, _, kept = compress_uploads(model.compressor, updates, round_idx, batch.client_id, residual)
    if kept is not None and bool(finite_clients(updates).all()):
        store.write(batch.client_id, kept)
    return {name: torch.cat([_bytes(parts[p][0]) for p in sorted(parts)]) for name, parts in encoded.items()}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def decode_arrays(compressor: Compressor, arrays: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor]) -> Params:
    """The update ``{name: tensor}`` held by a client's encoded ``arrays`` (``parameters``: the server's
    meta-parameters, which give each uploaded parameter's shape and dtype, hence its encoding's layout)."""
    unknown = sorted(set(arrays) - set(parameters))
    if unknown:
        raise ValueError(f"Expected the upload's arrays to be named after parameters of the model, got {unknown}")
    like = {name: parameters[name].detach().cpu().unsqueeze(0) for name in arrays}
    layout = _layout(compressor, tuple((k, tuple(v.shape), v.dtype) for k, v in like.items()))
    encoded: dict[str, dict[str, torch.Tensor]] = {}
    for name, buffer in arrays.items():
        parts, expected = layout[name], sum(t.numel() * t.element_size() for t in layout[name].values())
        if buffer.dtype != torch.uint8 or buffer.numel() != expected:
            raise ValueError(
                f"Expected the upload of {name!r} to be {expected} bytes (uint8), the encoding of {compressor!r}, got "
                f"{buffer.numel()} values of {buffer.dtype}; do the clients load the same config as the server?"
            )
        encoded[name], offset = {}, 0
        for part in sorted(parts):
            size = parts[part].numel() * parts[part].element_size()
            encoded[name][part] = buffer[offset : offset + size].clone().view(parts[part].dtype).reshape(parts[part].shape)
            offset += size
    return {name: value[0] for name, value in compressor.decode_all(encoded, like).items()}


@lru_cache(maxsize=8)
def _layout(compressor: Compressor, shapes: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Each parameter's encoding parts (names, dtypes, shapes) for one client: an encoding of zeros."""
    return compressor.encode_all({k: torch.zeros(shape, dtype=dtype) for k, shape, dtype in shapes}, 0, [0])


def restore_residual(model: MetaFedModule, key: Any, state: RecordDict) -> None:
    """Write the client's residual kept in ``state`` (its SuperNode's ``context.state``) into the module's store."""
    if model.upload_residuals is None or RESIDUAL_RECORD not in state:
        return
    row = state[RESIDUAL_RECORD].to_torch_state_dict()
    model.upload_residuals.like = {k: v for k, v in row.items()}
    model.upload_residuals.write([key], {k: v.unsqueeze(0) for k, v in row.items()})


def keep_residual(model: MetaFedModule, key: Any, state: RecordDict) -> None:
    """Keep the client's residual (if it has one) in ``state``, where the SuperNode holds it between messages."""
    store = model.upload_residuals
    if store is None or key not in store.rows:
        return
    from flwr.app import ArrayRecord

    state[RESIDUAL_RECORD] = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in store.rows[key].items()})
