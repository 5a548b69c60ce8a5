"""How a quantized linear treats its activations, and the reference activation quantization.

``ActivationMode`` is stored on every quantized weight (it is part of the tensor's flattened metadata, so it
survives ``torch.compile``, ``state_dict`` and ``torch.save``):

* ``weight_only``: the weight is dequantized into the activation dtype and an ordinary matmul runs.
* ``dynamic``: each call quantizes the activations to the weight's element type, with one scale per
  ``tensor``, per ``row`` (per token) or per ``block`` (1 x ``block`` along K), then multiplies the two
  quantized operands. ``exact`` (the default) keeps that quantization bit-identical to the reference on every
  device and path; ``exact=False`` lets ``torch.compile`` run the reference's own ops as Inductor compiles them
  (approximate float32 division, the hardware's float -> e4m3 cast), which is cheaper and may move a value by one
  grid step (what torchao's dynamic FP8 does).

The functions ``quantize_activation`` / ``dequantize_activation`` / ``emulated_linear`` are the pure-PyTorch
reference for every backend (the Triton kernels are tested against them). They follow the weight conventions of
``lrq_ao.primitives``: ``scale = max(amax / qmax, 1e-8)`` in float32, true division, round-to-nearest-even,
saturating.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from lrq_ao.layouts.legacy import legacy_format
from lrq_ao.primitives import DEFAULT_BLOCK, MIN_SCALE, qmax_of, round_to_grid

if TYPE_CHECKING:
    from lrq_ao.formats import WeightFormat

ACTIVATION_KINDS = ("weight_only", "dynamic")
ACTIVATION_GRANULARITIES = ("tensor", "row", "block")


class KernelChoice(str, enum.Enum):
    """Which family of linear backends may run a quantized weight.

    ``AUTO`` picks the best usable backend by priority; the others restrict the choice to that family and raise
    (listing every refusal) if none of its backends can run the given input.
    """

    AUTO = "auto"
    TORCH = "torch"
    EMULATED = "emulated"
    TRITON = "triton"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ActivationMode:
    """How activations are treated when a quantized weight runs a linear.

    kind: ``weight_only`` or ``dynamic``.
    granularity: for ``dynamic``, one activation scale per ``tensor``, per ``row`` (token) or per ``block``.
    block: the activation block length along K for ``granularity == "block"``.
    exact: quantize bit-identically to ``quantize_activation`` everywhere (``True``), or let compiled graphs
        use the fast, fusable form that may differ by one grid step (``False``; see ``quantize_activation_fusable``).
    """

    kind: str = "weight_only"
    granularity: str = "row"
    block: int = DEFAULT_BLOCK
    exact: bool = True  # a class attribute too, so modes pickled before this field existed read as exact

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATION_KINDS:
            raise ValueError(f"ActivationMode.kind must be one of {ACTIVATION_KINDS}, got {self.kind!r}")
        if self.granularity not in ACTIVATION_GRANULARITIES:
            raise ValueError(
                f"ActivationMode.granularity must be one of {ACTIVATION_GRANULARITIES}, got {self.granularity!r}"
            )
        if self.block <= 0:
            raise ValueError(f"ActivationMode.block must be positive, got {self.block}")
        if not isinstance(self.exact, bool):
            raise TypeError(f"ActivationMode.exact must be a bool, got {self.exact!r}")

    @property
    def is_dynamic(self) -> bool:
        return self.kind == "dynamic"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActivationMode:
        return cls(**data)

    def __str__(self) -> str:
        if not self.is_dynamic:
            return "weight_only"
        suffix = f"{self.block}" if self.granularity == "block" else ""
        return f"dynamic/{self.granularity}{suffix}" + ("" if self.exact else "/fast")


WEIGHT_ONLY = ActivationMode()


def activation_mode_for(
    kind: str, fmt: WeightFormat | torch.dtype, weight_block_size: tuple[int, int], shape, exact: bool = True
) -> ActivationMode:
    """The activation mode that pairs with a weight of format ``fmt``, block size ``weight_block_size`` and ``shape``.

    ``weight_only`` needs no choice. For ``dynamic`` the format says which activation quantization pairs with it
    (``WeightFormat.dynamic_activation``; the 8-bit scaled formats take per-token scales, or 1 x ``bk`` blocks for a
    block-wise weight so the K blocks of both operands line up). ``ActivationMode("dynamic", "tensor")`` can still
    be set explicitly. ``exact`` is passed through (see ``ActivationMode``). A ``torch.dtype`` in place of ``fmt``
    is the old spelling and means the 8-bit scaled format of that element (``lrq_ao.layouts.legacy``).

    Raises ``ValueError`` for an unknown kind, or for ``dynamic`` with a format that has no dynamic mode (the
    format's own sentence) or no ``kernel_dtype`` (the dtype dynamic activations are quantized to).
    """
    if kind == "weight_only":
        return WEIGHT_ONLY
    if kind != "dynamic":
        raise ValueError(f"activation kind must be one of {ACTIVATION_KINDS}, got {kind!r}")
    if isinstance(fmt, torch.dtype):
        fmt = legacy_format(fmt, weight_block_size, shape)
    pairing = fmt.dynamic_activation(tuple(weight_block_size), (int(shape[0]), int(shape[1])))
    if isinstance(pairing, str):
        raise ValueError(pairing)
    if fmt.kernel_dtype is None:  # the activations' dtype is the codes' kernel dtype; without one, nothing to pair
        raise ValueError(
            f"format {fmt.name} pairs with dynamic activations but has no 8-bit kernel dtype in lrq_ao to quantize "
            f"them to; use activation='weight_only'"
        )
    granularity, block = pairing
    return ActivationMode("dynamic", granularity, block or DEFAULT_BLOCK, exact=exact)


def activation_refusal(k: int, mode: ActivationMode) -> str | None:
    """Why activations with inner size ``k`` cannot be quantized under ``mode`` (``None`` if they can)."""
    if mode.is_dynamic and mode.granularity == "block" and k % mode.block:
        return f"activation block {mode.block} does not divide K={k}"
    return None


def quantize_activation(
    x2d: torch.Tensor, qdtype: torch.dtype, mode: ActivationMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an activation matrix ``(M, K)``. Returns ``(xq, x_scale)``.

    ``x_scale`` is float32 with shape ``(1, 1)`` (tensor), ``(M, 1)`` (row) or ``(M, K // block)`` (block).
    Reductions use ``reshape`` + ``amax`` only, so ``M`` may be symbolic under ``torch.compile``.
    """
    _check_activation(x2d, mode)
    xf = x2d.float()
    scale = (_group_amax(xf, mode) / qmax_of(qdtype)).clamp_min(MIN_SCALE)
    xq = round_to_grid(_divide_by_scale(xf, scale, mode), qdtype)
    return xq, scale


def _check_activation(x2d: torch.Tensor, mode: ActivationMode) -> None:
    if x2d.dim() != 2:
        raise ValueError(f"quantize_activation expects a 2-D (M, K) activation, got shape {tuple(x2d.shape)}")
    reason = activation_refusal(x2d.shape[-1], mode)
    if reason is not None:
        raise ValueError(reason)


def quantize_activation_fusable(
    x2d: torch.Tensor, qdtype: torch.dtype, mode: ActivationMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activation`` in plain torch ops that Inductor fuses with the producer of ``x2d``.

    Same arguments, results and errors as ``quantize_activation``. Inside ``torch.compile`` these ops fuse with
    whatever produced ``x2d`` (LayerNorm, modulation, GELU) into one generated kernel.

    With ``mode.exact == False`` this *is* the reference's own code, left to Inductor: eager it is bit-identical,
    compiled on CUDA the division is Triton's approximate one and the e4m3 rounding the hardware cast, so a value may
    land one grid step away and a scale one unit in the last place away — the price of the cheapest fused kernel
    (float32 only, no explicit rounding), the same trade torchao's dynamic FP8 makes.

    With ``mode.exact`` (the default) the result stays bit-identical on every device. The reference's own ops
    would not stay exact in a compiled graph on CUDA (measured on the H100, torch 2.11: 0.1-0.6 % of the FP8 bytes
    and 60 % of the row scales differed): Inductor turns ``amax / qmax`` into a multiplication by ``1 / qmax``,
    emits Triton's approximate ``div.full.f32`` for ``x / scale``, and leaves the float32 -> e4m3fn rounding to
    Triton. Here:

    * the scale is the correctly rounded float32 ``amax / qmax``, however the division was compiled: a guess, then
      the neighbour (by bit pattern) whose product with ``qmax`` is nearest ``amax``, products and differences
      exact in float64;
    * ``x / scale`` runs in float64 (IEEE ``div.rn.f64`` everywhere) and is rounded once to float32, which equals
      the correctly rounded float32 quotient because 53 >= 2 * 24 + 2 (Figueroa, "When is double rounding
      innocuous?", 1995);
    * FP8 values are rounded onto the e4m3fn grid explicitly (scaled by the power of two that makes the grid step
      1, ``torch.round``, scaled back), so the final cast only ever sees representable values.
    """
    if not mode.exact:
        return quantize_activation(x2d, qdtype, mode)
    _check_activation(x2d, mode)
    xf = x2d.float()
    amax = _group_amax(xf, mode)
    scale = _correctly_rounded_quotient(amax, qmax_of(qdtype)).clamp_min(MIN_SCALE)
    quotient = _divide_by_scale(xf.double(), scale.double(), mode).float()
    if qdtype.is_floating_point:
        return round_to_float8_exactly(quotient, qdtype), scale
    return round_to_grid(quotient, qdtype), scale


def _group_amax(xf: torch.Tensor, mode: ActivationMode) -> torch.Tensor:
    if mode.granularity == "tensor":
        return xf.abs().amax().reshape(1, 1)
    if mode.granularity == "row":
        return xf.abs().amax(dim=1, keepdim=True)
    return xf.abs().reshape(xf.shape[0], -1, mode.block).amax(dim=2)


def _correctly_rounded_quotient(a: torch.Tensor, divisor: float) -> torch.Tensor:
    """Float32 ``a / divisor`` rounded to nearest, for float32 ``a >= 0`` and ``divisor`` in {448, 127}."""
    a64 = a.double()
    guess = (a64 / divisor).float()  # within one unit in the last place, however Inductor compiles the division
    return nearest_quotient_near(a64, divisor, guess)


def nearest_quotient_near(a64: torch.Tensor, divisor: float, guess: torch.Tensor) -> torch.Tensor:
    """Of ``guess`` (float32, >= 0) and its two neighbours, the one nearest ``a64 / divisor``.

    ``c * divisor`` is exact in float64 for any float32 ``c`` (at most 24 + 7 significant bits) and so is
    ``a - c * divisor`` (Sterbenz), so the comparison is exact. No ties for float32 ``a``: a float32 midpoint
    times an odd ``divisor`` has more than 24 significant bits.
    """
    bits = guess.view(torch.int32)
    best = guess
    for neighbour in ((bits - 1).clamp_min(0).view(torch.float32), (bits + 1).view(torch.float32)):
        closer = (a64 - neighbour.double() * divisor).abs() < (a64 - best.double() * divisor).abs()
        best = torch.where(closer, neighbour, best)
    return best


def round_to_float8_exactly(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 ``q`` -> the 8-bit float ``dtype`` (e4m3fn), saturating at its max, ties to even, with the rounding
    done in float32 arithmetic: scale by the power of two that makes the grid step at ``|q|`` equal 1, round, scale
    back, so the final cast only sees representable values. The grid is read from ``torch.finfo(dtype)``: mantissa
    bits from ``eps``, the smallest normal exponent (below which the step stays fixed) from ``tiny``."""
    info = torch.finfo(dtype)
    mantissa_bits = -round(math.log2(info.eps))
    min_normal_biased_exp = 127 + round(math.log2(info.tiny))
    y = q.clamp(-info.max, info.max)
    biased_exp = (y.view(torch.int32) >> 23) & 0xFF
    step_exp = biased_exp.clamp_min(min_normal_biased_exp) - mantissa_bits
    step = (step_exp << 23).view(torch.float32)  # the grid step at y's magnitude, a power of two
    inv_step = ((254 - step_exp) << 23).view(torch.float32)  # exactly 1 / step
    return (torch.round(y * inv_step) * step).to(dtype)


def round_to_e4m3_exactly(q: torch.Tensor) -> torch.Tensor:
    """Float32 ``q`` -> e4m3fn, saturating, ties to even (``round_to_float8_exactly`` for e4m3fn)."""
    return round_to_float8_exactly(q, torch.float8_e4m3fn)


def dequantize_activation(xq: torch.Tensor, x_scale: torch.Tensor, mode: ActivationMode) -> torch.Tensor:
    """Float32 ``xq * x_scale`` broadcast over the activation blocks of ``mode``."""
    xf = xq.float()
    if mode.granularity == "block":
        m, k = xf.shape
        return (xf.reshape(m, -1, mode.block) * x_scale.unsqueeze(-1)).reshape(m, k)
    return xf * x_scale


def _divide_by_scale(xf: torch.Tensor, scale: torch.Tensor, mode: ActivationMode) -> torch.Tensor:
    if mode.granularity == "block":
        m, k = xf.shape
        return (xf.reshape(m, -1, mode.block) / scale.unsqueeze(-1)).reshape(m, k)
    return xf / scale


def emulated_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, int],
    mode: ActivationMode,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference quantized linear for 8-bit codes: ``y = dq(q(x)) @ dq(W).T`` in float32, cast to ``x.dtype``, plus
    ``bias``, with ``dq(W) = qdata.float() * scale`` per block and dynamic activations quantized to ``qdata.dtype``.

    In ``weight_only`` mode the activations are used as they are (upcast to float32). ``x`` may have any number of
    leading dimensions; the weight is ``(N, K)``. (Any format: ``reference_linear`` with its dequantized weight.)
    """
    from lrq_ao.primitives import dequantize

    return reference_linear(x, dequantize(qdata, scale, block_size, torch.float32), qdata.dtype, mode, bias)


def reference_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    act_dtype: torch.dtype | None,
    mode: ActivationMode,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = dq(q(x)) @ w.T`` in float32 for a float32 weight ``w (N, K)``, cast to ``x.dtype``, plus ``bias``;
    dynamic activations are quantized to ``act_dtype`` under ``mode`` (``ValueError`` if it is None)."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    if mode.is_dynamic:
        if act_dtype is None:
            raise ValueError("dynamic activation quantization needs an 8-bit activation dtype, got None")
        xq, x_scale = quantize_activation(x2d, act_dtype, mode)
        x2d_f = dequantize_activation(xq, x_scale, mode)
    else:
        x2d_f = x2d.float()
    y = (x2d_f @ w.t()).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])
