"""INT8 ConvRot: a block-diagonal regular Hadamard rotation along K, then per-row INT8 codes of the rotated weight.

Name: ``int8_convrot`` (rotation group ``G`` = ``block``, default 256; ``get_format("int8_convrot", block_size=64)``
picks another). Follows comfy-kitchen 0.2.40 (``tensor/int8_utils.py``, ``tensor/int8.py``,
``backends/eager/quantization.py``) and ComfyUI master (``comfy/ops.py``), which load it as stock ``int8_tensorwise``.

* Rotation: ``H`` is the normalised Kronecker power of the 4 x 4 regular Hadamard
  ``[[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]]``, divided by ``sqrt(G)`` (kitchen's
  ``_build_hadamard``); ``G`` a power of 4. Every entry is ``±1 / sqrt(G)``, a power of two, so ``H`` is exact in any
  float dtype. ``H`` is symmetric and orthogonal, hence an involution (``H @ H = I``).
  ``Hblk = blockdiag(H, ..., H)`` (K / G blocks). Weight ``W_rot = W Hblkᵀ`` (``W.reshape(N, K / G, G) @ H.T``),
  activation ``x_rot = x Hblk`` (``x.reshape(-1, K / G, G) @ H``), so ``x_rot @ W_rot.T == x @ W.T``.
* Scale rule (of the rotated weight): one float32 scale per output row, ``max(amax(|W_rot| row) / 127, 1e-8)``;
  codes ``round(W_rot / scale)`` half to even, saturating at ±127. Kitchen's own quantizer clamps its scale at
  ``1e-30`` instead, rotates and divides in the weight's dtype (bf16 for a bf16 weight) and clamps codes to
  [-128, 127]; lrq_ao rotates and divides in float32. Both store the same tensors, so each reads the other's.
* Dequantization: :meth:`~ConvRotFormat.dequantize` is the stored, rotated weight ``codes.float() * scale``;
  :meth:`~ConvRotFormat.dequantize_original` un-rotates it in float32 exactly as kitchen's ``dequantize`` does
  (``(codes.float() * scale).reshape(N, K / G, G) @ H.T``, float32 ``H``): bit-identical on the same device.
* Activations: rotated online, then dynamic per-token INT8 (``amax / 127`` per row); the stored rotated codes run
  through the ordinary INT8 per-row GEMMs. Two rotations of ``x``: :meth:`~ConvRotation.rotate_input` is kitchen's
  (``torch.matmul`` with ``H`` in ``x``'s dtype), for what must match kitchen; :func:`rotate_exact` (a float32
  radix-4 butterfly, :meth:`~ConvRotation.rotate_input_float32`) is what lrq_ao's W8A8 linears quantize, and the
  fused Triton pass ``lrq_ao::rotate_quant_int8`` computes the same stages bit for bit (``lrq_ao.kernels.rotate_quant``
  imports it as its reference: kernels may import formats, formats never import kernels). Quantized from bf16
  activations the two give codes one step apart in 2-11 % of the values; the butterfly's are the more accurate.
  Weight-only linears round the rotation to ``x``'s dtype anyway and use :meth:`~ConvRotation.rotate_input`
  (``lrq_ao.layouts.linear`` says why).
* ComfyUI: ``int8_tensorwise`` with marker ``{"format": "int8_tensorwise", "convrot": true,
  "convrot_groupsize": G}`` (the keys and order ComfyUI's ``_quantized_weight_state_dict`` writes; ``per_row`` is
  not written: ComfyUI neither writes nor reads it, the ``[out, 1]`` scale says per row); ``.weight`` I8
  ``[out, in]`` rotated codes, ``.weight_scale`` F32 ``[out, 1]``. ComfyUI reads ``convrot`` /
  ``convrot_groupsize`` from the marker or from its ``"params"`` object, with 256 when the group is absent, and
  does not check that ``G`` divides ``in``: kitchen's linear raises in the forward. lrq_ao refuses such a weight
  when writing (:meth:`~ConvRotFormat.fallback` says what to write instead) and when reading.
"""

