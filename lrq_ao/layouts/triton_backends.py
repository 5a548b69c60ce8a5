"""TRITON linear backends: the policy of which ``lrq_ao.kernels`` op runs which quantized weight.

Registered with ``lrq_ao.layouts.registry``, which imports this module at the first eager selection or construction
(never at ``import lrq_ao``). Importing it does not import Triton: each backend declares its capability from dtypes,
devices, static sizes (N, K) and the weight's metadata only (never the batch size M), and the kernel modules are
imported the first time a backend accepts an input. ``weight.describe(x)`` shows the choice and every refusal.
Every backend asks the format (``lrq_ao.layouts.linear.kernel_codes_refusal``): a format without an 8-bit kernel
dtype, or with a second-level scale, is refused; FP8-versus-INT8 is ``fmt.kernel_dtype.is_floating_point``; the
dtype of the activation quantization is ``fmt.kernel_dtype``. A rotating format arrives here with ``x`` rotated.

| backend | weight | activations | kernel | priority |
| --- | --- | --- | --- | --- |
| ``triton_convrot_w8a8`` | INT8 ConvRot per-row | dynamic row | ``rotate_quant`` + ``row_gemm`` | 125 |
| ``triton_fp8_scaled_mm`` | FP8 per-tensor / row | dynamic tensor / row | ``act_quant`` + ``_scaled_mm`` | 120 |
| ``triton_w8a8_block`` | INT8 / FP8 block b x b | dynamic 1 x b | ``block_gemm`` | 120 |
| ``triton_w8a8_row`` | INT8 / FP8 per-tensor / per-row | dynamic row (tensor) | ``row_gemm`` | 115 |
| ``triton_weight_only`` | INT8 / FP8, any layout | bf16 / fp16 | ``weight_only_gemm`` | 105 |

ConvRot W8A8 (a format with ``fmt.hadamard_group``, dynamic per-token): ``triton_convrot_w8a8`` gets ``x`` unrotated
(``rotates_input``) and runs two ops, eager and compiled alike: ``lrq_ao::rotate_quant_int8`` (one read of ``x``:
float32 butterfly rotation, row amax, int8 codes; bit-identical to ``torch_convrot_int_mm``'s plain-torch rotation
and quantization) and ``lrq_ao::row_scaled_gemm`` on the stored rotated codes, the GEMM of ``triton_w8a8_row``. The
rotation is never a separate pass over ``x`` in the compiled graph, and there is no in-graph variant: the rotation's
exactness is the point. ``triton_w8a8_row`` refuses such a weight. ConvRot weight-only linears take
``triton_weight_only`` on ``x`` rotated by ``quantized_linear``.

The TORCH backends of ``lrq_ao.layouts.linear`` sit at 112 (ConvRot ``_int_mm``), 110 (``_scaled_mm`` /
``_int_mm``) and 100 (weight-only).
Priorities follow the H100 measurements in ``benchmarks/RESULTS.md`` (compiled single linears, plain timing):
the Triton W8A8 row GEMM beat the ``_int_mm`` path at M >= 4608 and block-wise W8A8 has no TORCH backend, so
those rank first. FP8 dynamic: ``triton_fp8_scaled_mm`` ranks first (it ends in the same cuBLAS call as
``torch_scaled_mm``, with fast accumulation, but quantizes with one Triton pass where the TORCH backend's
plain-torch quantization is several eager kernels). An earlier version stepped aside inside ``torch.compile`` for
``torch_scaled_mm``; the next backend by priority then was ``triton_w8a8_row`` (our FP8 GEMM), slower than cuBLAS
(H100, M = 4608: 1.41x vs 1.47x bf16 at 3072 -> 9216, 0.98x vs 1.16x at 12288 -> 3072), so it no longer does.
Inside ``torch.compile`` the FP8 and W8A8 backends quantize fast-mode activations (``act.exact`` false) narrower
than ``FUSED_QUANT_MAX_K`` with the fusable plain-torch code and call only the GEMM (``_scaled_mm`` /
``row_scaled_gemm`` / ``block_scaled_gemm``); wider ones, every exact-mode activation and every eager call use the
one-pass Triton quantizer (bit-identical to the reference, so eager and compiled exact results agree). Why: fused
with a LayerNorm at K = 3072 the plain-torch code costs no more than a separate pass, while on wide rows Inductor's
reduction is 1.7-2.2x slower than the Triton pass (H200), see ``FUSED_QUANT_MAX_K`` and DEVELOPMENT.md "Kernels".
The weight-only kernel ranks *above* ``torch_weight_only`` because its split-K small-M path beat bf16 at M <= 16 on
all 7 Flux / T5 shapes (INT8 per-row 1.31-1.78x, FP8 1.14-1.49x) where ``torch_weight_only`` runs at ~0.45x, and at
M = 64 its tiled path (0.55-1.21x bf16) still beat the dequantize + cuBLAS route (0.40x; H100, CUDA-graph kernel
times, ``benchmarks/dev_weight_only.py``, DEVELOPMENT.md "Weight-only at small M"). On CPU the kernels
run only through Triton's interpreter, only when ``TRITON_INTERPRET=1`` and only for ``kernel='triton'`` (never
under ``auto``: the interpreter is a test tool, far slower than the TORCH backends).
"""

