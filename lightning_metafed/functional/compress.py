"""Upload compressors as pure encode/decode pairs on a round's uploads of one parameter.

Every function takes ``x`` of shape ``[m, n]``: ``m`` clients' uploads of one parameter, flattened.
An encoding is a dict of tensors with ``m`` rows, in dtypes that any wire format carries (integers,
floats; bfloat16 travels as its 16 bits in ``int16``), so its size is what a client sends:
``Σ numel × element_size`` of the encoding, divided by ``m``. Randomness comes in as an argument
(``uniform``: ``[m, n]`` numbers in ``[0, 1)``), so every encoder is deterministic given it.

- ``bf16``: round to bfloat16 (2 bytes per value; relative error below ``2⁻⁸``).
- ``qsgd`` (Alistarh et al., 2017, "QSGD"): per client ``‖x‖₂`` and, per coordinate, its sign and
  a level ``l ∈ {0, …, s}`` drawn so that ``E[‖x‖ · sign · l / s] = x`` (unbiased); the signed level
  is packed in ``⌈log₂(2s + 1)⌉`` bits.
- ``topk`` (Stich, Cordonnier & Jaggi, 2018): the ``k`` largest ``|x_j|`` with their indices (biased).
- ``randk``: ``k`` coordinates drawn uniformly without replacement, scaled by ``n/k`` (unbiased).
- ``sign`` (Bernstein et al., 2018, signSGD; scaled as in Karimireddy et al., 2019, EF-SignSGD):
  ``(‖x‖₁/n) · sign(x)``, one bit per coordinate and one scale per client (biased).

A row of ``x`` holding NaN/inf decodes to a non-finite row with every encoder, and so does an
encoding no encoder produces (an index out of range, a QSGD code above ``2s``): the server's screen
rejects such a client instead of the round failing.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "bf16_decode", "bf16_encode", "index_dtype", "pack_bits", "qsgd_bits", "qsgd_decode", "qsgd_encode",
    "randk_encode", "sign_decode", "sign_encode", "sparse_decode", "topk_encode", "unpack_bits",
]

Encoding = dict[str, Tensor]


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Non-negative integer codes ``[m, n]`` below ``2**bits`` packed into ``uint8 [m, ⌈n·bits/8⌉]``
    (code ``j``'s bit ``b`` is bit ``(j·bits + b) mod 8`` of byte ``⌊(j·bits + b)/8⌋``)."""
    m, n = codes.shape
    shifts = torch.arange(bits, device=codes.device)
    stream = ((codes.long().unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(m, n * bits)
    pad = (-stream.shape[1]) % 8
    stream = torch.nn.functional.pad(stream, (0, pad)).reshape(m, -1, 8)
    weights = (1 << torch.arange(8, device=codes.device)).to(torch.uint8)
    return (stream * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """The ``[m, n]`` ``int64`` codes that :func:`pack_bits` packed into ``packed``."""
    m = packed.shape[0]
    stream = (packed.long().unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(m, -1)[:, : n * bits].reshape(m, n, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


def index_dtype(n: int) -> torch.dtype:
    """The smallest signed integer dtype holding every index below ``n``."""
    if n <= 1 << 15:
        return torch.int16
    return torch.int32 if n <= 1 << 31 else torch.int64


def bf16_encode(x: Tensor) -> Encoding:
    """``x`` rounded to bfloat16 (nearest even), as its 16 bits: ``{"bits": int16 [m, n]}``."""
    return {"bits": x.to(torch.bfloat16).view(torch.int16)}


def bf16_decode(encoding: Encoding, dtype: torch.dtype) -> Tensor:
    return encoding["bits"].view(torch.bfloat16).to(dtype)


def qsgd_bits(levels: int) -> int:
    """Bits per coordinate of QSGD with ``levels`` levels: the signed level takes ``2·levels + 1`` values."""
    return (2 * levels).bit_length()


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def qsgd_encode(x: Tensor, levels: int, uniform: Tensor) -> Encoding:
    """QSGD with ``s = levels``: ``{"norm": [m, 1], "codes": packed}``, where coordinate ``j``'s code is
    ``s + sign(x_j)·l_j`` and ``l_j = ⌊r_j⌋ + [u_j < r_j − ⌊r_j⌋]``, ``r_j = s·|x_j|/‖x‖₂`` (computed
    in at least float32, so half-precision uploads are rounded without bias too)."""
    x = x.to(_at_least_float32(x.dtype))
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    ratio = levels * x.abs() / torch.where(norm > 0, norm, torch.ones_like(norm))
    low = ratio.floor()
    level = (low + (uniform.to(ratio.dtype) < ratio - low).to(ratio.dtype)).clamp(max=levels)
    codes = levels + torch.sign(x) * level
    return {"norm": norm, "codes": pack_bits(codes.long(), qsgd_bits(levels))}


def qsgd_decode(encoding: Encoding, levels: int, n: int, dtype: torch.dtype) -> Tensor:
    """``‖x‖·(code − s)/s``; a row holding a code above ``2s`` (no encoder sends one) decodes to NaN."""
    codes = unpack_bits(encoding["codes"], qsgd_bits(levels), n)
    wide = _at_least_float32(dtype)
    out = encoding["norm"].to(wide) * (codes - levels).to(wide) / levels
    return out.masked_fill((codes > 2 * levels).any(1, keepdim=True), float("nan")).to(dtype)


def topk_encode(x: Tensor, k: int) -> Encoding:
    """The ``k`` coordinates of largest magnitude: ``{"values": [m, k], "indices": [m, k]}``."""
    indices = x.abs().topk(k, dim=1, sorted=False).indices
    return {"values": x.gather(1, indices), "indices": indices.to(index_dtype(x.shape[1]))}


def randk_encode(x: Tensor, k: int, uniform: Tensor) -> Encoding:
    """``k`` coordinates chosen uniformly without replacement (the ``k`` smallest ``uniform`` draws),
    scaled by ``n/k``: ``{"values": [m, k], "indices": [m, k]}``; unbiased. A client whose ``x`` holds
    NaN/inf gets NaN values, so the server still sees that its upload is not finite."""
    n = x.shape[1]
    indices = uniform.topk(k, dim=1, largest=False, sorted=False).indices
    values = (x.gather(1, indices) * (n / k)).masked_fill(~torch.isfinite(x).all(1, keepdim=True), float("nan"))
    return {"values": values, "indices": indices.to(index_dtype(n))}


def sparse_decode(encoding: Encoding, n: int, dtype: torch.dtype) -> Tensor:
    """The dense ``[m, n]`` tensor of a ``topk``/``randk`` encoding (zeros elsewhere); a row holding an
    index outside ``[0, n)`` (no encoder sends one) decodes to NaN."""
    values, indices = encoding["values"].to(dtype), encoding["indices"].long()
    out = torch.zeros(values.shape[0], n, dtype=dtype, device=values.device).scatter(1, indices.clamp(0, n - 1), values)
    return out.masked_fill(((indices < 0) | (indices >= n)).any(1, keepdim=True), float("nan"))


def sign_encode(x: Tensor) -> Encoding:
    """``{"scale": ‖x‖₁/n [m, 1], "signs": packed bits}`` (bit 1: ``x_j >= 0``)."""
    scale = x.abs().mean(dim=1, keepdim=True)
    return {"scale": scale, "signs": pack_bits((x >= 0).long(), 1)}


def sign_decode(encoding: Encoding, n: int, dtype: torch.dtype) -> Tensor:
    signs = unpack_bits(encoding["signs"], 1, n).to(dtype) * 2 - 1
    return encoding["scale"].to(dtype) * signs