from __future__ import annotations

import functools
import math
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
from lrq_ao.formats.elements import INT8
from lrq_ao.formats.scaled import ScaledFormat

COMFY_NAME = "int8_tensorwise"
DEFAULT_GROUP = 256  # comfy-kitchen's and ComfyUI's default convrot_groupsize (and convert_to_quant's)
GROUPS = (16, 64, 256, 1024)  # powers of 4 lrq_ao writes and reads (kitchen also builds 4 and 4096+)

_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def hadamard(group: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised regular Hadamard ``H`` of size ``group`` (a power of 4): the Kronecker power of the 4 x 4
    regular Hadamard divided by ``sqrt(group)``. Symmetric and orthogonal; bit-identical to comfy-kitchen's
    ``_build_hadamard`` in every float dtype. Cached per (group, dtype, device) in eager code (do not modify the
    result); under ``torch.compile`` built from constants instead, because a cached real tensor cannot enter a
    fake-tensor trace."""
    if torch.compiler.is_compiling() or _tracing():
        return _build_hadamard(group, dtype, torch.device(device))
    return _cached_hadamard(group, dtype, torch.device(device))


def _tracing() -> bool:
    """Whether a fake-tensor or proxy mode is active (AOT autograd and Inductor re-run the tensor subclass's
    dispatch with fake tensors after Dynamo's trace, when ``is_compiling()`` can already be false)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return bool(_get_current_dispatch_mode_stack()) or torch._guards.detect_fake_mode() is not None


@functools.lru_cache(maxsize=32)
def _cached_hadamard(group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _build_hadamard(group, dtype, device)


def _build_hadamard(group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    power = round(math.log(group, 4)) if group >= 4 else 0
    if group < 4 or 4**power != group:
        raise FormatError(f"a regular Hadamard needs a power of 4 (4, 16, 64, 256, 1024, ...), got {group}")
    h4 = torch.tensor(_H4, dtype=torch.float64)
    h = h4
    for _ in range(power - 1):
        h = torch.kron(h, h4)
    return (h / math.sqrt(group)).to(dtype=dtype, device=device)


def _h4_stage(y: torch.Tensor, stride: int) -> torch.Tensor:
    """``H4`` applied along the base-4 digit of stride ``stride`` of the last axis of ``y`` (float32, flat K)."""
    v = y.reshape(*y.shape[:-1], -1, 4, stride)
    x0, x1, x2, x3 = v.unbind(-2)
    s01, d01, s23, d23 = x0 + x1, x0 - x1, x2 + x3, x2 - x3
    return torch.stack((s01 + d23, s01 - d23, d01 + s23, s23 - d01), -2).reshape(y.shape)


def rotate_exact(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x Hblk`` in float32 for ``x`` of shape ``(..., K)``: the rotation lrq_ao's own linears apply.

    A radix-4 butterfly instead of a dense product. Every entry of ``H4`` is ±1 and ``1 / sqrt(G)`` is a power of
    two, so ``x H`` is computed as one stage per base-4 digit of the column index within the group (least
    significant digit, stride 1, first), each applying ``H4`` to the four values ``x0..x3`` whose digit is 0..3 with
    eight float32 additions::

        s01 = x0 + x1   d01 = x0 - x1   s23 = x2 + x3   d23 = x2 - x3
        y0 = s01 + d23  y1 = s01 - d23  y2 = d01 + s23  y3 = s23 - d01       (y = x @ H4, H4 symmetric)

    then one multiplication by ``1 / sqrt(G)`` (exact but for subnormals). Every operation is one IEEE float32
    rounding in a fixed order, so this function, compiled by Inductor or not, and the Triton pass
    ``lrq_ao.kernels.rotate_quant`` (which implements these stages) agree bit for bit; no matmul is involved, whose
    summation order belongs to the BLAS. ``2 log4(G)`` additions per value against ``G`` multiply-adds of
    :meth:`ConvRotation.rotate_input`'s dense product, and within float32 rounding of the float64 product:
    ``|err| <= 2 log4(G) 2**-24 ||x_group||_1 / sqrt(G)``.

    Not comfy-kitchen's rounding: kitchen rotates with ``torch.matmul`` in ``x``'s own dtype (:meth:`rotate_input`
    keeps that behaviour). Raises ``FormatError`` if ``group`` is not a power of 4 in ``GROUPS`` or does not divide K.
    """
    if group not in GROUPS:
        raise FormatError(f"ConvRot rotation group must be one of {GROUPS}, got {group}")
    if x.shape[-1] % group:
        raise FormatError(f"activation has {x.shape[-1]} features, not a multiple of the ConvRot group {group}")
    y = x.float().contiguous()
    stride = 1
    while stride < group:
        y = _h4_stage(y, stride)
        stride *= 4
    return y * (1.0 / math.sqrt(group))


def _per_group(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``x`` of shape ``(..., K)`` times ``h`` in each group of ``G`` consecutive columns (``x Hblk``-style)."""
    k, g = x.shape[-1], h.shape[0]
    return torch.matmul(x.reshape(-1, k // g, g), h).reshape(x.shape)


@dataclass(frozen=True)
class ConvRotation(WeightFormat):
    """The ConvRot rotation every ConvRot format shares (INT8 here, W4A4 in ``lrq_ao.formats.convrot_w4a4``):
    the field ``block`` is the rotation group ``G`` along K, and the ``rotate_*`` hooks apply ``Hblk``.

    The field is called ``block`` so that the user's block size (``get_format(name, block_size)``,
    ``LearnedRoundingConfig.block_size``) chooses the rotation group, as it chooses the block of the ``*_block``
    formats; the quantization group of the ConvRot formats is always one row ``(1, K)``.
    """

    block: int = DEFAULT_GROUP

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block not in GROUPS:
            raise FormatError(
                f"ConvRot rotation group must be one of {GROUPS} (a power of 4 comfy-kitchen builds), got {self.block}"
            )

    @property
    def group(self) -> int:
        """The rotation group ``G`` (the same number as ``block``)."""
        return self.block

    @property
    def has_blocks(self) -> bool:
        return True

    # ---- rotation -------------------------------------------------------------------------------------------

    @property
    def rotates(self) -> bool:
        return True

    def hadamard(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """This format's ``G x G`` rotation ``H`` (see :func:`hadamard`)."""
        return hadamard(self.block, dtype, torch.device(device))

    def _check_k(self, k: int, what: str) -> None:
        if k % self.block:
            raise FormatError(f"{what} has {k} features, not a multiple of the ConvRot group {self.block}")

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W Hblkᵀ``: ``W.reshape(N, K / G, G) @ H.T`` in ``w``'s dtype (kitchen's ``_rotate_weight``)."""
        self._check_k(w.shape[-1], "weight")
        return _per_group(w, self.hadamard(w.dtype, w.device).T)

    def unrotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rotate_weight`. ``H`` is an involution, so this multiplies by ``H.T`` once more, the
        same product (same operands, same layout) as kitchen's ConvRot ``dequantize``."""
        self._check_k(w.shape[-1], "weight")
        return _per_group(w, self.hadamard(w.dtype, w.device).T)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x Hblk``: ``x.reshape(-1, K / G, G) @ H`` in ``x``'s dtype (kitchen's ``_rotate_activation``)."""
        self._check_k(x.shape[-1], "activation")
        return _per_group(x, self.hadamard(x.dtype, x.device))

    def rotate_input_float32(self, x: torch.Tensor) -> torch.Tensor:
        """``x Hblk`` in float32 by the butterfly :func:`rotate_exact`: what lrq_ao's linears multiply with the
        stored codes (bit-identical to the fused Triton pass ``lrq_ao::rotate_quant_int8``)."""
        return rotate_exact(x, self.block)

    @property
    def hadamard_group(self) -> int:
        """``G``: the inputs rotate by the block-diagonal regular Hadamard of :func:`rotate_exact`."""
        return self.block

    def rotate_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """``Hblkᵀ Σ Hblk`` (the second moment of ``x Hblk``) from ``Σ = E[xᵀ x]`` ``(K, K)``, one ``G x G``
        product per block row and column: ``O(K² G)`` work, no dense ``K x K`` rotation built."""
        self._check_k(h.shape[-1], "Hessian")
        rot = self.hadamard(h.dtype, h.device)
        right = _per_group(h, rot)  # Σ Hblk
        return _per_group(right.mT, rot).mT  # (Hblkᵀ (Σ Hblk)) = ((Σ Hblk)ᵀ Hblk)ᵀ


@dataclass(frozen=True)
class ConvRotFormat(ConvRotation):
    """Per-row INT8 codes of the ConvRot-rotated weight; ``block`` is the rotation group ``G`` along K."""

    # ---- identity -------------------------------------------------------------------------------------------

    element = INT8  # class constants, not dataclass fields (no annotations)
    comfy_name = COMFY_NAME
    stock = True

    @property
    def name(self) -> str:
        return "int8_convrot"

    def describe(self) -> str:
        return f"{self.name} (group {self.block})"

    # ---- group shape ----------------------------------------------------------------------------------------

    def block_size_for(self, shape: tuple[int, int] | torch.Size) -> tuple[int, int]:
        n, k = check_2d(shape)
        if k % self.block:
            raise FormatError(
                f"ConvRot group {self.block} does not divide in_features {k} of a weight of shape ({n}, {k}); "
                f"choose a group in {GROUPS} that divides it, or write what ConvRotFormat.fallback gives"
            )
        return (1, k)

    def fallback(self, shape: tuple[int, int] | torch.Size | None = None) -> WeightFormat:
        """What a converter writes for a weight this format refuses: ConvRot with the largest smaller group of
        ``GROUPS`` that divides ``in_features`` (activation outliers are why ConvRot was chosen; a smaller group still
        spreads them, and comfy-kitchen runs every power-of-4 group), else plain per-row INT8 ``int8`` (no rotation).
        Without ``shape``: plain per-row INT8, which stores any shape."""
        if shape is None:
            return ScaledFormat(INT8.storage_dtype, "row")
        _, k = check_2d(shape)
        for group in sorted(GROUPS, reverse=True):
            if group <= self.block and k % group == 0:
                return ConvRotFormat(group)
        return ScaledFormat(INT8.storage_dtype, "row")

    def fallback_reason(self, shape: tuple[int, int] | torch.Size) -> str | None:
        """One line for plans, reports and metadata: why a weight of ``shape`` is written as :meth:`fallback`
        instead (``None`` when this format stores it)."""
        n, k = check_2d(shape)
        if k % self.block == 0:
            return None
        chosen = self.fallback((n, k))
        if isinstance(chosen, ConvRotFormat):
            return (
                f"ConvRot group {self.block} does not divide in_features {k}; written as {chosen.describe()}, the "
                f"largest group of {GROUPS} that divides it (comfy-kitchen's fused CUDA quantizer serves only group "
                f"256; other groups rotate unfused)"
            )
        return (
            f"no ConvRot group of {GROUPS} divides in_features {k}; written as plain per-row int8 (no rotation, "
            f"marker without convrot)"
        )

    # ---- scales ---------------------------------------------------------------------------------------------

    def compute_scales(self, w: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, None]:
        """Per-row ``max(amax(|w_rot|) / 127, 1e-8)`` of the already rotated ``w``, float32 ``(N, 1)``."""
        amax = blocked_amax(w.float(), block_size)
        return (amax / self.element.qmax).clamp_min(MIN_SCALE), None

    # ---- activation pairing ---------------------------------------------------------------------------------

    def dynamic_activation(self, block_size: tuple[int, int], shape: tuple[int, int]) -> tuple[str, int]:
        """Per-token INT8 of the rotated activation (comfy-kitchen's ``int8_linear`` with ``convrot``)."""
        return ("row", 0)

    @property
    def kernel_dtype(self) -> torch.dtype:
        """INT8: the linear rotates ``x`` and runs the ordinary INT8 per-row kernels on the stored rotated codes."""
        return torch.int8

    # ---- ComfyUI --------------------------------------------------------------------------------------------

    def comfy_marker_fields(self, block_size: tuple[int, int], shape: tuple[int, int]) -> dict[str, Any]:
        return {"convrot": True, "convrot_groupsize": int(self.block)}

    def comfy_tensors(self, qw: QuantizedWeight, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        n, k = check_2d(shape)
        self.block_size_for((n, k))
        if tuple(qw.scale.shape) != (n, 1):
            raise ComfyFormatError(f"scale grid has shape {tuple(qw.scale.shape)}, expected ({n}, 1) for {self.name}")
        return {
            WEIGHT_SUFFIX: qw.qdata.detach().contiguous(),
            SCALE_SUFFIX: qw.scale.detach().to(torch.float32).reshape(n, 1).contiguous(),
        }


FORMATS: dict[str, ConvRotFormat] = {"int8_convrot": ConvRotFormat()}


# ---- reading ComfyUI files --------------------------------------------------------------------------------------


def _marker_value(marker: dict[str, Any], key: str, default: Any) -> Any:
    """``marker[key]``, else ``marker["params"][key]``, else ``default`` (ComfyUI's lookup order)."""
    params = marker.get("params")
    params = params if isinstance(params, dict) else {}
    return marker.get(key, params.get(key, default))


def is_convrot(marker: dict[str, Any]) -> bool:
    """Whether an ``int8_tensorwise`` marker says ConvRot (truthy ``convrot``, as ComfyUI tests it)."""
    return bool(_marker_value(marker, "convrot", False))


def _row_scales(stored: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """The float32 ``(n, 1)`` grid of a stored per-row scale: ``[out, 1]`` as written; ``[out]`` (some tools) and a
    scalar ``[]`` / ``[1]`` (same value each row) are read too, dequantizing identically."""
    if not stored.dtype.is_floating_point or stored.dtype.itemsize == 1:
        raise ComfyFormatError(f"{name}: scale dtype {stored.dtype} is not a float scale for ConvRot int8")
    shape = tuple(stored.shape)
    if shape in ((n, 1), (n,)):
        return stored.detach().to(torch.float32).reshape(n, 1)
    if shape in ((), (1,)):
        return stored.detach().to(torch.float32).reshape(1, 1).expand(n, 1).contiguous()
    raise ComfyFormatError(
        f"{name}: scale shape {list(shape)} does not fit ConvRot int8_tensorwise for {n} rows; expected [{n}, 1]"
    )


def read_convrot(marker: dict[str, Any], tensors: dict[str, torch.Tensor], where: str):
    """Reader of ``int8_tensorwise`` layers whose marker says ``convrot`` (see ``lrq_ao.formats.comfy``)."""
    group = _marker_value(marker, "convrot_groupsize", DEFAULT_GROUP)
    if isinstance(group, bool) or not isinstance(group, int):
        raise ComfyFormatError(f"{where}{MARKER_SUFFIX}: convrot_groupsize {group!r} is not an integer")
    qdata = require(tensors, WEIGHT_SUFFIX, where)
    if qdata.dtype != INT8.storage_dtype or qdata.dim() != 2:
        raise ComfyFormatError(
            f"{where}{WEIGHT_SUFFIX}: expected a 2-D {INT8.storage_dtype} tensor for ConvRot {COMFY_NAME}, got "
            f"{qdata.dtype} of shape {list(qdata.shape)}"
        )
    n, k = int(qdata.shape[0]), int(qdata.shape[1])
    try:
        fmt = ConvRotFormat(group)
        block_size = fmt.block_size_for((n, k))
    except FormatError as exc:
        raise ComfyFormatError(f"{where}{WEIGHT_SUFFIX}: {exc}") from None
    scale = _row_scales(require(tensors, SCALE_SUFFIX, where), n, f"{where}{SCALE_SUFFIX}")
    return fmt, QuantizedWeight(qdata, scale, block_size)


register_reader(COMFY_NAME, read_convrot, when=is_convrot)