from __future__ import annotations

import importlib

import torch

import lrq_ao.kernels.scaled_mm  # noqa: F401  (loaded here, outside compile, for the backends that import it)
from lrq_ao.kernels._runtime import fp8_compute_refusal, triton_refusal
from lrq_ao.layouts.activation import KernelChoice, quantize_activation_fusable
from lrq_ao.layouts.linear import (
    codes_are_float,
    convrot_generic_refusal,
    convrot_w8a8_refusal,
    is_per_tensor_or_row,
    is_traced_for_compile,
    kernel_codes_refusal,
    run_scaled_mm,
    scaled_mm_note,
    scaled_mm_operand_refusal,
)
from lrq_ao.layouts.registry import LinearBackend, register_linear_backend

BLOCKS = (32, 64, 128, 256)
_ops_loaded = False


def _load_ops() -> None:
    """Import the kernel modules (registers the ``lrq_ao::`` ops). Imports Triton."""
    global _ops_loaded
    if not _ops_loaded:
        importlib.import_module("lrq_ao.kernels").load_all()
        _ops_loaded = True


def _device_refusal(x: torch.Tensor, weight) -> str | None:
    reason = kernel_codes_refusal(weight) or triton_refusal(x.device)
    if reason is None and x.device.type == "cpu" and weight.kernel is not KernelChoice.TRITON:
        reason = "the Triton interpreter runs on CPU only when kernel='triton' is asked for"
    if reason is None and codes_are_float(weight) and weight.act.is_dynamic:
        reason = fp8_compute_refusal(x.device)
    return reason


def _accept(reason: str | None) -> str | None:
    if reason is None:
        _load_ops()
    return reason


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


# Inside torch.compile, fast-mode activations narrower than this are quantized by plain torch ops emitted into the
# graph (``quantize_activation_fusable``), where Inductor fuses them with their producer (LayerNorm, modulation);
# wider ones, and every exact-mode activation, by the Triton pass. Measured on the H200 (M = 4608, CUDA graphs,
# ``benchmarks/dev_act_quant.py``): at K = 12288 the Triton pass takes 69-74 us against 128 us for Inductor's fast
# code and 162 us for its exact code, and after a tanh GELU 149 us (GELU kernel + pass) against 212 / 266 us for the
# fused reduction, which recomputes the GELU in each of its two loops; at K = 3072 fused and separate are within a
# few microseconds. (An earlier Triton pass held a whole wide row per program and lost at K >= 10240 on the H100,
# which is why this rule once pointed the other way.) The rule reads K (static), never M.
FUSED_QUANT_MAX_K = 8192


