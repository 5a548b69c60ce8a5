"""MXFP8 (OCP Microscaling, ComfyUI ``mxfp8``, comfy-kitchen ``TensorCoreMXFP8Layout``): FP8 e4m3fn codes, one
power-of-two scale per 32 consecutive inputs of a row, the scale stored as an E8M0 byte.

Name: ``mxfp8``. Group shape ``(1, 32)``; a weight whose ``in_features`` is not a multiple of 32 is refused (a
converter falls back). Rules, following comfy-kitchen 0.2.40's eager quantizer (``backends/eager/quantization.py``
``quantize_mxfp8`` / ``dequantize_mxfp8``, ``float_utils.to_blocked`` / ``e8m0_to_f32``):

* Scale rule, per block of 32: ``amax = max |w|``, ``e = clamp(ceil(log2(max(amax / 448, 2^-127))) + 127, 0, 254)``
  in float32 (``torch.log2``), ``scale = 2^(e - 127)``: the smallest power of two that keeps the block within ±448,
  so round-to-nearest never saturates (the OCP spec's ``floor(log2 amax) - 8`` can). An all-zero block gets byte 0.
* Codes: ``clamp(w / scale, ±448)`` cast to float8_e4m3fn (round half to even; ``-0.0`` kept, as kitchen does).
  Dequantize ``codes.float() * scale`` in float32: exact, since the scale is a power of two.
* In memory: ``qdata`` float8_e4m3fn ``(N, K)`` (unpadded), ``scale`` float32 ``(N, K / 32)`` of exact powers of
  two. E8M0 byte ``b`` stands for ``2^(b - 127)``; byte 0 is held as ``2^-127`` (its OCP value).
* Deliberate differences from kitchen, both confined to blocks kitchen cannot represent:
  a nonzero block with ``amax <= 448 * 2^-127`` (about 2.6e-36) gets byte 1 here, where kitchen writes byte 0,
  which its own dequantization decodes to ``0.0`` (dividing by that zero stores ±448, or NaN for a zero element,
  and dequantizes to 0 or NaN); and an all-zero block whose elements are ``-0.0`` stores ``+0`` codes as kitchen
  does (it zeroes such blocks) rather than ``0x80``. Everywhere else the codes and scale bytes are kitchen's, bit
  for bit (tested on CPU against the eager quantizer; kitchen's Triton kernel uses the same formula with the
  device's log2, and its CUDA kernel ships compiled, unchecked here).
* ComfyUI tensors: ``.weight`` F8_E4M3 ``[roundup(N, 32), K]`` (rows padded with zero codes, as kitchen's quantizer
  pads them); ``.weight_scale`` U8 ``[roundup(N, 128), roundup(K / 32, 4)]``, the E8M0 bytes in cuBLAS's
  block-scaling-factor layout (128 x 4 tiles; byte ``S[r, c]`` at flat offset ``(r // 128 * C / 4 + c // 4) * 512 +
  r % 32 * 16 + r % 128 // 32 * 4 + c % 4``; padding bytes 0). ComfyUI views the bytes as ``float8_e8m0fnu`` and
  takes the logical shape from the model's module, not the file; the marker carries ``orig_shape`` so that a
  reader without the model can drop the padded rows.
* Activations: no dynamic mode. MX tensor cores are Blackwell-only (kitchen's ``MIN_SM_VERSION = (10, 0)``); on
  Hopper and older the weight is dequantized. ``kernel_dtype`` is ``None`` so that lrq_ao's 8-bit FP8 kernels,
  which take per-tensor, per-row or square-block float32 scales, never receive these codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from lrq_ao.formats.base import (
    FormatError,
    QuantizedWeight,
    WeightFormat,
    blocked_amax,
    check_2d,
    expand_scale,
)
from lrq_ao.formats.comfy import SCALE_SUFFIX, WEIGHT_SUFFIX, ComfyFormatError, register_reader, require
from lrq_ao.formats.elements import FP8_E4M3, Element

BLOCK = 32
E8M0_BIAS = 127
E8M0_MAX_BYTE = 254  # 255 is E8M0's NaN
ZERO_BLOCK_SCALE = 2.0**-E8M0_BIAS  # the in-memory value of byte 0; only all-zero blocks carry it
ROW_PAD = 32  # kitchen pads the stored weight's rows to a multiple of this
TILE_ROWS, TILE_COLS = 128, 4  # cuBLAS block-scaling-factor tile


def _roundup(x: int, m: int) -> int:
    return -(-x // m) * m


# ---- E8M0 -----------------------------------------------------------------------------------------------------------


def e8m0_exponents(amax: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 exponents (int32) of blocks with maxima ``amax``: kitchen's
    ``clamp(ceil(log2(max(amax / 448, 2^-127))) + 127, 0, 254)`` in float32, raised to 1 for nonzero blocks (kitchen's
    byte 0 decodes to zero) and 0 for all-zero blocks."""
    ratio = (amax.float() / FP8_E4M3.qmax).clamp_min(ZERO_BLOCK_SCALE)
    e = (torch.ceil(torch.log2(ratio)).to(torch.int32) + E8M0_BIAS).clamp(0, E8M0_MAX_BYTE)
    return torch.where(amax == 0, 0, e.clamp_min(1))


