"""NVFP4: FP4 E2M1 codes in groups of 16 along K, an FP8 e4m3fn scale per group and a float32 scale per tensor.

Name ``nvfp4`` (ComfyUI ``nvfp4``, comfy-kitchen layout ``TensorCoreNVFP4Layout``; stock ComfyUI loads it, and on
GPUs without FP4 tensor cores it dequantizes). The rules follow comfy-kitchen 0.2.40's eager backend
(``backends/eager/quantization.py``: ``quantize_nvfp4`` / ``dequantize_nvfp4``; ``float_utils.py``), checked
against it by ``tests/formats/test_nvfp4.py``.

* Element: E2M1, values ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}; code = ``sign << 3 | index`` (index into that list);
  round to nearest, ties to the even index, saturating at ±6; a negative value that rounds to 0 keeps its sign
  (code 8), as kitchen's ``_f32_to_floatx_unpacked(x, 2, 1)`` does. Two codes a byte, the even column in the
  HIGH nibble (kitchen ``pack_uint4(hi_first=True)``): byte ``j`` of a row is ``code[2j] << 4 | code[2j + 1]``.
* Scales, in float32 (the weight as float32; kitchen's own quantizer computes the global scale in the weight's
  dtype, see :meth:`NVFP4Format.compute_scales`)::

      scale2 = amax|W| / (448 * 6)                                   (the global, ``weight_scale_2``)
      scale  = fp8_e4m3fn_rne(min((amax|group| / 6) / scale2, 448))  (per 1 x 16 group, ``weight_scale``)
      codes  = e2m1_rne(w / (scale2 * scale)),  0 where scale2 * scale == 0

  An fp8 scale that underflows to 0 makes its group decode to zeros.
* Dequantization, as kitchen's eager ``dequantize_nvfp4(..., output_type=dtype)``: in ``dtype`` arithmetic,
  ``e2m1(code) * (scale2.to(dtype) * scale.to(dtype))``. In float32 this is ``decode(codes) *
  effective_scale`` exactly, the product learned rounding optimizes; in bf16 / fp16 kitchen rounds the scale
  product to ``dtype`` before the multiplication, so its result can differ by one ``dtype`` ulp from the float32
  result cast to ``dtype``, and :meth:`NVFP4Format.dequantize` follows kitchen.
* In memory: ``qdata`` uint8 ``(N, K / 2)`` packed as above, ``scale`` the float32 grid ``(N, K / 16)`` holding
  the fp8 block scales' exact values, ``scale2`` a float32 scalar. ``K`` must be a multiple of 16 (kitchen pads
  it with zeros; lrq_ao refuses such a weight instead). ``N`` may be anything.
* ComfyUI file, exactly what kitchen's ``TensorCoreNVFP4Layout.state_dict_tensors`` produces:
  ``.weight`` U8 ``(ceil16(N), K / 2)`` with zero padding rows; ``.weight_scale`` F8_E4M3 block scales padded
  with zeros to ``(ceil16(N), K / 16)`` and then to ``(ceil128(ceil16(N)), ceil4(K / 16))``, in cuBLAS's
  "to_blocked" swizzle (:func:`swizzle_block_scales`); ``.weight_scale_2`` F32 scalar ``()``. ComfyUI reads only
  ``"format"`` from the marker (``comfy/ops.py``); the logical shape comes from the module, and lrq_ao's reader
  takes it from the marker's ``orig_shape`` when present (else the stored, padded row count).
* No dynamic activation mode: FP4 activations need Blackwell's FP4 tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lrq_ao.formats.base import FormatError, QuantizedWeight, WeightFormat, blocked_amax, check_2d, expand_scale
from lrq_ao.formats.comfy import (
    SCALE2_SUFFIX,
    SCALE_SUFFIX,
    WEIGHT_SUFFIX,
    ComfyFormatError,
    register_reader,
    require,
)
from lrq_ao.formats.elements import FP8_DTYPE, Element, register_element

GROUP = 16
FP8_MAX = 448.0
E2M1_MAX = 6.0
# cuBLAS block-scale tiles: 128 rows x 4 scale columns, stored as 32 x 16 bytes.
TILE_ROWS = 128
TILE_COLS = 4

_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding |x| to the index of _MAGNITUDES: the index grows past each midpoint; at a midpoint (a tie) it grows
# only if the upper neighbour has the even index (round half to even on the code).
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def _ceil_to(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class FP4E2M1(Element):
    """FP4 E2M1 (1 sign, 2 exponent, 1 mantissa bit, no Inf / NaN), codes ``0..15`` as uint8, two a byte."""

    name = "float4_e2m1fn"
    bits = 4
    storage_dtype = torch.uint8
    qmax = E2M1_MAX
    kernel_dtype = None
    nibble_values = _MAGNITUDES + tuple(-m for m in _MAGNITUDES)  # code = sign << 3 | index
    even_code_high = True

    def _lut(self, device: torch.device) -> torch.Tensor:
        magnitudes = torch.tensor(_MAGNITUDES, dtype=torch.float32, device=device)
        return torch.cat([magnitudes, -magnitudes])

    def _all_values(self) -> torch.Tensor:
        return self._lut(torch.device("cpu"))

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of already-scaled values: nearest E2M1 value, ties to the even code, ±6 beyond; the sign bit is
        kept (``-0.1`` gives code 8, ``-0``). NaN gives code 0 or 8."""
        x = x.float()
        magnitude = x.abs()
        index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
        for midpoint, tie_goes_up in _MIDPOINTS:
            index += (magnitude >= midpoint) if tie_goes_up else (magnitude > midpoint)
        return index | (torch.signbit(x).to(torch.uint8) << 3)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self._lut(codes.device)[codes.long()]

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` codes -> uint8 ``(N, K / 2)``, column ``2j`` in the high nibble of byte ``j``."""
        if codes.shape[-1] % 2:
            raise FormatError(f"cannot pack an odd number of FP4 codes per row (shape {tuple(codes.shape)})")
        codes = codes.to(torch.uint8)
        return (codes[..., 0::2] << 4) | (codes[..., 1::2] & 0x0F)

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        high, low = stored >> 4, stored & 0x0F
        return torch.stack([high, low], dim=-1).reshape(*stored.shape[:-1], stored.shape[-1] * 2)


E2M1 = register_element(FP4E2M1())


# ---- the cuBLAS block-scale swizzle ------------------------------------------------------------------------------


def swizzle_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """Block scales ``(R, C)`` in cuBLAS's block-scaling-factor layout (kitchen ``to_blocked(flatten=False)``).

    Zero-padded to ``(ceil128(R), ceil4(C))``; each 128 x 4 tile becomes 512 contiguous bytes in which
    ``S[r, c]`` sits at ``(r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4``; tiles follow row-tile-major. Returned
    viewed as ``(ceil128(R), ceil4(C))``.
    """
    rows, cols = scales.shape
    r, c = _ceil_to(rows, TILE_ROWS), _ceil_to(cols, TILE_COLS)
    padded = scales.new_zeros((r, c))
    padded[:rows, :cols] = scales
    # (row tile, row // 32 within the tile, row % 32, column tile, column % 4) -> swap the 2nd and 4th axes.
    tiles = padded.reshape(r // TILE_ROWS, 4, 32, c // TILE_COLS, TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(r, c)


def unswizzle_block_scales(stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_block_scales`: the ``(rows, cols)`` scales (padding dropped)."""
    r, c = stored.shape
    tiles = stored.reshape(r // TILE_ROWS, c // TILE_COLS, 32, 4, TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(r, c)[:rows, :cols]


# ---- the format --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NVFP4Format(WeightFormat):
    """E2M1 codes, an fp8 e4m3fn scale per 1 x 16 group and a float32 global scale (see the module docstring)."""

    element = E2M1
    comfy_name = "nvfp4"
    stock = True

    @property
    def name(self) -> str:
        return "nvfp4"

    def describe(self) -> str:
        return "nvfp4 (E2M1, fp8 scale per 1x16, fp32 global)"

    # ---- group shape and scales -----------------------------------------------------------------------------

    def block_size_for(self, shape: tuple[int, int] | torch.Size) -> tuple[int, int]:
        n, k = check_2d(shape)
        if k % GROUP:
            raise FormatError(
                f"nvfp4 needs in_features to be a multiple of {GROUP} (groups of {GROUP} along K), got shape "
                f"({n}, {k}); leave this layer in high precision or use an 8-bit per-row format"
            )
        return (1, GROUP)

    def compute_scales(self, w: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, scale2)``: the fp8-rounded group scales as float32 and the float32 global scale.

        Kitchen divides the global ``amax / 2688`` in the weight's dtype (bf16 for a bf16 weight, rounding it to
        8 significant bits); here it is float32. Given the same global, the codes and group scales equal kitchen's
        ``quantize_nvfp4`` byte for byte. An all-zero weight gets the smallest normal float32 as its global (kitchen
        divides 0 by 0 there and stores NaN scales), so its group scales are 0 and it decodes to zeros.
        """
        w = w.float()
        scale2 = (w.abs().amax() / (FP8_MAX * E2M1_MAX)).clamp_min(torch.finfo(torch.float32).tiny)
        group = blocked_amax(w, block_size) / E2M1_MAX / scale2
        scale = group.clamp(max=FP8_MAX).to(FP8_DTYPE).float()
        return scale, scale2

    def effective_scale(self, scale: torch.Tensor, scale2: torch.Tensor | None) -> torch.Tensor:
        """``scale2 * scale`` in float32 (one rounding; kitchen's total scale)."""
        if scale2 is None:
            raise FormatError("nvfp4 needs its global scale (scale2); got None")
        return scale.float() * scale2.float()

    def round_values(
        self, w: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor | None, block_size: tuple[int, int]
    ) -> torch.Tensor:
        """Round-to-nearest codes; a group whose effective scale is 0 gets code 0 everywhere (as kitchen)."""
        total = expand_scale(self.effective_scale(scale, scale2), block_size)
        zero = total == 0
        x = torch.where(zero, torch.zeros_like(total), w.float() / torch.where(zero, torch.ones_like(total), total))
        return self.element.round(x)

    # ---- dequantization -------------------------------------------------------------------------------------

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Kitchen's eager ``dequantize_nvfp4`` with ``output_type=dtype``, bit for bit: in ``dtype`` arithmetic,
        ``e2m1(code) * (scale2.to(dtype) * scale.to(dtype))`` per 1 x 16 group. For float32 this equals
        ``decode(codes) * effective_scale`` broadcast per group."""
        if qw.scale2 is None:
            raise FormatError("nvfp4 needs its global scale (scale2); got None")
        values = self.element.decode(self.codes(qw)).to(dtype)
        total = qw.scale2.to(dtype) * qw.scale.to(dtype)
        n, k = values.shape
        return (values.reshape(n, k // GROUP, GROUP) * total.reshape(n, k // GROUP, 1)).reshape(n, k)

    def dequantize_original(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Same as :meth:`dequantize` (nothing is rotated; the arithmetic stays in ``dtype`` as kitchen's)."""
        return self.dequantize(qw, dtype)

    # ---- activation pairing ---------------------------------------------------------------------------------

    def dynamic_activation(self, block_size: tuple[int, int], shape: tuple[int, int]) -> str:
        return (
            "format nvfp4 has no dynamic activation quantization in lrq_ao (FP4 activations need Blackwell FP4 "
            "tensor cores); use activation='weight_only'"
        )

    # ---- ComfyUI --------------------------------------------------------------------------------------------

    def comfy_marker_fields(self, qw_block_size: tuple[int, int], shape: tuple[int, int]) -> dict[str, Any]:
        """None: ComfyUI reads only ``"format"`` for nvfp4 (the group size 16 is fixed in its ``QUANT_ALGOS``)."""
        return {}

    def comfy_tensors(self, qw: QuantizedWeight, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``.weight`` U8 ``(ceil16(N), K / 2)``, ``.weight_scale`` F8_E4M3 swizzled, ``.weight_scale_2`` F32 ``()``
        (module docstring); ``FormatError`` if the tensors do not fit ``shape`` or a scale is not an fp8 value."""
        n, k = check_2d(shape)
        self.block_size_for((n, k))
        groups = k // GROUP
        if tuple(qw.qdata.shape) != (n, k // 2) or qw.qdata.dtype != torch.uint8:
            raise FormatError(f"nvfp4 qdata must be uint8 {(n, k // 2)}, got {qw.qdata.dtype} {tuple(qw.qdata.shape)}")
        if tuple(qw.scale.shape) != (n, groups):
            raise FormatError(f"nvfp4 scale grid has shape {tuple(qw.scale.shape)}, expected {(n, groups)}")
        if qw.scale2 is None or qw.scale2.numel() != 1:
            raise FormatError("nvfp4 needs a scalar global scale (scale2)")
        block_scales = qw.scale.detach().to(FP8_DTYPE)
        if qw.scale.device.type != "meta" and not torch.equal(block_scales.float(), qw.scale.detach().float()):
            raise FormatError("nvfp4 group scales must be exact fp8 e4m3fn values in [0, 448]; recompute them")
        rows = _ceil_to(n, GROUP)
        weight = qw.qdata.new_zeros((rows, k // 2))
        weight[:n] = qw.qdata.detach()
        padded_scales = block_scales.new_zeros((rows, groups))
        padded_scales[:n] = block_scales
        return {
            WEIGHT_SUFFIX: weight,
            SCALE_SUFFIX: swizzle_block_scales(padded_scales),
            SCALE2_SUFFIX: qw.scale2.detach().to(torch.float32).reshape(()).clone(),
        }

    @property
    def _has_scale2(self) -> bool:
        return True


NVFP4 = NVFP4Format()
FORMATS: dict[str, NVFP4Format] = {"nvfp4": NVFP4}


# ---- reading ComfyUI files ---------------------------------------------------------------------------------------


def _logical_shape(marker: dict[str, Any], stored_rows: int, stored_cols: int, where: str) -> tuple[int, int]:
    """``(N, K)`` from the marker's ``orig_shape`` (ComfyUI takes it from the module), else the stored one."""
    k_padded = stored_cols * 2
    if "orig_shape" not in marker:
        return stored_rows, k_padded
    shape = marker["orig_shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ComfyFormatError(f"{where}: marker orig_shape {shape!r} is not [out_features, in_features]")
    n, k = shape
    if _ceil_to(n, GROUP) != stored_rows or _ceil_to(k, GROUP) != k_padded:
        raise ComfyFormatError(
            f"{where}{WEIGHT_SUFFIX}: stored shape [{stored_rows}, {stored_cols}] does not hold orig_shape {shape} "
            f"in nvfp4 (expected [{_ceil_to(n, GROUP)}, {_ceil_to(k, GROUP) // 2}])"
        )
    if k % GROUP:
        raise ComfyFormatError(
            f"{where}{WEIGHT_SUFFIX}: in_features {k} is not a multiple of {GROUP}; lrq_ao cannot represent this "
            f"padded nvfp4 layer (re-quantize it from the original weights)"
        )
    return n, k


def _read_block_scales(stored: torch.Tensor, n: int, groups: int, where: str) -> torch.Tensor:
    name = f"{where}{SCALE_SUFFIX}"
    if stored.dtype == torch.uint8:
        stored = stored.view(FP8_DTYPE)  # ComfyUI views the bytes as fp8 too
    if stored.dtype != FP8_DTYPE:
        raise ComfyFormatError(f"{name}: dtype {stored.dtype} is not float8_e4m3fn block scales for nvfp4")
    expected = (_ceil_to(_ceil_to(n, GROUP), TILE_ROWS), _ceil_to(groups, TILE_COLS))
    if tuple(stored.shape) != expected:
        raise ComfyFormatError(
            f"{name}: shape {list(stored.shape)} is not the swizzled nvfp4 block-scale shape {list(expected)} for a "
            f"weight of {n} x {groups * GROUP}"
        )
    scales = unswizzle_block_scales(stored, n, groups).float()
    if not bool(torch.isfinite(scales).all()) or bool(torch.signbit(scales).any()):
        raise ComfyFormatError(f"{name}: block scales must be finite and non-negative fp8 values")
    return scales.contiguous()


def _read_global_scale(stored: torch.Tensor, where: str) -> torch.Tensor:
    name = f"{where}{SCALE2_SUFFIX}"
    if not stored.dtype.is_floating_point or stored.dtype.itemsize == 1 or stored.numel() != 1:
        raise ComfyFormatError(
            f"{name}: expected a float32 scalar global scale, got {stored.dtype} {list(stored.shape)}"
        )
    scale2 = stored.detach().to(torch.float32).reshape(())
    if not bool(torch.isfinite(scale2)) or float(scale2) <= 0:
        raise ComfyFormatError(f"{name}: global scale {float(scale2)} must be finite and positive")
    return scale2


def read_nvfp4(marker: dict[str, Any], tensors: dict[str, torch.Tensor], where: str):
    """ComfyUI ``nvfp4`` tensors -> ``(NVFP4, QuantizedWeight)`` in the in-memory form (padding dropped)."""
    weight = require(tensors, WEIGHT_SUFFIX, where)
    if weight.dtype != torch.uint8 or weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ComfyFormatError(
            f"{where}{WEIGHT_SUFFIX}: nvfp4 stores a non-empty 2-D uint8 weight, got {weight.dtype} "
            f"{list(weight.shape)}"
        )
    n, k = _logical_shape(marker, weight.shape[0], weight.shape[1], where)
    scale = _read_block_scales(require(tensors, SCALE_SUFFIX, where), n, k // GROUP, where)
    scale2 = _read_global_scale(require(tensors, SCALE2_SUFFIX, where), where)
    return NVFP4, QuantizedWeight(weight[:n].contiguous(), scale, (1, GROUP), scale2)


register_reader("nvfp4", read_nvfp4)