def quantize_in_graph(x: torch.Tensor, weight) -> bool:
    """Whether this call's activation quantization is emitted as plain torch ops into the compiled graph.

    Only for the fast (inexact) quantization of activations narrower than ``FUSED_QUANT_MAX_K``, whose point is to
    fuse with the producer; exact quantization always runs the Triton pass (bit-identical to the reference).
    """
    fused = not weight.act.exact and weight.shape[1] < FUSED_QUANT_MAX_K
    return fused and is_traced_for_compile(x)


# ---- FP8 dynamic: Triton activation quantization + cuBLAS ---------------------------------------------------


def _fp8_scaled_mm_refusal(x, weight, bias):
    refusal = scaled_mm_operand_refusal(x, weight)
    if refusal is not None:
        return refusal
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"activations must be bfloat16 or float16, got {x.dtype}"
    return _accept(_device_refusal(x, weight))


def _run_fp8_scaled_mm(x, weight, bias):
    if quantize_in_graph(x, weight):  # plain-torch quantization + the same cuBLAS call (see the docstring)
        return run_scaled_mm(x, weight, bias)
    y = torch.ops.lrq_ao.fp8_scaled_mm_linear(_as_2d(x), weight.qdata, weight.scale, weight.act.granularity, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---- W8A8 with per-row / per-tensor scales ------------------------------------------------------------------


def _w8a8_row_refusal(x, weight, bias):
    if not weight.act.is_dynamic:
        return "only for dynamic activation quantization"
    if convrot_generic_refusal(weight) is not None:
        return convrot_generic_refusal(weight)
    if weight.act.granularity not in ("row", "tensor") or not is_per_tensor_or_row(weight):
        return "takes per-token / per-tensor activations with a per-row or per-tensor weight"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations must be floating point, got {x.dtype}"
    return _accept(_device_refusal(x, weight))


def _run_w8a8_row(x, weight, bias):
    scale = weight.scale if weight.block_size[0] == 1 else weight.scale.reshape(1, 1)
    x2d = _as_2d(x)
    if quantize_in_graph(x, weight):
        xq, x_scale = quantize_activation_fusable(x2d, weight.fmt.kernel_dtype, weight.act)
        y = torch.ops.lrq_ao.row_scaled_gemm(xq, x_scale, weight.qdata, scale, bias, _dtype_name(x.dtype))
    else:
        y = torch.ops.lrq_ao.row_scaled_linear(x2d, weight.qdata, scale, bias, weight.act.granularity)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- ConvRot W8A8: fused rotation + per-token INT8, then the row GEMM --------------------------------------------


def _convrot_w8a8_refusal(x, weight, bias):
    return _accept(convrot_w8a8_refusal(x, weight) or _device_refusal(x, weight))


def _run_convrot_w8a8(x, weight, bias):
    scale = weight.scale if weight.block_size[0] == 1 else weight.scale.reshape(1, 1)
    xq, x_scale = torch.ops.lrq_ao.rotate_quant_int8(_as_2d(x), weight.fmt.hadamard_group)
    y = torch.ops.lrq_ao.row_scaled_gemm(xq, x_scale, weight.qdata, scale, bias, _dtype_name(x.dtype))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _convrot_w8a8_note(x, weight, traced):
    return (
        f"ConvRot (G={weight.fmt.hadamard_group}): fused rotate+quant Triton pass (lrq_ao::rotate_quant_int8), then "
        f"INT8 row GEMM (lrq_ao::row_scaled_gemm)"
    )


# ---- W8A8 block-wise ----------------------------------------------------------------------------------------


def _w8a8_block_refusal(x, weight, bias):
    if not weight.act.is_dynamic or weight.act.granularity != "block":
        return "only for dynamic activation quantization in 1 x block groups"
    bn, bk = weight.block_size
    n, k = weight.shape
    if bn != bk or bk not in BLOCKS or weight.act.block != bk:
        return f"needs a square weight block in {BLOCKS} equal to the activation block, got {weight.block_size}"
    if n % bk or k % bk:
        return f"block {bk} must divide N={n} and K={k}"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations must be floating point, got {x.dtype}"
    return _accept(_device_refusal(x, weight))


def _run_w8a8_block(x, weight, bias):
    x2d, block = _as_2d(x), weight.block_size[1]
    if quantize_in_graph(x, weight):
        xq, x_scale = quantize_activation_fusable(x2d, weight.fmt.kernel_dtype, weight.act)
        y = torch.ops.lrq_ao.block_scaled_gemm(
            xq, x_scale, weight.qdata, weight.scale, block, bias, _dtype_name(x.dtype)
        )
    else:
        y = torch.ops.lrq_ao.block_scaled_linear(x2d, weight.qdata, weight.scale, block, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---- weight-only ----------------------------------------------------------------------------------------------


def _weight_only_refusal(x, weight, bias):
    if weight.act.is_dynamic:
        return "the weight asks for dynamic activation quantization"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"the tensor-core kernel takes bfloat16 / float16 activations, got {x.dtype}"
    n, k = weight.shape
    bn, bk = weight.block_size
    if not is_per_tensor_or_row(weight) and not (bn == bk and bn >= 16):
        return f"needs a per-tensor, per-row or square (>= 16) block layout, got {weight.block_size}"
    return _accept(_device_refusal(x, weight))


def gemv_in_graph(x2d: torch.Tensor) -> bool:
    """Whether this weight-only call is a single row (M = 1, known when traced) inside ``torch.compile``.

    There the plain-torch ``gemv_reduction`` replaces the op: Inductor turns it into one reduction kernel that reads the
    8-bit weight once and converts it in registers, as torchao's weight-only does. H200, M = 1, all 7 Flux / T5
    shapes: ours 1.47-1.83x (FP8) and 1.46-1.74x (INT8) bf16, torchao 1.37-1.79x, the split-K MMA kernel 0.75-1.31x
    (``bench_linear.py --batches 1``, benchmarks/RESULTS.md). Under ``torch.compile(dynamic=True)`` a batch of one is
    specialized to the constant 1, so this adds no guard; a symbolic M is never 1 here.
    """
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return is_traced_for_compile(x2d) and statically_known_true(x2d.shape[0] == 1)


def gemv_reduction(x2d: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (1, K) @ dq(W).T + bias`` as an elementwise product summed over K, in float32, output in ``x.dtype``."""
    w = weight.dequantize_stored(torch.float32)  # fused into the reduction, never materialized
    y = (x2d.float() * w).sum(dim=-1).unsqueeze(0)
    return (y if bias is None else y + bias.float()).to(x2d.dtype)


def _run_weight_only(x, weight, bias):
    x2d = _as_2d(x)
    if gemv_in_graph(x2d):
        y = gemv_reduction(x2d, weight, bias)
    else:
        bn, bk = weight.block_size
        y = torch.ops.lrq_ao.weight_only_linear(x2d, weight.qdata, weight.scale, bn, bk, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _weight_only_note(x, weight, traced):
    if traced and x.numel() // x.shape[-1] == 1:
        return "at M=1 under torch.compile: one Inductor reduction kernel (GEMV) in place of the op"
    return None


TRITON = KernelChoice.TRITON
BACKENDS = [
    (
        LinearBackend(
            "triton_convrot_w8a8",
            TRITON,
            _convrot_w8a8_refusal,
            _run_convrot_w8a8,
            _convrot_w8a8_note,
            rotates_input=True,
        ),
        125,
    ),
    (LinearBackend("triton_fp8_scaled_mm", TRITON, _fp8_scaled_mm_refusal, _run_fp8_scaled_mm, scaled_mm_note), 120),
    (LinearBackend("triton_w8a8_block", TRITON, _w8a8_block_refusal, _run_w8a8_block), 120),
    (LinearBackend("triton_w8a8_row", TRITON, _w8a8_row_refusal, _run_w8a8_row), 115),
    (LinearBackend("triton_weight_only", TRITON, _weight_only_refusal, _run_weight_only, _weight_only_note), 105),
]

for _backend, _priority in BACKENDS:
    register_linear_backend(_backend, _priority)
