"""Element types: the numbers one quantized code can stand for, and how a scaled value is rounded to one.

An ``Element`` knows its sorted representable values (the *grid*, in units of the scale), how round-to-nearest
maps an already-scaled float32 value onto that grid (round half to even, saturating at ``±qmax``), how codes are
stored (``storage_dtype``) and, for sub-byte elements, how two codes share a byte. Formats
(``lrq_ao.formats.*``) pair an element with a group shape and a scale rule; nothing else in lrq_ao asks which
element it holds, it asks the element.

The 8-bit elements are defined here because several formats share them (FP8 e4m3fn is the element of the FP8
formats and of MXFP8, INT8 of the INT8 and ConvRot formats). A format whose element is its own (a packed 4-bit
type) defines it in its own file and registers it with :func:`register_element`.
"""

from __future__ import annotations

import functools

import torch

FP8_DTYPE = torch.float8_e4m3fn


class Element:
    """One element type. Subclasses set the class attributes and implement :meth:`round`.

    name: stable identifier (``"int8"``, ``"float8_e4m3fn"``, ...).
    bits: bits per code in a file.
    storage_dtype: torch dtype of the stored tensor (``torch.uint8`` for packed sub-byte codes).
    qmax: largest representable magnitude.
    kernel_dtype: the torch dtype lrq_ao's 8-bit kernels and ``torch._scaled_mm`` consume, or ``None`` when codes
        must be decoded first (packed types).
    nibble_values: for a packed 4-bit element, the value each stored nibble ``0..15`` decodes to (``decode`` of what
        ``unpack`` makes of it), else ``None``; a kernel decodes the packed codes from this, not from the name.
    even_code_high: for a packed 4-bit element, whether column ``2j`` of a row sits in the high nibble of byte ``j``
        (``False``: the low nibble), else ``None``.
    """

    name: str
    bits: int
    storage_dtype: torch.dtype
    qmax: float
    kernel_dtype: torch.dtype | None = None
    nibble_values: tuple[float, ...] | None = None
    even_code_high: bool | None = None

    # ---- the grid ---------------------------------------------------------------------------------------------

    def values(self) -> torch.Tensor:
        """Sorted, distinct representable values (float32, CPU)."""
        return _values_of(self)

    def _all_values(self) -> torch.Tensor:
        raise NotImplementedError

    # ---- rounding and coding ----------------------------------------------------------------------------------

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round already-scaled float32 values to codes (one per element, unpacked): half to even, saturating."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The float32 value of each (unpacked) code."""
        return codes.float()

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Codes for values that lie exactly on the grid (what rounding chose); round-trips through ``decode``."""
        return self.round(values)

    # ---- storage ----------------------------------------------------------------------------------------------

    @property
    def packed(self) -> bool:
        return self.bits < 8

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Stored form of ``(N, K)`` codes (identity for 8-bit elements)."""
        return codes

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`."""
        return stored

    def stored_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of the stored tensor for a ``(N, K)`` weight."""
        n, k = shape
        return (n, k * self.bits // 8) if self.packed else (n, k)

    def __repr__(self) -> str:
        return f"Element({self.name})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Element) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("Element", self.name))


@functools.cache
def _values_cached(name: str) -> torch.Tensor:
    # torch.unique keeps -0.0 of an FP8 grid; adding +0.0 makes the one zero +0.0, which encodes to code 0x00.
    return torch.unique(ELEMENTS[name]._all_values().float()) + 0.0


def _values_of(element: Element) -> torch.Tensor:
    return _values_cached(element.name)


class IntElement(Element):
    """Symmetric signed integers ``-qmax..qmax`` (the most negative code of two's complement is never used)."""

    def __init__(self, name: str, bits: int, storage_dtype: torch.dtype, kernel_dtype: torch.dtype | None) -> None:
        self.name = name
        self.bits = bits
        self.storage_dtype = storage_dtype
        self.qmax = float(2 ** (bits - 1) - 1)
        self.kernel_dtype = kernel_dtype

    def _all_values(self) -> torch.Tensor:
        return torch.arange(-self.qmax, self.qmax + 1)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x).clamp_(-self.qmax, self.qmax).to(torch.int8)


class TorchFloatElement(Element):
    """A float type torch casts to with round-to-nearest-even (FP8 e4m3fn); values beyond ±qmax saturate."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.bits = 8
        self.storage_dtype = dtype
        self.qmax = float(torch.finfo(dtype).max)
        self.kernel_dtype = dtype

    def _all_values(self) -> torch.Tensor:
        # Every bit pattern decoded; NaNs dropped, +0/-0 merged by torch.unique.
        every = torch.arange(256, dtype=torch.uint8).view(self.storage_dtype).float()
        return every[torch.isfinite(every)]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-self.qmax, self.qmax).to(self.storage_dtype)


INT8 = IntElement("int8", 8, torch.int8, torch.int8)
FP8_E4M3 = TorchFloatElement("float8_e4m3fn", FP8_DTYPE)

ELEMENTS: dict[str, Element] = {}


def register_element(element: Element) -> Element:
    ELEMENTS[element.name] = element
    return element


register_element(INT8)
register_element(FP8_E4M3)


def element_for_dtype(dtype: torch.dtype) -> Element:
    """The unpacked 8-bit element stored as ``dtype`` (``ValueError`` naming the known ones otherwise)."""
    for element in ELEMENTS.values():
        if not element.packed and element.storage_dtype == dtype:
            return element
    known = sorted(str(e.storage_dtype) for e in ELEMENTS.values() if not e.packed)
    raise ValueError(f"no lrq_ao element is stored as {dtype}; known: {known}")
