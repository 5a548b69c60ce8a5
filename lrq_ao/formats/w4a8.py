"""W4A8: ConvRot-rotated weight, 4-bit codes into a 16-level codebook, fp8 group scales, a float32 scale per row.

Name ``w4a8`` (ComfyUI ``asym_w4a8_int8``, comfy-kitchen layout ``AsymW4A8Int8Layout``). ComfyUI loads it since the
upstream commit 344b4398 "Support asym w4a8_int (#15308)"; the loader and writer quoted here were read in the
Comfy-Org/ComfyUI snapshot 0271a469 (``comfy/ops.py`` ``_load_quantized_module`` / ``_quantized_weight_state_dict``,
``comfy/quant_ops.py``); the ``silveroxides/ComfyUI`` master mirror does not have the format yet. The rules follow
comfy-kitchen 0.2.40 (``tensor/w4a8_int8.py``, ``tensor/w4a8_packed.py``, ``backends/eager/w4a8_int8.py``) and are
checked against it by ``tests/formats/test_w4a8.py``.

* Rotation: ConvRot with group ``G`` = ``block`` (``convrot_groupsize``, default 256), exactly as ``int8_convrot``
  (:class:`~lrq_ao.formats.convrot.ConvRotation`): the codes describe ``W_rot = W Hblkᵀ``.
* Codes: index ``c`` into a table of ``L`` levels. The default table is kitchen's fixed 16-level Lloyd-Max codebook
  for a group normalised by its amax (:data:`LLOYD_MAX_16`, sorted, ±0.98); a file may carry another 16-level
  codebook (kitchen fits one by k-means when the rotated weight is heavy-tailed). Two variants without a codebook
  are read: uniform 4-bit (level ``c - 8``) and uniform 6-bit (level ``c - 32``), told apart by the packed row
  width (``K / 2`` bytes at 4 bits, ``3K / 4`` at 6).
* Decode (kitchen's ``_dequant_int4_grouped_to_int8``): one INT8 value per element, then a per-row scale::

      i8[n, k]   = clamp(round_half_even(level[c[n, k]] * s_rel[n, k // g]), -127, 127)       (float32)
      W_rot[n,k] = i8[n, k] * s_channel[n]                                                   (float32)
      W          = W_rot Hblkᵀ, un-rotated in the output dtype (kitchen rotates back in bf16 for bf16)

  ``g`` is ``group`` (``group_size``, default 16), ``s_rel`` an fp8 e4m3fn value per 1 x g group, ``s_channel``
  a float32 per row. So the values a group can take are ``s_channel * {round(level_i * s_rel)}``: an INT8 grid
  that differs from group to group and is NOT ``level * scale`` (the rounding to an integer sits between the two
  scales). :meth:`W4A8Format.group_levels` / :meth:`W4A8Format.candidate_values` give that grid exactly.
* Scale rule (lrq_ao, round to nearest): per group ``a = amax|w_rot|`` (the table's unit: its levels are fractions
  of the group amax), ``s_channel = max(max_g a * max|level| / 127, 1e-8)`` per row, ``s_rel = fp8(a /
  s_channel)``, then each element takes the code whose INT8 level is nearest ``w_rot / s_channel`` (ties to the
  lower code). Kitchen's quantizer also refines the group scale (two least-squares passes) and may fit its own
  codebook; see :meth:`W4A8Format.scales`. Both produce tensors the other reads.
* Packing (kitchen ``_pack_codes``), int8 storage: byte ``j`` of a row is ``c[2j] | c[2j + 1] << 4`` (the even
  column in the LOW nibble, as ``convrot_w4a4``, the opposite of NVFP4). At 6 bits that nibble plane of the low
  4 bits is followed by a ``K / 4``-byte plane of the top 2 bits, column ``c`` at bits ``2 (c % 4)`` of byte
  ``c // 4``.
* Activations: kitchen's linear decodes to the INT8 grid and calls its INT8 linear with ConvRot: the activation is
  rotated online and quantized per token to INT8 (:meth:`W4A8Format.dynamic_activation`).
* In memory (:class:`~lrq_ao.formats.base.QuantizedWeight`): ``qdata`` int8 ``(N, K * bits / 8)`` packed,
  ``scale`` = ``s_rel`` as the float32 grid ``(N, K / g)`` (exact fp8 values), ``block_size`` ``(1, g)``,
  ``scale2`` ``None``, ``extra["s_channel"]`` float32 ``(N,)``.
* ComfyUI file (kitchen ``state_dict_tensors``): ``.weight`` I8 ``(N, K / 2)``, ``.weight_s_rel`` F8_E4M3
  ``(N, K / g)``, ``.weight_s_channel`` F32 ``(N,)``, ``.weight_codebook`` F32 ``(16,)``; marker
  ``{"format": "asym_w4a8_int8", "group_size": g, "convrot_groupsize": G}``. ComfyUI reads ``group_size`` and
  ``convrot_groupsize`` from the marker or its ``"params"`` (defaults 16 and 256), views a uint8 ``weight_s_rel``
  as fp8, and treats ``weight_codebook`` as optional: without it kitchen decodes UNIFORM codes, so the codebook
  must be written. It never reads ``weight_correction`` (kitchen's asymmetric variant), so lrq_ao refuses such
  layers. Kitchen requires ``K % 16 == 0``, ``K % g == 0``, ``K % G == 0``, ``g >= 4`` dividing 16 or a multiple
  of 16; there is no padding.

Learned rounding: the engine (``lrq_ao.rounding``) chooses among ONE sorted grid ``element.values()`` times a fixed
effective scale. This format's grid is per group, so :meth:`W4A8Format.effective_scale` and
:meth:`W4A8Format.compute_scales` refuse, rather than give a scale under which ``values[idx] * scale`` would not be
the dequantized weight. What the engine needs is a per-group grid: ``candidate_values(qw)`` ``(N, K / g, L)``
(sorted along ``L`` when the table is sorted, possibly with repeated values when ``s_rel`` is small), indices
chosen per element within its group's row of that tensor, and :meth:`W4A8Format.from_codes` to store them.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from lrq_ao.formats.base import (
    MIN_SCALE,
    FormatError,
    QuantizedWeight,
    check_2d,
    check_finite,
)
from lrq_ao.formats.comfy import (
    MARKER_SUFFIX,
    WEIGHT_SUFFIX,
    ComfyFormatError,
    register_reader,
    require,
)
from lrq_ao.formats.convrot import GROUPS, ConvRotation
from lrq_ao.formats.elements import FP8_DTYPE, Element, register_element

COMFY_NAME = "asym_w4a8_int8"
S_REL_SUFFIX = ".weight_s_rel"
S_CHANNEL_SUFFIX = ".weight_s_channel"
CODEBOOK_SUFFIX = ".weight_codebook"
CORRECTION_SUFFIX = ".weight_correction"
S_CHANNEL = "s_channel"  # the QuantizedWeight.extra key

DEFAULT_GROUP = 16  # kitchen's and ComfyUI's default group_size
DEFAULT_ROTATION = 256  # kitchen's and ComfyUI's default convrot_groupsize
INT8_LIMIT = 127.0
FP8_MAX = 448.0

# comfy-kitchen 0.2.40 w4a8_packed._FIXED_LUT: Lloyd-Max levels for a Gaussian group normalised by its amax, rounded
# to float32 (the tuple holds the float32 values, so it equals a codebook read back from a file).
_LLOYD_MAX_DECIMALS = (
    -0.980602, -0.794529, -0.638165, -0.500986, -0.377321, -0.263187, -0.155210, -0.050720,
    0.052541, 0.156985, 0.265284, 0.379533, 0.502636, 0.638953, 0.794876, 0.980671,
)  # fmt: skip
LLOYD_MAX_16: tuple[float, ...] = tuple(torch.tensor(_LLOYD_MAX_DECIMALS, dtype=torch.float32).tolist())


def _uniform(bits: int) -> tuple[float, ...]:
    """The levels of uniform codes without a codebook: code ``c`` stands for ``c - 2^(bits-1)``."""
    half = 1 << (bits - 1)
    return tuple(float(c - half) for c in range(2 * half))


# ---- the element: codes that index a level table --------------------------------------------------------------


class LevelCodes(Element):
    """Codes ``0 .. L-1`` standing for the levels of a table (codebook or uniform), stored int8, packed as kitchen
    packs them (4 bits: two a byte, even column low; 6 bits: a nibble plane, then a plane of the top 2 bits).

    ``values()`` is the sorted table; the value a code finally decodes to also depends on the group's ``s_rel``
    (see the module docstring), which the element cannot know.
    """

    storage_dtype = torch.int8
    kernel_dtype = None

    def __init__(self, name: str, levels: tuple[float, ...], bits: int) -> None:
        self.name = name
        self.levels = levels
        self.bits = bits
        self.qmax = max(abs(v) for v in levels)

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The levels in code order, float32."""
        return torch.tensor(self.levels, dtype=torch.float32, device=device)

    @functools.cached_property
    def _sorted(self) -> torch.Tensor:
        return torch.unique(self.table()) + 0.0

    def values(self) -> torch.Tensor:
        return self._sorted

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """The code of the level nearest each value (ties to the lower code), int32."""
        return nearest_code(x.float(), self.table(x.device))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.table(codes.device)[codes.long()]

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_codes(codes, self.bits)

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        return unpack_codes(stored, self.bits)


