"""The 8-bit scaled formats: FP8 e4m3fn or INT8 codes times one float32 scale per tensor, row or square block.

Names: ``fp8`` (per tensor), ``fp8_row``, ``fp8_block``, ``int8`` (per row), ``int8_tensor``, ``int8_block``.

* Scale rule: ``scale = max(amax(|w| over the group) / qmax, 1e-8)`` in float32 (an all-zero group gets a tiny,
  safe scale and quantizes to zeros); quantize ``round(w / scale)`` (true division, half to even, saturating at
  ±qmax: INT8 ±127, FP8 ±448); dequantize ``codes.float() * scale`` broadcast per group.
* Dynamic activations pair per token (row), or 1 x ``bk`` blocks for a block-wise weight so both operands' K blocks
  line up. Per token rather than per tensor for a per-tensor FP8 weight because it is both more accurate and faster
  (cuBLAS's row-wise FP8 GEMM with fast accumulation ran 3072 -> 9216 at M = 4608 in 222 us against 271 us for the
  tensor-wise one; H100, DEVELOPMENT.md "Kernels").
* ComfyUI: ``float8_e4m3fn`` (scalar scale), ``int8_tensorwise`` (per row ``[out, 1]`` with ``"per_row": true``,
  or a scalar), both stock; ``float8_e4m3fn_rowwise`` (``[out]``), ``float8_e4m3fn_blockwise`` and
  ``int8_blockwise`` (``[out / g, in / g]`` with ``"group_size": g``) load only with the ComfyUI-QuantOps node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lrq_ao.formats.base import MIN_SCALE, FormatError, QuantizedWeight, WeightFormat, blocked_amax, check_2d
from lrq_ao.formats.comfy import SCALE_SUFFIX, WEIGHT_SUFFIX, ComfyFormatError, register_reader, require
from lrq_ao.formats.elements import FP8_E4M3, INT8, Element, element_for_dtype

DEFAULT_BLOCK = 128
GRANULARITIES = ("tensor", "row", "block")

# How a ComfyUI format stores the scale of each granularity it carries.
SCALAR = "scalar"  # shape [] (one scale for the tensor; [1] also read)
COLUMN = "column"  # shape [out, 1]
VECTOR = "vector"  # shape [out]
GRID = "grid"  # shape [out / g, in / g], g in the marker's "group_size"


@dataclass(frozen=True)
class ComfyScaled:
    """One ComfyUI name of this family: element, the granularities it carries and how each scale is stored."""

    name: str
    element: Element
    scale_layouts: dict[str, str]
    stock: bool


COMFY_SCALED = {
    c.name: c
    for c in (
        ComfyScaled("float8_e4m3fn", FP8_E4M3, {"tensor": SCALAR}, stock=True),
        ComfyScaled("int8_tensorwise", INT8, {"row": COLUMN, "tensor": SCALAR}, stock=True),
        ComfyScaled("int8_blockwise", INT8, {"block": GRID}, stock=False),
        ComfyScaled("float8_e4m3fn_rowwise", FP8_E4M3, {"row": VECTOR}, stock=False),
        ComfyScaled("float8_e4m3fn_blockwise", FP8_E4M3, {"block": GRID}, stock=False),
    )
}


def _comfy_of(element: Element, granularity: str) -> ComfyScaled:
    for c in COMFY_SCALED.values():
        if c.element == element and granularity in c.scale_layouts:
            return c
    raise FormatError(f"no ComfyUI format stores {element.name} {granularity}-wise")


@dataclass(frozen=True)
class ScaledFormat(WeightFormat):
    """FP8 / INT8 codes with one float32 scale per ``granularity`` group (``block`` is the edge of square blocks)."""

    qdtype: torch.dtype
    granularity: str
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        element_for_dtype(self.qdtype)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.block <= 0:
            raise ValueError(f"block must be positive, got {self.block}")

    # ---- identity -------------------------------------------------------------------------------------------

    @property
    def element(self) -> Element:  # type: ignore[override]
        return element_for_dtype(self.qdtype)

    @property
    def name(self) -> str:
        base = "fp8" if self.element == FP8_E4M3 else "int8"
        default = "tensor" if self.element == FP8_E4M3 else "row"
        return base if self.granularity == default else f"{base}_{self.granularity}"

    def describe(self) -> str:
        return f"{self.name} ({self.block})" if self.granularity == "block" else self.name

    @property
    def has_blocks(self) -> bool:
        return self.granularity == "block"

    @property
    def qmax(self) -> float:
        return self.element.qmax

    @property
    def comfy(self) -> ComfyScaled:
        return _comfy_of(self.element, self.granularity)

    @property
    def comfy_name(self) -> str:  # type: ignore[override]
        return self.comfy.name

    @property
    def stock(self) -> bool:  # type: ignore[override]
        return self.comfy.stock

    # ---- group shape and scales -----------------------------------------------------------------------------

    def block_size_for(self, shape: tuple[int, int] | torch.Size) -> tuple[int, int]:
        n, k = check_2d(shape)
        if self.granularity == "tensor":
            return (n, k)
        if self.granularity == "row":
            return (1, k)
        b = self.block
        if n % b or k % b:
            raise FormatError(
                f"a {self.granularity} layout with block {b} cannot tile a weight of shape ({n}, {k}): both "
                f"dimensions must be multiples of {b}; choose a block size that divides them or a per-row format"
            )
        return (b, b)

    def fallback(self) -> ScaledFormat:
        """What a converter writes when this format cannot tile a layer: the per-row format of the same element."""
        return ScaledFormat(self.qdtype, "row") if self.granularity == "block" else self

    def compute_scales(self, w: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, None]:
        amax = blocked_amax(w.float(), block_size)
        return (amax / self.qmax).clamp_min(MIN_SCALE), None

    def dynamic_activation(self, block_size: tuple[int, int], shape: tuple[int, int]) -> tuple[str, int]:
        n, k = int(shape[0]), int(shape[1])
        bn, bk = block_size
        if (bn, bk) == (n, k) or bn == 1:
            return ("row", 0)
        return ("block", bk)

    # ---- ComfyUI --------------------------------------------------------------------------------------------

    def comfy_marker_fields(self, block_size: tuple[int, int], shape: tuple[int, int]) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.granularity == "block":
            fields["group_size"] = int(self.block)
        if self.comfy.name == "int8_tensorwise" and self.granularity == "row":
            fields["per_row"] = True
        return fields

    def comfy_tensors(self, qw: QuantizedWeight, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        n, k = check_2d(shape)
        bn, bk = qw.block_size
        grid = (n // bn, k // bk)
        if tuple(qw.scale.shape) != grid:
            raise ComfyFormatError(f"scale grid has shape {tuple(qw.scale.shape)}, expected {grid} for {self.name}")
        stored = {SCALAR: (), COLUMN: (n, 1), VECTOR: (n,), GRID: grid}[self.comfy.scale_layouts[self.granularity]]
        return {
            WEIGHT_SUFFIX: qw.qdata.detach().contiguous(),
            SCALE_SUFFIX: qw.scale.detach().to(torch.float32).reshape(stored).contiguous(),
        }


FORMATS: dict[str, ScaledFormat] = {
    "fp8": ScaledFormat(FP8_E4M3.storage_dtype, "tensor"),
    "fp8_row": ScaledFormat(FP8_E4M3.storage_dtype, "row"),
    "fp8_block": ScaledFormat(FP8_E4M3.storage_dtype, "block"),
    "int8": ScaledFormat(INT8.storage_dtype, "row"),
    "int8_tensor": ScaledFormat(INT8.storage_dtype, "tensor"),
    "int8_block": ScaledFormat(INT8.storage_dtype, "block"),
}


# ---- reading ComfyUI files --------------------------------------------------------------------------------------


def _granularity_of(shape: tuple, comfy: ComfyScaled, n: int, k: int) -> str | None:
    for granularity, layout in comfy.scale_layouts.items():
        if layout == SCALAR and shape in ((), (1,)):
            return granularity
        if layout == COLUMN and shape == (n, 1):
            return granularity
        if layout == VECTOR and shape == (n,):
            return granularity
        if layout == GRID and len(shape) == 2:
            return granularity
    return None


def expected_scale_shapes(comfy: ComfyScaled, shape: tuple[int, int], group_size: int | None) -> list[tuple]:
    """Every stored scale shape ``comfy`` allows for a weight of ``shape`` (for messages)."""
    n, k = shape
    shapes: list[tuple] = []
    for layout in comfy.scale_layouts.values():
        if layout == SCALAR:
            shapes += [(), (1,)]
        elif layout == COLUMN:
            shapes.append((n, 1))
        elif layout == VECTOR:
            shapes.append((n,))
        elif group_size:
            shapes.append((n // group_size, k // group_size))
        else:
            shapes.append(("out/group_size", "in/group_size"))
    return shapes


def _group_size_from_grid(shape: tuple, n: int, k: int, group_size: int | None, name: str) -> int:
    rows, cols = shape
    if group_size is None:
        # The marker lacks group_size: infer it, but only if the grid is a square tiling of the weight.
        if rows <= 0 or cols <= 0 or n % rows or k % cols or n // rows != k // cols:
            raise ComfyFormatError(
                f"{name}: block scale shape {list(shape)} is not a square tiling of weight [{n}, {k}] and the "
                f"marker has no group_size"
            )
        group_size = n // rows
    if n % group_size or k % group_size or (rows, cols) != (n // group_size, k // group_size):
        raise ComfyFormatError(
            f"{name}: block scale shape {list(shape)} does not match weight [{n}, {k}] with group_size "
            f"{group_size}; expected [{n // group_size}, {k // group_size}] and both dims divisible by it"
        )
    return group_size


def scaled_from_comfy(
    stored: torch.Tensor,
    comfy: ComfyScaled,
    weight_shape: tuple[int, int] | torch.Size,
    group_size: int | None = None,
    name: str = "weight_scale",
) -> tuple[ScaledFormat, torch.Tensor, tuple[int, int]]:
    """Interpret a stored ``weight_scale`` of ComfyUI format ``comfy``: ``(format, scale_grid, block_size)``.

    Accepted shapes: ``[]`` or ``[1]`` per tensor, ``[out, 1]`` (INT8) or ``[out]`` (FP8 row-wise) per row,
    ``[out / g, in / g]`` block-wise (``g`` inferred from the shapes when the marker lacks it). Raises
    ``ComfyFormatError`` naming ``name`` for a non-float scale or any other shape.
    """
    n, k = check_2d(weight_shape)
    if not stored.dtype.is_floating_point or stored.dtype.itemsize == 1:
        raise ComfyFormatError(f"{name}: scale dtype {stored.dtype} is not a float scale for {comfy.name}")
    shape = tuple(stored.shape)
    granularity = _granularity_of(shape, comfy, n, k)
    if granularity is None:
        if shape == (n,) and comfy.scale_layouts.get("row") == COLUMN:
            # Written by some tools; lrq_ao can read it, but stock ComfyUI fails in the forward with it.
            granularity = "row"
        else:
            allowed = expected_scale_shapes(comfy, (n, k), group_size)
            raise ComfyFormatError(
                f"{name}: scale shape {list(shape)} does not fit format {comfy.name} for a weight of shape "
                f"[{n}, {k}]; expected one of {[list(s) for s in allowed]}"
            )
    block = _group_size_from_grid(shape, n, k, group_size, name) if granularity == "block" else DEFAULT_BLOCK
    fmt = ScaledFormat(comfy.element.storage_dtype, granularity, block)
    block_size = fmt.block_size_for((n, k))
    grid = stored.detach().to(torch.float32).reshape(n // block_size[0], k // block_size[1])
    return fmt, grid, block_size


def _reader(comfy: ComfyScaled):
    def read(marker: dict[str, Any], tensors: dict[str, torch.Tensor], where: str):
        qdata = require(tensors, WEIGHT_SUFFIX, where)
        if qdata.dtype != comfy.element.storage_dtype:
            raise ComfyFormatError(
                f"{where}{WEIGHT_SUFFIX}: dtype {qdata.dtype} does not match format {comfy.name} "
                f"(expected {comfy.element.storage_dtype})"
            )
        scale = require(tensors, SCALE_SUFFIX, where)
        fmt, grid, block_size = scaled_from_comfy(
            scale, comfy, qdata.shape, marker.get("group_size"), f"{where}{SCALE_SUFFIX}"
        )
        return fmt, QuantizedWeight(qdata, grid, block_size)

    return read


for _comfy in COMFY_SCALED.values():
    register_reader(_comfy.name, _reader(_comfy))
