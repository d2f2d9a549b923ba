"""Compressed uploads: what a client sends instead of its full-precision update.

Pass one as the module argument ``compressor`` (YAML: ``class_path: lightning_metafed.compression.TopK``).
In each round every client encodes its upload (plus, with error feedback, the residual it kept from
the last round it joined), the server decodes the encodings and aggregates the decoded updates; the
communication meter (``comm/upload_bytes``) counts the **encoded** bytes (values, indices, scales).
Each parameter tensor is compressed on its own (its own norm, scale or ``k``).

=================  =========  ==========  ==========================================================
compressor         unbiased   error fb.   bytes per parameter of ``n`` float32 values
=================  =========  ==========  ==========================================================
``BF16``           no         optional    ``2n``
``QSGD(s)``        yes        no          ``4 + ⌈n·⌈log₂(2s+1)⌉/8⌉`` (``s = 1``: 2 bits a value)
``TopK(f)``        no         default on  ``k·(4 + index)``, ``k = ⌈f·n⌉``, index 2 bytes up to 32,768 values
``RandK(f)``       yes        no          as ``TopK``
``SignSGD``        no         default on  ``4 + ⌈n/8⌉``
=================  =========  ==========  ==========================================================

Randomness (QSGD's rounding, RandK's coordinates) is a pure function of ``(seed, round, client id,
parameter)``, so a resumed or DDP run draws the same. The math lives in
``lightning_metafed.functional.compress``; error feedback (Stich et al., 2018; Karimireddy et al.,
2019: upload ``C(u + e)``, keep ``e ← u + e − C(u + e)``) is applied by the round
(:class:`lightning_metafed.round.UploadCompression`), which keeps ``e`` per client in a client-state store.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_metafed._validation import ConfigObject, check_int, check_range
from lightning_metafed.communication import payload_bytes
from lightning_metafed.data.seeding import COMPRESS, finish, hash_state, unit_tensor
from lightning_metafed.functional import compress as F

__all__ = ["BF16", "QSGD", "Compressor", "RandK", "SignSGD", "TopK", "client_numbers", "encoded_bytes", "round_uniforms"]

Encoded = dict[str, dict[str, Tensor]]


def client_numbers(client_id: Any, m: int) -> Tensor:
    """The round's clients as ``[m]`` int64 keys for seeding: integer ids as they are, other ids (e.g.
    LEAF's user names) by a stable hash, and row positions when the batch has no ids.

    Args:
        client_id: the batch's client ids (a tensor, a list of ints or strings), or ``None``.
        m: the number of clients in the round.
    """
    if client_id is None:
        return torch.arange(m)
    if isinstance(client_id, Tensor):
        return client_id.detach().cpu().long().reshape(m)
    keys = [int(c) if isinstance(c, numbers.Integral) else int.from_bytes(hashlib.blake2b(str(c).encode(), digest_size=7).digest(), "little") for c in client_id]
    return torch.tensor(keys, dtype=torch.long)


def round_uniforms(seed: int, round_idx: int, clients: Tensor, parameter: int, n: int) -> Tensor:
    """``[m, n]`` float64 numbers in ``[0, 1)``: a pure function of ``(seed, round, client, parameter, j)``.

    Args:
        seed: the compressor's seed.
        round_idx: the round.
        clients: ``[m]`` int64 client keys (:func:`client_numbers`).
        parameter: the parameter's position in sorted-name order (its own random stream).
        n: how many numbers per client (the parameter's size).
    """
    state = hash_state(seed, COMPRESS, round_idx, clients.reshape(-1, 1), parameter, torch.arange(n).reshape(1, -1))
    return unit_tensor(finish(state))


class Compressor(ConfigObject):
    """Base class: ``encode`` / ``decode`` one parameter's ``[m, n]`` uploads (see the subclasses)."""

    #: ``E[decode(encode(x))] = x`` over the compressor's randomness.
    unbiased: bool = False
    #: Draws random numbers (then ``encode`` takes ``uniform``).
    random: bool = False
    error_feedback: bool = False
    seed: int = 0

    def encode(self, x: Tensor, uniform: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def decode(self, encoding: Mapping[str, Tensor], n: int, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def encode_all(self, updates: Mapping[str, Tensor], round_idx: int, client_id: Any) -> Encoded:
        """Every parameter's encoding ``{name: {part: [m, ...]}}`` of the uploads ``{name: [m, *shape]}``
        (parameters in sorted-name order number the random streams)."""
        m = next(iter(updates.values())).shape[0]
        clients = client_numbers(client_id, m) if self.random else None
        out = {}
        for index, name in enumerate(sorted(updates)):
            x = updates[name].reshape(m, -1)
            uniform = None
            if self.random:  # float64 draws (float32 on Apple's MPS, which has no float64)
                uniform = round_uniforms(self.seed, round_idx, clients, index, x.shape[1])
                uniform = uniform.to(torch.float32 if x.device.type == "mps" else torch.float64).to(x.device)
            out[name] = self.encode(x, uniform)
        return out

    def decode_all(self, encoded: Mapping[str, Mapping[str, Tensor]], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The decoded uploads, shaped and typed as ``like`` (``{name: [m, *shape]}``)."""
        return {name: self.decode(encoded[name], ref[0].numel(), ref.dtype).reshape(ref.shape) for name, ref in like.items()}


def encoded_bytes(encoded: Mapping[str, Mapping[str, Tensor]]) -> int:
    """Bytes one client sends: ``Σ numel × element_size`` of all parts, divided by the ``m`` rows.

    Args:
        encoded: the round's encodings ``{name: {part: [m, ...]}}``.
    """
    rows = [t.shape[0] for parts in encoded.values() for t in parts.values()]
    return sum(payload_bytes(parts) for parts in encoded.values()) // rows[-1] if rows and rows[-1] else 0


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Expected `{name}` to be True or False, got {value!r}")
    return value


class BF16(Compressor):
    """Uploads rounded to bfloat16 (2 bytes a value; the 8-bit mantissa of bfloat16, float32's range).

    Args:
        error_feedback: keep the rounding error on the client and add it to its next upload.
    """

    def __init__(self, error_feedback: bool = False) -> None:
        self.error_feedback = _check_bool("error_feedback", error_feedback)

    def encode(self, x: Tensor, uniform: Tensor | None = None) -> dict[str, Tensor]:
        return F.bf16_encode(x)

    def decode(self, encoding: Mapping[str, Tensor], n: int, dtype: torch.dtype) -> Tensor:
        return F.bf16_decode(dict(encoding), dtype)


class QSGD(Compressor):
    """QSGD (Alistarh et al., 2017): stochastic quantization to ``levels`` levels per sign, unbiased.

    Args:
        levels: ``s >= 1``; a value costs ``⌈log₂(2s + 1)⌉`` bits (``s = 1``: 2, ``s = 3``: 3, ``s = 7``: 4).
            The variance grows as ``min(n/s², √n/s)·‖x‖²``.
        seed: seed of the rounding draws (with the round, the client and the parameter).

    Example:
        Each value becomes ``-‖x‖``, ``0`` or ``‖x‖`` (``levels=1``), at random but unbiased: over 1000
        clients holding the same ``x`` the decoded mean is close to ``x``.

        >>> import torch
        >>> from lightning_metafed.compression import QSGD, encoded_bytes
        >>> qsgd = QSGD(levels=1, seed=0)
        >>> x = torch.tensor([0.5, -1.0, 0.25, 0.0])
        >>> updates = {"w": x.expand(1000, 4)}
        >>> encoded = qsgd.encode_all(updates, round_idx=0, client_id=torch.arange(1000))
        >>> decoded = qsgd.decode_all(encoded, updates)["w"]
        >>> decoded.unique()
        tensor([-1.1456,  0.0000,  1.1456])
        >>> torch.allclose(decoded.mean(0), x, atol=0.05), encoded_bytes(encoded)  # 4-byte norm + 4 × 2 bits
        (True, 5)
    """

    unbiased = True
    random = True

    def __init__(self, levels: int = 1, seed: int = 0) -> None:
        self.levels = check_int("levels", levels, minimum=1)
        if levels > 1 << 14:
            raise ValueError(f"Expected `levels` <= {1 << 14} (16-bit codes), got {levels}")
        self.seed = check_int("seed", seed)

    def encode(self, x: Tensor, uniform: Tensor | None = None) -> dict[str, Tensor]:
        return F.qsgd_encode(x, self.levels, uniform)

    def decode(self, encoding: Mapping[str, Tensor], n: int, dtype: torch.dtype) -> Tensor:
        return F.qsgd_decode(dict(encoding), self.levels, n, dtype)


class _Sparse(Compressor):
    fraction: float

    def keep(self, n: int) -> int:
        """Coordinates kept of a parameter with ``n`` values: ``max(1, ⌈fraction·n⌉)``."""
        return max(1, min(n, math.ceil(self.fraction * n - 1e-9)))

    def decode(self, encoding: Mapping[str, Tensor], n: int, dtype: torch.dtype) -> Tensor:
        return F.sparse_decode(dict(encoding), n, dtype)


class TopK(_Sparse):
    """Top-k sparsification (Stich, Cordonnier & Jaggi, 2018): each parameter's ``⌈fraction·n⌉``
    values of largest magnitude and their indices.

    Args:
        fraction: share of each parameter's values sent, in ``(0, 1]``.
        error_feedback: keep what was not sent on the client and add it to its next upload (default
            on: without it top-k loses the small coordinates for good).

    Example:
        >>> import torch
        >>> from lightning_metafed.compression import TopK, encoded_bytes
        >>> topk = TopK(fraction=0.25)
        >>> updates = {"w": torch.tensor([[0.1, -3.0, 0.2, 0.5, 2.0, -0.1, 0.0, 1.0]])}  # 1 client, 8 values
        >>> encoded = topk.encode_all(updates, round_idx=0, client_id=None)
        >>> topk.decode_all(encoded, updates)["w"]  # the 2 largest magnitudes survive
        tensor([[ 0., -3.,  0.,  0.,  2.,  0.,  0.,  0.]])
        >>> encoded_bytes(encoded)  # 2 × (4-byte value + 2-byte index)
        12
    """

    def __init__(self, fraction: float = 0.1, error_feedback: bool = True) -> None:
        self.fraction = check_range("fraction", fraction, 0.0, 1.0, low_open=True, high_open=False)
        self.error_feedback = _check_bool("error_feedback", error_feedback)

    def encode(self, x: Tensor, uniform: Tensor | None = None) -> dict[str, Tensor]:
        return F.topk_encode(x, self.keep(x.shape[1]))


class RandK(_Sparse):
    """Random-k sparsification: ``⌈fraction·n⌉`` coordinates of each parameter drawn uniformly without
    replacement, scaled by ``n/k`` (unbiased; variance ``(n/k − 1)·‖x‖²``).

    Args:
        fraction: share of each parameter's values sent, in ``(0, 1]``.
        seed: seed of the draws (with the round, the client and the parameter).
    """

    unbiased = True
    random = True

    def __init__(self, fraction: float = 0.1, seed: int = 0) -> None:
        self.fraction = check_range("fraction", fraction, 0.0, 1.0, low_open=True, high_open=False)
        self.seed = check_int("seed", seed)

    def encode(self, x: Tensor, uniform: Tensor | None = None) -> dict[str, Tensor]:
        return F.randk_encode(x, self.keep(x.shape[1]), uniform)


class SignSGD(Compressor):
    """Scaled sign compression: ``(‖x‖₁/n)·sign(x)`` per parameter, one bit a value (signSGD,
    Bernstein et al., 2018, with the scale of EF-SignSGD, Karimireddy et al., 2019).

    Args:
        error_feedback: keep ``x − (‖x‖₁/n)·sign(x)`` on the client and add it to its next upload
            (default on: EF-SignSGD; without it sign compression can fail to converge).

    Example:
        >>> import torch
        >>> from lightning_metafed.compression import SignSGD, encoded_bytes
        >>> sign = SignSGD()
        >>> updates = {"w": torch.tensor([[1.0, -2.0, 3.0, -4.0]])}
        >>> encoded = sign.encode_all(updates, round_idx=0, client_id=None)
        >>> sign.decode_all(encoded, updates)["w"]  # ‖x‖₁/n = 10/4 times the signs
        tensor([[ 2.5000, -2.5000,  2.5000, -2.5000]])
        >>> encoded_bytes(encoded)  # a 4-byte scale and 4 bits
        5
    """

    def __init__(self, error_feedback: bool = True) -> None:
        self.error_feedback = _check_bool("error_feedback", error_feedback)

    def encode(self, x: Tensor, uniform: Tensor | None = None) -> dict[str, Tensor]:
        return F.sign_encode(x)

    def decode(self, encoding: Mapping[str, Tensor], n: int, dtype: torch.dtype) -> Tensor:
        return F.sign_decode(dict(encoding), n, dtype)


torch.serialization.add_safe_globals([BF16, QSGD, TopK, RandK, SignSGD])
