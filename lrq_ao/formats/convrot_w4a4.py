"""ConvRot W4A4: the ConvRot rotation of ``lrq_ao.formats.convrot``, then per-row signed INT4 codes packed two a byte.

Name: ``convrot_w4a4`` (rotation group ``G`` = ``block``, default 256; ``get_format("convrot_w4a4", block_size=64)``
picks another). ComfyUI name ``convrot_w4a4`` (stock: ``QUANT_ALGOS`` in ComfyUI master's ``comfy/quant_ops.py``,
loaded by ``comfy/ops.py``). Follows comfy-kitchen 0.2.40 ``tensor/convrot_w4a4.py`` and its eager backend
``backends/eager/convrot_w4a4.py`` / ``backends/eager/svdquant.py`` (``_pack_int4_row_major``):

* Rotation: ``W_rot = W.reshape(N, K / G, G) @ H.T`` with the normalised regular Hadamard ``H`` of
  :class:`~lrq_ao.formats.convrot.ConvRotation` (the same rotation as INT8 ConvRot); activations ``x Hblk``.
* Scale rule (of the rotated weight): one float32 scale per output row, ``max(amax(|W_rot| row) / 7, 1e-8)``;
  codes ``round(W_rot / scale)`` half to even, clamped to [-7, 7]. Kitchen's quantizer
  (``quantize_convrot_w4a4_weight``) uses the same rule but computes it in the weight's dtype (rotation, amax / 7,
  division, rounding: all bf16 for a bf16 weight) and floors amax (not the scale) at 1e-10; lrq_ao computes in
  float32, so for a float32 weight both give the same codes and scales (rows with amax < 7e-8 aside, where the
  floors differ), and for a bf16 weight lrq_ao's are closer to the weight (see the tests).
  Kitchen never emits code -8 (``_INT4_MAX = 7``, "-8 ... would break the dequant symmetry" of its MMA kernels), so
  the rounding grid is -7..7; a stored -8 nibble still decodes to -8 (kitchen's unpacker sign-extends every nibble).
* ``quant_group_size`` (kitchen's ``Params`` field, always 64; ComfyUI hard-codes it) is not a scale group: there is
  one scale per row. It only requires ``in_features % 64 == 0`` (kitchen's quantizer refuses other K, its CUDA
  dequantizer declares ``K / 2 % 32 == 0``), which :meth:`~ConvRotW4A4Format.block_size_for` checks with ``K % G``.
* Packing (element ``int4_lo``): byte ``j`` of a row is ``(q[2j] & 0xF) | (q[2j + 1] & 0xF) << 4``, the **even
  column in the low nibble** (the opposite of NVFP4), two's-complement nibbles, stored as int8 ``(N, K / 2)``.
* Dequantization: :meth:`~ConvRotW4A4Format.dequantize` is the stored, rotated weight ``codes.float() * scale``;
  :meth:`~ConvRotW4A4Format.dequantize_original` un-rotates it in float32 with the float32 ``H`` and casts, the
  same products as kitchen's eager ``dequantize_convrot_w4a4_weight`` (which ComfyUI's ``QuantizedTensor`` calls
  with ``output_dtype`` = the model's compute dtype): bit-identical on CPU.
* Activations: kitchen quantizes the rotated activation per token itself (INT4, ``amax / 7``). Its CUDA backend
  runs native INT4 MMA only on sm_8x (and Turing sm_75 for large batches); Hopper, Blackwell and
  ``linear_dtype: "int8"`` take per-token INT8 activations against the INT4 weight instead. lrq_ao has no W4A4
  kernel: ``kernel_dtype`` is ``None`` (no 8-bit kernel takes the codes); weight-only linears run on the packed codes
  in ``lrq_ao.kernels.packed_gemm`` (from ``Int4LowFirst.nibble_values`` / ``even_code_high``) or dequantize.
* ComfyUI tensors: ``.weight`` I8 ``[out, in / 2]``, ``.weight_scale`` F32 ``[out]`` (1-D; kitchen's CUDA backend
  declares a 1-D scale). Marker ``{"format": "convrot_w4a4", "convrot_groupsize": G}``, the keys ComfyUI's
  ``_quantized_weight_state_dict`` writes (``linear_dtype`` only when not ``"int4"``). ComfyUI reads
  ``convrot_groupsize`` (default 256) and ``linear_dtype`` (default ``"int4"``) from the marker or its ``"params"``
  object; ``orig_shape`` / ``orig_dtype`` come from the model, and nothing in the file is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lrq_ao.formats.base import MIN_SCALE, FormatError, QuantizedWeight, WeightFormat, blocked_amax, check_2d
from lrq_ao.formats.comfy import (
    MARKER_SUFFIX,
    SCALE_SUFFIX,
    WEIGHT_SUFFIX,
    ComfyFormatError,
    register_reader,
    require,
)
from lrq_ao.formats.convrot import DEFAULT_GROUP, GROUPS, ConvRotation, ConvRotFormat, _marker_value
from lrq_ao.formats.elements import IntElement, register_element

COMFY_NAME = "convrot_w4a4"
QUANT_GROUP = 64  # kitchen's _INT4_GROUP_SIZE: in_features must be a multiple of it (one scale per row regardless)
LINEAR_DTYPES = ("int4", "int8")  # kitchen's Params.linear_dtype values (how the GPU runs it; storage is the same)


# ---- the element -------------------------------------------------------------------------------------------------


class Int4LowFirst(IntElement):
    """Signed INT4 codes -7..7 (int8 in memory), packed two a byte with the even column in the low nibble."""

    nibble_values = tuple(float(v) for v in (*range(8), *range(-8, 0)))  # two's complement nibbles
    even_code_high = False

    def __init__(self) -> None:
        super().__init__("int4_lo", bits=4, storage_dtype=torch.int8, kernel_dtype=None)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` codes -> int8 ``(N, K / 2)``: byte ``j`` = ``(codes[2j] & 0xF) | (codes[2j + 1] & 0xF) << 4``."""
        if codes.shape[-1] % 2:
            raise FormatError(f"cannot pack an odd number of INT4 codes per row (shape {tuple(codes.shape)})")
        nibbles = codes.to(torch.int16) & 0x0F
        return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`, sign-extending every nibble (``0x8`` -> -8, as kitchen's unpacker)."""
        as_bytes = stored.view(torch.uint8).to(torch.int16)
        nibbles = torch.stack([as_bytes & 0x0F, as_bytes >> 4], dim=-1)
        signed = torch.where(nibbles >= 8, nibbles - 16, nibbles)
        return signed.reshape(*stored.shape[:-1], stored.shape[-1] * 2).to(torch.int8)


INT4_LO = register_element(Int4LowFirst())


# ---- the format --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvRotW4A4Format(ConvRotation):
    """Per-row signed INT4 codes of the ConvRot-rotated weight; ``block`` is the rotation group ``G`` along K."""

    element = INT4_LO  # class constants, not dataclass fields (no annotations)
    comfy_name = COMFY_NAME
    stock = True

    @property
    def name(self) -> str:
        return "convrot_w4a4"

    def describe(self) -> str:
        return f"{self.name} (group {self.block}, INT4 per row)"

    # ---- group shape ----------------------------------------------------------------------------------------

    def block_size_for(self, shape: tuple[int, int] | torch.Size) -> tuple[int, int]:
        n, k = check_2d(shape)
        if k % self.block or k % QUANT_GROUP:
            raise FormatError(
                f"convrot_w4a4 needs in_features divisible by its ConvRot group {self.block} and by {QUANT_GROUP} "
                f"(comfy-kitchen's INT4 kernels), got a weight of shape ({n}, {k}); choose another group or write "
                f"what ConvRotW4A4Format.fallback gives"
            )
        return (1, k)

    def fallback(self, shape: tuple[int, int] | torch.Size | None = None) -> WeightFormat:
        """What a converter writes for a weight this format refuses: W4A4 with the largest smaller group of
        ``GROUPS`` that the shape allows (``in_features`` a multiple of 64 and of the group), else INT8 ConvRot
        as :meth:`ConvRotFormat.fallback <lrq_ao.formats.convrot.ConvRotFormat.fallback>` picks it (a smaller
        group, else plain per-row INT8). Without ``shape``: plain per-row INT8, which stores any shape."""
        int8 = ConvRotFormat(self.block)
        if shape is None:
            return int8.fallback()
        _, k = check_2d(shape)
        for group in sorted(GROUPS, reverse=True):
            if group <= self.block and k % group == 0 and k % QUANT_GROUP == 0:
                return ConvRotW4A4Format(group)
        return int8.fallback((1, k))

    def fallback_reason(self, shape: tuple[int, int] | torch.Size) -> str | None:
        """One line for plans, reports and metadata: why a weight of ``shape`` is written as :meth:`fallback`
        instead (``None`` when this format stores it)."""
        n, k = check_2d(shape)
        if self.refusal((n, k)) is None:
            return None
        chosen = self.fallback((n, k))
        if isinstance(chosen, ConvRotW4A4Format):
            return (
                f"ConvRot group {self.block} does not divide in_features {k}; written as {chosen.describe()}, the "
                f"largest group of {GROUPS} that divides it"
            )
        return (
            f"convrot_w4a4 needs in_features divisible by {QUANT_GROUP}, got {k}; written as {chosen.describe()} "
            f"(8-bit: twice the size of INT4)"
        )

    # ---- scales ---------------------------------------------------------------------------------------------

    def compute_scales(self, w: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, None]:
        """Per-row ``max(amax(|w_rot|) / 7, 1e-8)`` of the already rotated ``w``, float32 ``(N, 1)``."""
        amax = blocked_amax(w.float(), block_size)
        return (amax / self.element.qmax).clamp_min(MIN_SCALE), None

    # ---- activation pairing ---------------------------------------------------------------------------------

    def dynamic_activation(self, block_size: tuple[int, int], shape: tuple[int, int]) -> str:
        return (
            "format convrot_w4a4 has no dynamic activation quantization in lrq_ao: W4A4 needs INT4 tensor-core MMA "
            "(comfy-kitchen uses it on sm_75/sm_8x only; on Hopper it runs INT8 activations instead), "
            "and lrq_ao has no W4A4 kernel; use activation='weight_only' (ComfyUI quantizes the "
            "activations itself)"
        )

    @property
    def kernel_dtype(self) -> None:
        """``None``: no 8-bit kernel takes packed INT4 codes (the packed weight-only kernel reads the element)."""
        return None

    # ---- ComfyUI --------------------------------------------------------------------------------------------

    def comfy_marker_fields(self, block_size: tuple[int, int], shape: tuple[int, int]) -> dict[str, Any]:
        """``{"convrot_groupsize": G}``; ``linear_dtype`` is left at ComfyUI's default ``"int4"`` (not written)."""
        return {"convrot_groupsize": int(self.block)}

    def comfy_tensors(self, qw: QuantizedWeight, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``.weight`` I8 ``(N, K / 2)`` packed codes and ``.weight_scale`` F32 ``(N,)``; ``FormatError`` if the
        tensors do not fit ``shape``."""
        n, k = check_2d(shape)
        self.block_size_for((n, k))
        if tuple(qw.qdata.shape) != (n, k // 2) or qw.qdata.dtype != torch.int8:
            raise FormatError(
                f"convrot_w4a4 qdata must be int8 {(n, k // 2)}, got {qw.qdata.dtype} {tuple(qw.qdata.shape)}"
            )
        if tuple(qw.scale.shape) != (n, 1):
            raise FormatError(f"convrot_w4a4 scale grid has shape {tuple(qw.scale.shape)}, expected ({n}, 1)")
        return {
            WEIGHT_SUFFIX: qw.qdata.detach().contiguous(),
            SCALE_SUFFIX: qw.scale.detach().to(torch.float32).reshape(n).contiguous(),
        }


FORMATS: dict[str, ConvRotW4A4Format] = {"convrot_w4a4": ConvRotW4A4Format()}


# ---- reading ComfyUI files ---------------------------------------------------------------------------------------


def _marker_group(marker: dict[str, Any], where: str) -> int:
    group = _marker_value(marker, "convrot_groupsize", DEFAULT_GROUP)
    if isinstance(group, bool) or not isinstance(group, int):
        raise ComfyFormatError(f"{where}{MARKER_SUFFIX}: convrot_groupsize {group!r} is not an integer")
    linear_dtype = _marker_value(marker, "linear_dtype", "int4")
    if linear_dtype not in LINEAR_DTYPES:
        raise ComfyFormatError(
            f"{where}{MARKER_SUFFIX}: linear_dtype {linear_dtype!r} is not one of {LINEAR_DTYPES} (comfy-kitchen "
            f"refuses it)"
        )
    return group


def _row_scales(stored: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """The float32 ``(n, 1)`` grid of a stored per-row scale: ``[out]`` as written; ``[out, 1]`` is read too
    (kitchen's eager dequantizer reshapes it alike)."""
    if not stored.dtype.is_floating_point or stored.dtype.itemsize == 1:
        raise ComfyFormatError(f"{name}: dtype {stored.dtype} is not a float scale for convrot_w4a4; expected float32")
    if tuple(stored.shape) not in ((n,), (n, 1)):
        raise ComfyFormatError(
            f"{name}: shape {list(stored.shape)} is not one scale per row of convrot_w4a4; expected [{n}]"
        )
    scale = stored.detach().to(torch.float32).reshape(n, 1)
    if not bool(torch.isfinite(scale).all()) or bool(torch.signbit(scale).any()):
        raise ComfyFormatError(f"{name}: row scales must be finite and non-negative; re-quantize this layer")
    return scale


def read_convrot_w4a4(marker: dict[str, Any], tensors: dict[str, torch.Tensor], where: str):
    """ComfyUI ``convrot_w4a4`` tensors -> ``(ConvRotW4A4Format(G), QuantizedWeight)`` (see the module docstring)."""
    group = _marker_group(marker, where)
    qdata = require(tensors, WEIGHT_SUFFIX, where)
    if qdata.dtype != torch.int8 or qdata.dim() != 2 or qdata.shape[0] == 0 or qdata.shape[1] == 0:
        raise ComfyFormatError(
            f"{where}{WEIGHT_SUFFIX}: convrot_w4a4 stores a non-empty 2-D int8 weight [out, in / 2], got "
            f"{qdata.dtype} {list(qdata.shape)}"
        )
    n, k = int(qdata.shape[0]), 2 * int(qdata.shape[1])
    try:
        fmt = ConvRotW4A4Format(group)
        block_size = fmt.block_size_for((n, k))
    except FormatError as exc:
        raise ComfyFormatError(f"{where}{WEIGHT_SUFFIX}: {exc}") from None
    scale = _row_scales(require(tensors, SCALE_SUFFIX, where), n, f"{where}{SCALE_SUFFIX}")
    return fmt, QuantizedWeight(qdata.contiguous(), scale, block_size)


register_reader(COMFY_NAME, read_convrot_w4a4)
