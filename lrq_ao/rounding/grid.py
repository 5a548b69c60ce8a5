"""The representable values of a format's element, in units of the (fixed) scale.

Every rounding method in lrq_ao works on *grid indices*: an element's quantized value is ``grid.values[idx]``
and its dequantized value is ``grid.values[idx] * scale``. Moving an element "one step up" is ``idx + 1``, which
is the next representable value of the element (INT8 ``q + 1``; the next e4m3 number, exact across the subnormal
range and zero; the next E2M1 value). Whatever the optimizer does, the result is representable by construction.
The element (``lrq_ao.formats.elements``) owns the values and the coding; this module only indexes them.
"""

from __future__ import annotations

import torch

from lrq_ao.formats.base import expand_scale
from lrq_ao.formats.elements import Element, element_for_dtype


class Grid:
    """Sorted representable values of an element (float32 tensor ``values``) on ``device``.

    ``element`` is an ``Element`` or, for the 8-bit elements, the torch dtype that stores it.
    """

    def __init__(self, element: Element | torch.dtype, device: torch.device | str = "cpu") -> None:
        self.element = element if isinstance(element, Element) else element_for_dtype(element)
        self.values = self.element.values().to(device)
        self.last = self.values.numel() - 1

    @property
    def qdtype(self) -> torch.dtype:
        return self.element.storage_dtype

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

    def index_of_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Grid indices of (unpacked) codes."""
        return self.index_of(self.element.decode(codes).float())

    def rtn_index(self, w: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
        """Grid indices of exactly the round-to-nearest codes of ``w`` under an effective scale grid."""
        return self.index_of_codes(self.element.round(w.float() / expand_scale(scale.float(), block_size)))

    def to_codes(self, idx: torch.Tensor) -> torch.Tensor:
        """The (unpacked) codes of grid indices."""
        return self.element.encode(self.values[idx])

    to_qdata = to_codes  # the 8-bit elements store codes unpacked

    def dequant(self, idx: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
        return self.values[idx] * scale_full


def full_scale(scale: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """The scale grid broadcast to the weight's shape (float32)."""
    return expand_scale(scale.float(), block_size)
