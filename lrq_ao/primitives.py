"""Quantization arithmetic shared by every layout, kernel reference, rounding objective and the converter.

Conventions (every kernel must match these bit for bit):

* A weight is 2-D ``(N, K)`` = ``(out_features, in_features)``.
* Granularity is expressed as a 2-D ``block_size = (bn, bk)``: per-tensor ``(N, K)``, per-row ``(1, K)``,
  block-wise ``(b, b)``. The scale is always stored 2-D with shape ``(N // bn, K // bk)`` in float32.
* ``scale = max(amax(|w| over the block) / qmax, 1e-8)`` computed in float32, so an all-zero block gets a
  tiny, safe scale and quantizes to zeros.
* Quantize: ``x = w.float() / scale`` (true division, broadcast over the block), then
  INT8: ``clamp(round_half_to_even(x), -127, 127)``; FP8 e4m3fn: ``clamp(x, -448, 448)`` cast with
  round-to-nearest-even.
* Dequantize: ``qdata.float() * scale`` (broadcast over the block), then cast to the requested dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
MIN_SCALE = 1e-8
DEFAULT_BLOCK = 128

GRANULARITIES = ("tensor", "row", "block")


def qmax_of(qdtype: torch.dtype) -> float:
    """Largest representable magnitude of the quantized dtype."""
    if qdtype == FP8_DTYPE:
        return FP8_MAX
    if qdtype == torch.int8:
        return INT8_MAX
    raise ValueError(f"unsupported quantized dtype {qdtype}; expected torch.float8_e4m3fn or torch.int8")


@dataclass(frozen=True)
class FormatSpec:
    """A quantized weight format: element dtype plus scale granularity.

    ``block`` is only used when ``granularity == "block"``.
    """

    qdtype: torch.dtype
    granularity: str
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        qmax_of(self.qdtype)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.block <= 0:
            raise ValueError(f"block must be positive, got {self.block}")

    @property
    def qmax(self) -> float:
        return qmax_of(self.qdtype)

    @property
    def is_fp8(self) -> bool:
        return self.qdtype == FP8_DTYPE

    def block_size_for(self, shape: tuple[int, int] | torch.Size) -> tuple[int, int]:
        """The 2-D block size for a weight of ``shape``; raises ``ValueError`` if the layout cannot tile it."""
        n, k = check_2d(shape)
        if self.granularity == "tensor":
            return (n, k)
        if self.granularity == "row":
            return (1, k)
        b = self.block
        if n % b or k % b:
            raise ValueError(
                f"a {self.granularity} layout with block {b} cannot tile a weight of shape ({n}, {k}): both "
                f"dimensions must be multiples of {b}; choose a block size that divides them or a per-row format"
            )
        return (b, b)


# Formats by user-facing name (LearnedRoundingConfig.format).
FORMATS: dict[str, FormatSpec] = {
    "fp8": FormatSpec(FP8_DTYPE, "tensor"),
    "fp8_row": FormatSpec(FP8_DTYPE, "row"),
    "fp8_block": FormatSpec(FP8_DTYPE, "block"),
    "int8": FormatSpec(torch.int8, "row"),
    "int8_tensor": FormatSpec(torch.int8, "tensor"),
    "int8_block": FormatSpec(torch.int8, "block"),
}


def format_spec(name: str, block: int = DEFAULT_BLOCK) -> FormatSpec:
    """Look up a format by name (``fp8``, ``fp8_row``, ``fp8_block``, ``int8``, ``int8_tensor``, ``int8_block``)."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; expected one of {sorted(FORMATS)}")
    spec = FORMATS[name]
    return FormatSpec(spec.qdtype, spec.granularity, block)


def check_2d(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    """Raise ``ValueError`` naming the tensor if it holds NaN or Inf."""
    if not bool(torch.isfinite(w).all()):
        n_bad = int((~torch.isfinite(w)).sum())
        raise ValueError(
            f"tensor {name!r} has {n_bad} NaN/Inf values and cannot be quantized; fix the checkpoint or leave "
            f"this layer in high precision"
        )


def expand_scale(scale: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Broadcast a 2-D block scale grid to the full weight shape."""
    bn, bk = block_size
    return scale.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)


def _blocked_amax(w: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    n, k = w.shape
    bn, bk = block_size
    if n % bn or k % bk:
        raise ValueError(f"block size {block_size} does not tile shape {tuple(w.shape)}")
    return w.abs().reshape(n // bn, bn, k // bk, bk).amax(dim=(1, 3))


def compute_scale(w: torch.Tensor, qdtype: torch.dtype, block_size: tuple[int, int]) -> torch.Tensor:
    """Float32 scale grid ``(N // bn, K // bk)`` = ``max(amax / qmax, 1e-8)`` per block."""
    amax = _blocked_amax(w.float(), block_size)
    return (amax / qmax_of(qdtype)).clamp_min(MIN_SCALE)


def round_to_grid(x: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """Round already-scaled values to the quantized dtype (round-to-nearest-even, saturating)."""
    if qdtype == torch.int8:
        return torch.round(x).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, qdtype: torch.dtype, block_size: tuple[int, int]):
    """Round-to-nearest quantization of ``w`` with a given scale grid."""
    x = w.float() / expand_scale(scale, block_size)
    return round_to_grid(x, qdtype)


def quantize_rtn(w: torch.Tensor, spec: FormatSpec, name: str = "weight"):
    """Round-to-nearest quantization. Returns ``(qdata, scale, block_size)``.

    Raises ``ValueError`` naming ``name`` for NaN/Inf, a non-2-D weight, or a block layout that cannot tile it.
    """
    block_size = spec.block_size_for(w.shape)
    check_finite(w, name)
    scale = compute_scale(w, spec.qdtype, block_size)
    return quantize_with_scale(w, scale, spec.qdtype, block_size), scale, block_size


def dequantize(
    qdata: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``qdata.float() * scale`` broadcast over blocks, cast to ``dtype``."""
    return (qdata.float() * expand_scale(scale, block_size)).to(dtype)


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, ``20 log10(‖ref‖ / ‖ref − approx‖)``, computed in float64."""
    ref = reference.double()
    err = torch.linalg.vector_norm(ref - approx.double())
    sig = torch.linalg.vector_norm(ref)
    if err == 0:
        return math.inf
    return float(20 * torch.log10(sig / err))