def nearest_code(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Per element of ``x`` the index of the nearest entry of ``levels`` (``(L,)``, or ``x``'s leading shape plus
    ``L`` for a per-group table broadcast against ``x``'s last axis); ties keep the lowest index. int32.

    One pass per level, keeping the best so far (memory twice ``x``, whatever ``L``); exact, order-independent."""
    per_group = levels.dim() > 1
    best = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    best_err = torch.full(x.shape, float("inf"), dtype=torch.float32, device=x.device)
    for i in range(levels.shape[-1]):
        level = levels[..., i : i + 1] if per_group else levels[i]
        err = (x - level).abs()
        closer = err < best_err
        best = torch.where(closer, torch.full_like(best, i), best)
        best_err = torch.where(closer, err, best_err)
    return best


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(N, K)`` codes -> int8 ``(N, K * bits / 8)``: byte ``j`` = ``c[2j] | c[2j+1] << 4`` of the low 4 bits; at 6
    bits followed by ``K / 4`` bytes, byte ``b`` = ``sum_i ((c[4b+i] >> 4) & 3) << 2i``."""
    n, k = codes.shape
    if k % (4 if bits == 6 else 2):
        raise FormatError(f"cannot pack {k} codes per row at {bits} bits (shape {tuple(codes.shape)})")
    c = codes.to(torch.int32)
    nibbles = (c[:, 0::2] & 0xF) | ((c[:, 1::2] & 0xF) << 4)
    if bits == 4:
        return nibbles.to(torch.uint8).view(torch.int8)
    top = torch.zeros((n, k // 4), dtype=torch.int32, device=codes.device)
    for i in range(4):
        top |= ((c[:, i::4] >> 4) & 0x3) << (2 * i)
    return torch.cat([nibbles, top], dim=1).to(torch.uint8).view(torch.int8)


def unpack_codes(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 codes ``(N, K)``."""
    n, cols = stored.shape
    k = cols * 8 // bits
    raw = stored.view(torch.uint8).to(torch.int32)
    nibbles = raw[:, : k // 2]
    codes = torch.stack([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(n, k)
    if bits == 6:
        top = raw[:, k // 2 :]
        high = torch.stack([(top >> (2 * i)) & 0x3 for i in range(4)], dim=-1).reshape(n, k)
        codes = codes | (high << 4)
    return codes


@functools.lru_cache(maxsize=64)
def level_codes(codebook: tuple[float, ...] | None, bits: int) -> LevelCodes:
    """The element of a table: a codebook (16 float32 levels) or, with ``None``, uniform ``bits``-bit codes."""
    if codebook is None:
        return LevelCodes(f"w4a8_uniform{bits}", _uniform(bits), bits)
    if codebook == LLOYD_MAX_16:
        return LevelCodes("w4a8_lloyd_max16", codebook, bits)
    digest = hashlib.sha1(torch.tensor(codebook, dtype=torch.float32).numpy().tobytes()).hexdigest()[:12]
    return LevelCodes(f"w4a8_codebook_{digest}", codebook, bits)


register_element(level_codes(LLOYD_MAX_16, 4))


# ---- the format -------------------------------------------------------------------------------------------------


def _group_refusal(group: int, k: int | None = None) -> str | None:
    """Kitchen's shape rule (``validate_w4a8_weight_shape``) for ``group`` and, with ``k``, for in_features."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 4 or (16 % group and group % 16):
        return f"group_size must be an integer >= 4 that divides 16 or is a multiple of 16, got {group!r}"
    if k is not None and (k % 16 or k % group):
        return f"in_features {k} must be a multiple of 16 and of group_size {group}"
    return None


@dataclass(frozen=True)
class W4A8Format(ConvRotation):
    """ConvRot group ``block`` (``convrot_groupsize``), quantization group ``group`` (``group_size``) along K,
    ``codebook`` (16 float32 levels, or ``None`` for uniform codes) and ``bits`` (4, or 6 for the uniform 6-bit
    variant, read only). See the module docstring.

    ``block`` is the field the user's block size sets (``get_format("w4a8", block_size=64)``), as for
    ``int8_convrot``: it picks the rotation group; the quantization group stays 16.
    """

    block: int = DEFAULT_ROTATION
    group: int = DEFAULT_GROUP
    codebook: tuple[float, ...] | None = LLOYD_MAX_16
    bits: int = 4

    def rounding_refusal(self) -> str:
        return (
            "w4a8 decodes round(level * s_rel) per group, so its candidate values differ from group to group; "
            "learned rounding needs one grid times one scale (see candidate_values for what it would need)"
        )

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block not in GROUPS:
            raise FormatError(f"w4a8 ConvRot group must be one of {GROUPS}, got {self.block!r}")
        why = _group_refusal(self.group)
        if why:
            raise FormatError(f"w4a8 {why}")
        if self.bits not in (4, 6):
            raise FormatError(f"w4a8 codes are 4 or 6 bits, got {self.bits!r}")
        if self.codebook is not None:
            book = tuple(float(v) for v in torch.tensor(self.codebook, dtype=torch.float32).tolist())
            if self.bits != 4 or len(book) != 16:
                raise FormatError(f"a w4a8 codebook has 16 levels of 4-bit codes, got {len(book)} at {self.bits} bits")
            if not all(abs(v) < float("inf") for v in book):
                raise FormatError("w4a8 codebook levels must be finite")
            object.__setattr__(self, "codebook", book)  # exactly float32 values: equal to what a file holds
        if self.bits == 6 and self.group % 16:
            raise FormatError(f"6-bit w4a8 needs group_size a multiple of 16, got {self.group}")

    # ---- identity -------------------------------------------------------------------------------------------

    comfy_name = COMFY_NAME
    stock = True

    @property
    def element(self) -> LevelCodes:  # type: ignore[override]
        return level_codes(self.codebook, self.bits)

    @property
    def name(self) -> str:
        if self.bits == 6:
            return "w6a8_uniform"
        return "w4a8" if self.codebook is not None else "w4a8_uniform"

    def describe(self) -> str:
        table = "Lloyd-Max codebook" if self.codebook == LLOYD_MAX_16 else ("codebook" if self.codebook else "uniform")
        return f"{self.name} ({table}, fp8 scale per 1x{self.group}, fp32 per row, ConvRot {self.block})"

    @property
    def has_blocks(self) -> bool:
        return True

    @property
    def writable(self) -> bool:
        """Whether lrq_ao quantizes to this variant (the 4-bit codebook ones); the uniform variants are read only."""
        return self.bits == 4 and self.codebook is not None

    # ---- group shape ----------------------------------------------------------------------------------------

    def block_size_for(self, shape: tuple[int, int] | torch.Size) -> tuple[int, int]:
        n, k = check_2d(shape)
        why = _group_refusal(self.group, k)
        if why is None and k % self.block:
            why = f"ConvRot group {self.block} does not divide in_features {k}"
        if why is None and self.bits == 6 and k % 32:
            why = f"6-bit rows need in_features a multiple of 32, got {k}"
        if why:
            raise FormatError(f"w4a8 cannot store a weight of shape ({n}, {k}): {why}; leave it in high precision")
        return (1, self.group)

    # ---- scales and rounding --------------------------------------------------------------------------------

    def _no_single_scale(self) -> FormatError:
        return FormatError(
            f"{self.name} has no single effective scale: a group's values are s_channel * round(level * s_rel), "
            f"a different INT8 grid per group; use W4A8Format.scales / quantize / candidate_values (learned "
            f"rounding needs per-group grids for this format)"
        )

    def compute_scales(self, w: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise self._no_single_scale()

    def effective_scale(self, scale: torch.Tensor, scale2: torch.Tensor | None) -> torch.Tensor:
        raise self._no_single_scale()

    def round_values(self, w, scale, scale2, block_size) -> torch.Tensor:
        raise self._no_single_scale()

    def scales(self, w_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_rel, s_channel)`` of the rotated weight ``(N, K)``: ``s_rel`` the float32 grid ``(N, K / g)`` of fp8
        values, ``s_channel`` float32 ``(N,)``; the amax rule of the module docstring.

        The table's levels are fractions of the group amax (what the Lloyd-Max table was fitted to), so the group
        scale is the group amax ``a``; ``s_channel`` makes the largest level of the row's largest group reach 127.
        Kitchen's quantizer starts from the same group scale and then refits it twice by least squares on the
        assigned levels (``scale = Σ w·l / Σ l²``); lrq_ao keeps the amax, which never clips (measured in
        ``tests/formats/test_w4a8.py``).
        """
        n, k = w_rot.shape
        amax = w_rot.float().abs().reshape(n, k // self.group, self.group).amax(dim=-1)
        s_channel = (amax.amax(dim=1) * self.element.qmax / INT8_LIMIT).clamp_min(MIN_SCALE)
        s_rel = (amax / s_channel[:, None]).clamp(max=FP8_MAX).to(FP8_DTYPE).float()
        return s_rel, s_channel

    def group_levels(self, s_rel: torch.Tensor) -> torch.Tensor:
        """The INT8 value every code decodes to in every group: ``clamp(round(level * s_rel), ±127)``, float32
        ``(N, K / g, L)`` (levels in code order; kitchen's ``_grid_levels``)."""
        table = self.element.table(s_rel.device)
        return (s_rel.float()[..., None] * table).round().clamp(-INT8_LIMIT, INT8_LIMIT)

    def candidate_values(self, qw: QuantizedWeight) -> torch.Tensor:
        """The exact values each element of a group may take, in the rotated basis: ``group_levels(s_rel) *
        s_channel`` per row, float32 ``(N, K / g, L)``. ``dequantize(qw)[n, k] == candidate_values(qw)[n, k // g,
        codes[n, k]]``; this is the per-group grid learned rounding must choose from."""
        return self.group_levels(qw.scale) * _s_channel(qw)[:, None, None]

    def round_to_levels(self, w_rot: torch.Tensor, s_rel: torch.Tensor, s_channel: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest codes ``(N, K)`` (int32) of the rotated weight under fixed scales: per element the code
        whose INT8 level is nearest ``w_rot / s_channel`` (ties to the lower code, as kitchen's ``_assign_grid``
        on a sorted table). Equivalently the nearest candidate value, since ``s_channel > 0``."""
        n, k = w_rot.shape
        target = (w_rot.float() / s_channel.float()[:, None]).reshape(n, k // self.group, self.group)
        return nearest_code(target, self.group_levels(s_rel)).reshape(n, k)

    def quantize(self, w: torch.Tensor, name: str = "weight") -> QuantizedWeight:
        """Round-to-nearest W4A8 of a high-precision ``(N, K)`` weight: rotate (float32), :meth:`scales`,
        :meth:`round_to_levels`, pack. ``FormatError`` naming ``name`` for NaN/Inf, a shape kitchen cannot run, or a
        read-only variant."""
        shape = check_2d(w.shape)
        check_finite(w, name)
        if not self.writable:
            raise FormatError(f"{name}: lrq_ao reads {self.name} files but does not write them; use format 'w4a8'")
        try:
            block_size = self.block_size_for(shape)
        except FormatError as exc:
            raise FormatError(f"{name}: {exc}") from None
        w_rot = self.rotate_weight(w.float())
        s_rel, s_channel = self.scales(w_rot)
        codes = self.round_to_levels(w_rot, s_rel, s_channel)
        return QuantizedWeight(self.element.pack(codes), s_rel, block_size, None, {S_CHANNEL: s_channel})

    def from_codes(self, codes: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        return QuantizedWeight(self.element.pack(codes), like.scale, like.block_size, None, dict(like.extra))

    # ---- dequantization -------------------------------------------------------------------------------------

    def int8_grid(self, qw: QuantizedWeight) -> torch.Tensor:
        """The decoded INT8 weight ``(N, K)`` (int8) kitchen's linear multiplies: each code's group level."""
        codes = self.codes(qw).long()
        n, k = codes.shape
        levels = self.group_levels(qw.scale)
        picked = torch.gather(levels, 2, codes.reshape(n, k // self.group, self.group))
        return picked.reshape(n, k).to(torch.int8)

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight in the rotated basis: ``int8_grid * s_channel`` in float32, then cast to ``dtype``
        (kitchen's ``_dequantize_w4a8_int8_weight_from_int8``, bit for bit)."""
        return (self.int8_grid(qw).float() * _s_channel(qw)[:, None]).to(dtype)

    def dequantize_original(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in the model's basis as kitchen's ``dequantize_w4a8_int8_weight(..., output_dtype=dtype)``
        returns it: the rotated weight cast to ``dtype`` first, then rotated back in ``dtype`` (for bf16 that
        differs from un-rotating in float32 and casting)."""
        return self.unrotate_weight(self.dequantize(qw, dtype))

    # ---- activation pairing ---------------------------------------------------------------------------------

    def dynamic_activation(self, block_size: tuple[int, int], shape: tuple[int, int]) -> tuple[str, int]:
        """Per-token INT8 of the rotated activation: kitchen's ``w4a8_int8_linear`` decodes the weight to its INT8
        grid and calls ``int8_linear(..., convrot=True)``."""
        return ("row", 0)

    @property
    def kernel_dtype(self) -> None:
        """``None``: lrq_ao runs this format by dequantizing (its INT8 kernels would need the decoded grid)."""
        return None

    # ---- ComfyUI --------------------------------------------------------------------------------------------

    def comfy_marker_fields(self, block_size: tuple[int, int], shape: tuple[int, int]) -> dict[str, Any]:
        """``group_size`` and ``convrot_groupsize``, as ComfyUI's ``_quantized_weight_state_dict`` writes them."""
        return {"group_size": int(self.group), "convrot_groupsize": int(self.block)}

    def comfy_tensor_specs(self, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        n, k = check_2d(shape)
        self.block_size_for((n, k))
        specs = {
            WEIGHT_SUFFIX: (torch.int8, self.element.stored_shape((n, k))),
            S_REL_SUFFIX: (FP8_DTYPE, (n, k // self.group)),
            S_CHANNEL_SUFFIX: (torch.float32, (n,)),
        }
        if self.codebook is not None:
            specs[CODEBOOK_SUFFIX] = (torch.float32, (16,))
        return specs

    def comfy_tensors(self, qw: QuantizedWeight, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``.weight`` I8 packed, ``.weight_s_rel`` F8_E4M3 ``(N, K / g)``, ``.weight_s_channel`` F32 ``(N,)``, and
        ``.weight_codebook`` F32 ``(16,)`` when the format has one; ``FormatError`` if ``qw`` does not fit."""
        specs = self.comfy_tensor_specs(shape)
        n, k = shape
        if qw.qdata.dtype != torch.int8 or tuple(qw.qdata.shape) != specs[WEIGHT_SUFFIX][1]:
            expected = specs[WEIGHT_SUFFIX][1]
            raise FormatError(
                f"{self.name} qdata must be int8 {expected}, got {qw.qdata.dtype} {tuple(qw.qdata.shape)}"
            )
        if tuple(qw.scale.shape) != (n, k // self.group):
            raise FormatError(
                f"{self.name} s_rel grid has shape {tuple(qw.scale.shape)}, expected {(n, k // self.group)}"
            )
        s_channel = _s_channel(qw)
        if tuple(s_channel.shape) != (n,):
            raise FormatError(f"{self.name} s_channel has shape {tuple(s_channel.shape)}, expected ({n},)")
        s_rel = qw.scale.detach().to(FP8_DTYPE)
        if not torch.equal(s_rel.float(), qw.scale.detach().float()):
            raise FormatError(f"{self.name} group scales s_rel must be exact fp8 e4m3fn values; recompute them")
        tensors = {
            WEIGHT_SUFFIX: qw.qdata.detach().contiguous(),
            S_REL_SUFFIX: s_rel.contiguous(),
            S_CHANNEL_SUFFIX: s_channel.detach().to(torch.float32).contiguous(),
        }
        if self.codebook is not None:
            tensors[CODEBOOK_SUFFIX] = self.element.table(qw.qdata.device)
        return tensors


def _s_channel(qw: QuantizedWeight) -> torch.Tensor:
    if S_CHANNEL not in qw.extra:
        raise FormatError("a w4a8 weight needs its per-row scale: QuantizedWeight.extra['s_channel'] is missing")
    return qw.extra[S_CHANNEL].float()


W4A8 = W4A8Format()
FORMATS: dict[str, W4A8Format] = {"w4a8": W4A8}


# ---- reading ComfyUI files --------------------------------------------------------------------------------------


def _marker_int(marker: dict[str, Any], key: str, default: int, where: str) -> int:
    """``marker[key]``, else ``marker["params"][key]``, else ``default`` (ComfyUI's lookup order), as an int."""
    params = marker.get("params")
    params = params if isinstance(params, dict) else {}
    value = marker.get(key, params.get(key, default))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ComfyFormatError(f"{where}{MARKER_SUFFIX}: {key} {value!r} is not an integer")
    return value


def _read_s_rel(stored: torch.Tensor, n: int, where: str) -> torch.Tensor:
    name = f"{where}{S_REL_SUFFIX}"
    if stored.dtype == torch.uint8:
        stored = stored.view(FP8_DTYPE)  # ComfyUI views the bytes as fp8 too
    if stored.dtype != FP8_DTYPE:
        raise ComfyFormatError(
            f"{name}: dtype {stored.dtype} is not float8_e4m3fn group scales (kitchen's scale_dtype=float32 "
            f"variant is not read by lrq_ao; re-quantize with fp8 group scales)"
        )
    if stored.dim() != 2 or stored.shape[0] != n or stored.shape[1] == 0:
        raise ComfyFormatError(f"{name}: shape {list(stored.shape)} is not [{n}, in_features / group_size]")
    s_rel = stored.float()
    if not bool(torch.isfinite(s_rel).all()) or bool(torch.signbit(s_rel).any()):
        raise ComfyFormatError(f"{name}: group scales must be finite and non-negative fp8 values")
    return s_rel.contiguous()


def _read_s_channel(stored: torch.Tensor, n: int, where: str) -> torch.Tensor:
    name = f"{where}{S_CHANNEL_SUFFIX}"
    if not stored.dtype.is_floating_point or stored.dtype.itemsize == 1 or tuple(stored.shape) != (n,):
        raise ComfyFormatError(
            f"{name}: expected a float32 [{n}] per-row scale, got {stored.dtype} {list(stored.shape)}"
        )
    s_channel = stored.detach().to(torch.float32)
    if not bool(torch.isfinite(s_channel).all()) or bool((s_channel < 0).any()):
        raise ComfyFormatError(f"{name}: per-row scales must be finite and non-negative")
    return s_channel.contiguous()


def _read_codebook(stored: torch.Tensor, where: str) -> tuple[float, ...]:
    name = f"{where}{CODEBOOK_SUFFIX}"
    if not stored.dtype.is_floating_point or stored.dtype.itemsize == 1 or tuple(stored.shape) != (16,):
        raise ComfyFormatError(f"{name}: expected a float32 [16] codebook, got {stored.dtype} {list(stored.shape)}")
    book = stored.detach().to(torch.float32)
    if not bool(torch.isfinite(book).all()):
        raise ComfyFormatError(f"{name}: codebook levels must be finite")
    return tuple(book.tolist())


def read_w4a8(marker: dict[str, Any], tensors: dict[str, torch.Tensor], where: str):
    """ComfyUI ``asym_w4a8_int8`` tensors -> ``(W4A8Format, QuantizedWeight)``; the variant (codebook, uniform
    4-bit, uniform 6-bit) follows the stored tensors as in kitchen."""
    group = _marker_int(marker, "group_size", DEFAULT_GROUP, where)
    rotation = _marker_int(marker, "convrot_groupsize", DEFAULT_ROTATION, where)
    if CORRECTION_SUFFIX in tensors:
        raise ComfyFormatError(
            f"{where}{CORRECTION_SUFFIX}: asymmetric W4A8 (a zero-point correction) is not supported: ComfyUI does not "
            f"load weight_correction, so this layer would run wrong there; re-quantize it symmetric"
        )
    weight = require(tensors, WEIGHT_SUFFIX, where)
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ComfyFormatError(
            f"{where}{WEIGHT_SUFFIX}: {COMFY_NAME} stores a non-empty 2-D int8 weight, got {weight.dtype} "
            f"{list(weight.shape)}"
        )
    n, cols = int(weight.shape[0]), int(weight.shape[1])
    s_rel = _read_s_rel(require(tensors, S_REL_SUFFIX, where), n, where)
    s_channel = _read_s_channel(require(tensors, S_CHANNEL_SUFFIX, where), n, where)
    k = s_rel.shape[1] * group  # kitchen takes K from the scale grid and the bit width from the packed row
    bits = next((b for b in (4, 6) if k * b == cols * 8), None)
    if bits is None:
        raise ComfyFormatError(
            f"{where}{WEIGHT_SUFFIX}: packed row of {cols} bytes matches neither 4 nor 6 bits for in_features {k} "
            f"(= {s_rel.shape[1]} groups of {group} in {where}{S_REL_SUFFIX})"
        )
    codebook = _read_codebook(tensors[CODEBOOK_SUFFIX], where) if CODEBOOK_SUFFIX in tensors else None
    if bits == 6 and codebook is not None:
        raise ComfyFormatError(
            f"{where}{CODEBOOK_SUFFIX}: 6-bit W4A8 rows are uniform; a codebook does not belong here"
        )
    shape = marker.get("orig_shape")
    if shape is not None and shape != [n, k]:
        raise ComfyFormatError(f"{where}{WEIGHT_SUFFIX}: stored tensors hold a [{n}, {k}] weight, marker says {shape}")
    try:
        fmt = W4A8Format(rotation, group, codebook, bits)
        block_size = fmt.block_size_for((n, k))
    except FormatError as exc:
        raise ComfyFormatError(f"{where}{WEIGHT_SUFFIX}: {exc}") from None
    return fmt, QuantizedWeight(weight, s_rel, block_size, None, {S_CHANNEL: s_channel})


register_reader(COMFY_NAME, read_w4a8)
