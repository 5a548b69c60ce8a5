"""The representable values of a quantized dtype, in units of the (fixed) scale.

Every rounding method in lrq_ao works on *grid indices*: an element's quantized value is ``grid.values[idx]``
and its dequantized value is ``grid.values[idx] * scale``. Moving an element "one step up" is ``idx + 1``, which
is the next representable value for INT8 (``q + 1``) and for FP8 e4m3fn (the next e4m3 number, exact across
the subnormal range and zero). Whatever the optimizer does, the result is representable by construction.
"""

from __future__ import annotations

import torch

from lrq_ao.primitives import FP8_DTYPE, INT8_MAX, expand_scale, quantize_with_scale


def _grid_values(qdtype: torch.dtype) -> torch.Tensor:
    if qdtype == torch.int8:
        return torch.arange(-int(INT8_MAX), int(INT8_MAX) + 1, dtype=torch.float32)
    if qdtype == FP8_DTYPE:
        # Every e4m3fn bit pattern, decoded; drop the NaNs, merge +0/-0, sort.
        every = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
        return torch.unique(every[torch.isfinite(every)])
    raise ValueError(f"no rounding grid for dtype {qdtype}; expected torch.int8 or torch.float8_e4m3fn")


class Grid:
    """Sorted representable values of ``qdtype`` (float32 tensor ``values``) on ``device``."""

    def __init__(self, qdtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.qdtype = qdtype
        self.values = _grid_values(qdtype).to(device)
        self.last = self.values.numel() - 1

    def floor_index(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the largest grid value ``<= x`` (saturating at both ends)."""
        i = torch.searchsorted(self.values, x.contiguous(), right=True) - 1
        return i.clamp_(0, self.last)

    def index_of(self, v: torch.Tensor) -> torch.Tensor:
        """Index of grid values ``v`` (which must be exactly representable)."""
        i = self.floor_index(v)
        if not bool((self.values[i] == v).all()):
            raise ValueError("index_of got values that are not on the quantization grid")
        return i

    def nearest_index(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the grid value nearest to ``x`` (ties towards the lower value; only used inside relaxations)."""
        lo = self.floor_index(x)
        hi = (lo + 1).clamp_(max=self.last)
        take_hi = (self.values[hi] - x).abs() < (x - self.values[lo]).abs()
        return torch.where(take_hi, hi, lo)

    def rtn_index(self, w: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
        """Grid indices of exactly the round-to-nearest result of ``primitives.quantize_with_scale``."""
        q = quantize_with_scale(w, scale, self.qdtype, block_size).float()
        return self.index_of(q)

    def to_qdata(self, idx: torch.Tensor) -> torch.Tensor:
        return self.values[idx].to(self.qdtype)

    def dequant(self, idx: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
        return self.values[idx] * scale_full


def full_scale(scale: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """The scale grid broadcast to the weight's shape (float32)."""
    return expand_scale(scale.float(), block_size)
