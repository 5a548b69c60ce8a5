"""Compatibility names for the 8-bit quantization arithmetic, now owned by ``lrq_ao.formats``.

Every rule lives in a format file (``lrq_ao/formats/scaled.py`` for the FP8 / INT8 tensor / row / block formats,
``lrq_ao/formats/elements.py`` for the element types); the functions here are thin spellings of them kept for
code written against the old module, plus :func:`sqnr`, the measure every test and report uses.

Conventions (every kernel must match these bit for bit): a weight is 2-D ``(N, K)``; granularity is a 2-D
``block_size = (bn, bk)`` (per tensor ``(N, K)``, per row ``(1, K)``, block ``(b, b)``); the scale is a float32
grid ``(N // bn, K // bk)`` = ``max(amax / qmax, 1e-8)``; quantize ``w.float() / scale`` rounded half to even and
saturated; dequantize ``qdata.float() * scale``.
"""

from __future__ import annotations

import math

import torch

from lrq_ao.formats import FORMATS as _ALL_FORMATS
from lrq_ao.formats import get_format
from lrq_ao.formats.base import MIN_SCALE, QuantizedWeight, blocked_amax, check_2d, check_finite, expand_scale
from lrq_ao.formats.elements import FP8_DTYPE, FP8_E4M3, INT8, element_for_dtype
from lrq_ao.formats.scaled import DEFAULT_BLOCK, GRANULARITIES, ScaledFormat

FormatSpec = ScaledFormat
FP8_MAX = FP8_E4M3.qmax
INT8_MAX = INT8.qmax
# The 8-bit scaled formats by name (the full set, new families included, is ``lrq_ao.formats.FORMATS``).
FORMATS: dict[str, ScaledFormat] = {n: f for n, f in _ALL_FORMATS.items() if isinstance(f, ScaledFormat)}

__all__ = [
    "DEFAULT_BLOCK",
    "FORMATS",
    "FP8_DTYPE",
    "FP8_MAX",
    "GRANULARITIES",
    "INT8_MAX",
    "MIN_SCALE",
    "FormatSpec",
    "check_2d",
    "check_finite",
    "compute_scale",
    "dequantize",
    "expand_scale",
    "format_spec",
    "qmax_of",
    "quantize_rtn",
    "quantize_with_scale",
    "round_to_grid",
    "sqnr",
]


def qmax_of(qdtype: torch.dtype) -> float:
    """Largest representable magnitude of the quantized dtype."""
    return element_for_dtype(qdtype).qmax


def format_spec(name: str, block: int = DEFAULT_BLOCK) -> ScaledFormat:
    """An 8-bit scaled format by name, with ``block`` applied to the block formats."""
    fmt = get_format(name)
    if not isinstance(fmt, ScaledFormat):
        raise ValueError(f"{name!r} is not an 8-bit scaled format; use lrq_ao.formats.get_format")
    return get_format(fmt, block) if fmt.has_blocks else fmt


def compute_scale(w: torch.Tensor, qdtype: torch.dtype, block_size: tuple[int, int]) -> torch.Tensor:
    """Float32 scale grid ``(N // bn, K // bk)`` = ``max(amax / qmax, 1e-8)`` per block."""
    return (blocked_amax(w.float(), block_size) / qmax_of(qdtype)).clamp_min(MIN_SCALE)


def round_to_grid(x: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """Round already-scaled values to the quantized dtype (round-to-nearest-even, saturating)."""
    return element_for_dtype(qdtype).round(x)


def quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, qdtype: torch.dtype, block_size: tuple[int, int]):
    """Round-to-nearest quantization of ``w`` with a given scale grid."""
    return round_to_grid(w.float() / expand_scale(scale, block_size), qdtype)


def quantize_rtn(w: torch.Tensor, spec: ScaledFormat, name: str = "weight"):
    """Round-to-nearest quantization. Returns ``(qdata, scale, block_size)``; ``ValueError`` naming ``name``."""
    qw: QuantizedWeight = spec.quantize(w, name)
    return qw.qdata, qw.scale, qw.block_size


def dequantize(
    qdata: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``qdata.float() * scale`` broadcast over blocks, cast to ``dtype``."""
    return (qdata.float() * expand_scale(scale, block_size)).to(dtype)


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, ``20 log10(‖ref‖ / ‖ref − approx‖)``, computed in float64."""
    ref = reference.detach().double()
    err = torch.linalg.vector_norm(ref - approx.detach().double())
    sig = torch.linalg.vector_norm(ref)
    if err == 0:
        return math.inf
    return float(20 * torch.log10(sig / err))