def scales_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """float32 ``2^(b - 127)`` of E8M0 bytes (byte 0 gives ``2^-127``); exact, built from the bits."""
    e = b.to(torch.int32)
    normal = (e.clamp_min(1) << 23).view(torch.float32)  # 2^(e-127) for e >= 1
    return torch.where(e == 0, ZERO_BLOCK_SCALE, normal)


def bytes_from_scales(scale: torch.Tensor, name: str = "scale") -> torch.Tensor:
    """E8M0 bytes (uint8) of a float32 grid of powers of two in ``[2^-127, 2^127]``; ``FormatError`` naming ``name``
    for any other value."""
    s = scale.detach().float()
    mantissa, exponent = torch.frexp(s)
    e = exponent - 1 + E8M0_BIAS
    ok = torch.isfinite(s) & (mantissa == 0.5) & (e >= 0) & (e <= E8M0_MAX_BYTE)
    if not bool(ok.all()):
        bad = s[~ok][0].item()
        raise FormatError(
            f"{name}: MXFP8 scales must be powers of two in [2^-127, 2^127], found {bad!r}; compute them with "
            f"MXFP8Format.compute_scales"
        )
    return e.to(torch.uint8)


# ---- cuBLAS block-scaling-factor layout -----------------------------------------------------------------------------


def swizzled_shape(rows: int, cols: int) -> tuple[int, int]:
    """Shape of the swizzled form of a ``(rows, cols)`` byte grid: both padded to whole 128 x 4 tiles."""
    return _roundup(rows, TILE_ROWS), _roundup(cols, TILE_COLS)


def swizzle(grid: torch.Tensor) -> torch.Tensor:
    """A ``(rows, cols)`` byte grid in cuBLAS's block-scaling-factor layout, viewed ``swizzled_shape(rows, cols)``.

    Each 128 x 4 tile (row ``128 t + 32 q + p``, column ``4 u + j``) is stored as 32 lines of 16 bytes: line ``p``
    holds ``(q, j)`` at ``4 q + j``; tiles follow in row-major tile order. Padding bytes are 0."""
    rows, cols = grid.shape
    big_r, big_c = swizzled_shape(rows, cols)
    padded = F.pad(grid, (0, big_c - cols, 0, big_r - rows))
    tiles = padded.reshape(big_r // TILE_ROWS, 4, 32, big_c // TILE_COLS, 4)  # (t, q, p, u, j)
    return tiles.permute(0, 3, 2, 1, 4).reshape(big_r, big_c).contiguous()  # (t, u, p, q, j)


def unswizzle(stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle`: the ``(rows, cols)`` byte grid (padding dropped)."""
    big_r, big_c = swizzled_shape(rows, cols)
    tiles = stored.reshape(big_r // TILE_ROWS, big_c // TILE_COLS, 32, 4, 4)  # (t, u, p, q, j)
    return tiles.permute(0, 3, 2, 1, 4).reshape(big_r, big_c)[:rows, :cols]


# ---- the format -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MXFP8Format(WeightFormat):
    """MXFP8: float8_e4m3fn codes, one E8M0 power-of-two scale per ``1 x 32`` group (see the module docstring)."""

    element: ClassVar[Element] = FP8_E4M3
    comfy_name: ClassVar[str] = "mxfp8"
    stock: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return "mxfp8"

    def describe(self) -> str:
        return "mxfp8 (1x32, E8M0 scales)"

    # ---- group shape and scales -----------------------------------------------------------------------------

    def block_size_for(self, shape: tuple[int, int] | torch.Size) -> tuple[int, int]:
        n, k = check_2d(shape)
        if k % BLOCK:
            raise FormatError(
                f"MXFP8 groups 32 inputs per scale, and in_features {k} of a ({n}, {k}) weight is not a multiple "
                f"of 32; leave this layer to a per-row format"
            )
        return (1, BLOCK)

    def compute_scales(self, w: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, None]:
        """Kitchen's E8M0 scales (see :func:`e8m0_exponents`) as exact float32 powers of two, ``(N, K / 32)``."""
        return scales_from_bytes(e8m0_exponents(blocked_amax(w, block_size))), None

    def round_values(
        self, w: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor | None, block_size: tuple[int, int]
    ) -> torch.Tensor:
        """``clamp(w / scale, ±448)`` to float8_e4m3fn; blocks with the zero-block scale get ``+0`` codes."""
        x = w.float() / expand_scale(self.effective_scale(scale, scale2), block_size)
        x = x.masked_fill(expand_scale(scale <= ZERO_BLOCK_SCALE, block_size), 0.0)
        return self.element.round(x)

    # ---- activations and kernels ----------------------------------------------------------------------------

    def dynamic_activation(self, block_size: tuple[int, int], shape: tuple[int, int]) -> str:
        return (
            "format mxfp8 has no dynamic activation quantization here: MX tensor cores are Blackwell-only (SM 10.0) "
            "and lrq_ao runs it by dequantizing the weight; use activation='weight_only'"
        )

    @property
    def kernel_dtype(self) -> torch.dtype | None:
        """``None``: lrq_ao's FP8 kernels take per-tensor, per-row or square-block scales, not 1 x 32 groups."""
        return None

    # ---- ComfyUI --------------------------------------------------------------------------------------------

    def comfy_marker_fields(self, qw_block_size: tuple[int, int], shape: tuple[int, int]) -> dict[str, Any]:
        """``orig_shape``, always: the stored weight's rows may be padded to a multiple of 32."""
        n, k = check_2d(shape)
        return {"orig_shape": [n, k]}

    def comfy_tensors(self, qw: QuantizedWeight, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``.weight`` (float8_e4m3fn, rows zero-padded to a multiple of 32) and ``.weight_scale`` (uint8 E8M0,
        swizzled); byte for byte what kitchen's quantizer returns for the same codes and scales."""
        n, k = check_2d(shape)
        if tuple(qw.block_size) != self.block_size_for((n, k)):
            raise ComfyFormatError(f"mxfp8 weight has block size {qw.block_size}, expected (1, {BLOCK})")
        if qw.qdata.dtype != self.element.storage_dtype or tuple(qw.qdata.shape) != (n, k):
            raise ComfyFormatError(
                f"mxfp8 codes are {qw.qdata.dtype} {tuple(qw.qdata.shape)}, expected float8_e4m3fn {(n, k)}"
            )
        if tuple(qw.scale.shape) != (n, k // BLOCK):
            raise ComfyFormatError(f"mxfp8 scale grid has shape {tuple(qw.scale.shape)}, expected {(n, k // BLOCK)}")
        grid = bytes_from_scales(qw.scale, "mxfp8 scale grid")
        codes = qw.qdata.detach().contiguous().view(torch.uint8)
        live = (codes & 0x7F).reshape(n, k // BLOCK, BLOCK).amax(-1) != 0
        if bool((live & (grid == 0)).any()):
            raise ComfyFormatError(
                "mxfp8 block with E8M0 byte 0 (scale 2^-127) holds nonzero codes, but ComfyUI decodes byte 0 as "
                "0.0; requantize with MXFP8Format.compute_scales"
            )
        weight = F.pad(codes, (0, 0, 0, _roundup(n, ROW_PAD) - n)).view(self.element.storage_dtype)
        return {WEIGHT_SUFFIX: weight.contiguous(), SCALE_SUFFIX: swizzle(grid)}

    def comfy_tensor_specs(self, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        n, k = check_2d(shape)
        self.block_size_for((n, k))
        return {
            WEIGHT_SUFFIX: (self.element.storage_dtype, (_roundup(n, ROW_PAD), k)),
            SCALE_SUFFIX: (torch.uint8, swizzled_shape(n, k // BLOCK)),
        }


MXFP8 = MXFP8Format()
FORMATS: dict[str, MXFP8Format] = {"mxfp8": MXFP8}


# ---- reading ComfyUI files ------------------------------------------------------------------------------------------


def _logical_shape(marker: dict[str, Any], stored: tuple[int, int], name: str) -> tuple[int, int]:
    """``(N, K)`` from the marker's ``orig_shape`` (else the stored shape), checked against the stored weight."""
    rows, k = stored
    orig = marker.get("orig_shape", [rows, k])
    if not (isinstance(orig, list | tuple) and len(orig) == 2 and all(isinstance(d, int) and d > 0 for d in orig)):
        raise ComfyFormatError(f"{name}: marker orig_shape {orig!r} is not [out_features, in_features]")
    n = int(orig[0])
    if int(orig[1]) != k or rows not in (n, _roundup(n, ROW_PAD)):
        raise ComfyFormatError(
            f"{name}: stored shape {[rows, k]} does not fit orig_shape {list(orig)}; mxfp8 stores "
            f"[{_roundup(n, ROW_PAD)}, {orig[1]}] (rows padded to a multiple of {ROW_PAD})"
        )
    if k % BLOCK:
        raise ComfyFormatError(f"{name}: in_features {k} is not a multiple of {BLOCK}, which mxfp8 requires")
    return n, k


def _read(marker: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> tuple[MXFP8Format, QuantizedWeight]:
    """Un-pad and un-swizzle a ComfyUI ``mxfp8`` layer. Byte-0 blocks read as zero codes (ComfyUI decodes them to
    0.0); a file without ``orig_shape`` keeps any padded rows (ComfyUI takes the shape from the model instead)."""
    wname, sname = f"{where}{WEIGHT_SUFFIX}", f"{where}{SCALE_SUFFIX}"
    qdata = require(tensors, WEIGHT_SUFFIX, where)
    if qdata.dtype != FP8_E4M3.storage_dtype or qdata.dim() != 2:
        raise ComfyFormatError(
            f"{wname}: {qdata.dtype} of shape {list(qdata.shape)} does not match format mxfp8 (expected a 2-D "
            f"{FP8_E4M3.storage_dtype} weight)"
        )
    n, k = _logical_shape(marker, (int(qdata.shape[0]), int(qdata.shape[1])), wname)
    stored = require(tensors, SCALE_SUFFIX, where)
    if stored.dtype not in (torch.uint8, torch.float8_e8m0fnu):
        raise ComfyFormatError(f"{sname}: dtype {stored.dtype} is not an E8M0 scale (expected uint8 or float8_e8m0fnu)")
    expected = swizzled_shape(n, k // BLOCK)
    if tuple(stored.shape) != expected:
        raise ComfyFormatError(
            f"{sname}: scale shape {list(stored.shape)} does not fit format mxfp8 for a weight of shape [{n}, {k}]; "
            f"expected the swizzled {list(expected)}"
        )
    grid = unswizzle(stored.contiguous().view(torch.uint8), n, k // BLOCK)
    if bool((grid > E8M0_MAX_BYTE).any()):
        raise ComfyFormatError(f"{sname}: holds E8M0 byte 255 (NaN)")
    codes = qdata[:n].contiguous().view(torch.uint8).reshape(n, k // BLOCK, BLOCK)
    if bool(((codes & 0x7F) == 0x7F).any()):
        raise ComfyFormatError(f"{wname}: holds float8_e4m3fn NaN codes")
    codes = codes.masked_fill((grid == 0).unsqueeze(-1), 0).reshape(n, k).view(FP8_E4M3.storage_dtype)
    return MXFP8, QuantizedWeight(codes, scales_from_bytes(grid), (1, BLOCK))


register_reader(MXFP8Format.comfy_name, _read)
