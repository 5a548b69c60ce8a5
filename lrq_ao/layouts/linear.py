"""How a linear with a quantized weight runs: a registry of backends chosen by declared capability.

A ``LinearBackend`` names its ``KernelChoice`` family, a ``supports(x, weight, bias)`` that returns ``None`` when it
can run the input or a sentence saying why not, and ``run(x, weight, bias)``. ``select_linear_backend`` honours
``weight.kernel``: ``AUTO`` takes the usable backend of highest priority; ``TORCH`` / ``EMULATED`` / ``TRITON``
only consider that family and raise, listing every refusal, if none fits. No backend is tried and abandoned on
failure: the choice is made from declarations, never from exceptions.

Selection reads dtypes, devices, static sizes (K, N) and the weight's metadata, never the batch size M, which is
symbolic under ``torch.compile(dynamic=True)``. Built-in backends:

* ``torch_weight_only`` (TORCH): ``F.linear(x, W.dequantize(x.dtype), bias)``; runs everywhere and Inductor fuses
  the dequantization into the matmul's prologue.
* ``torch_scaled_mm`` (TORCH): FP8 dynamic, per-tensor or per-row scales, ``torch._scaled_mm`` on CUDA SM >= 8.9,
  bias in cuBLAS's epilogue. Its activation quantization (``quantize_activation_fusable``) is plain torch code, so
  inside ``torch.compile`` Inductor fuses it with the LayerNorm / modulation / GELU that produced the activation;
  it stays bit-identical to the reference unless the weight asks for the fast mode (``act.exact`` false). For
  K > N at M < 256 the GEMM is cuBLAS's tensor-wise kernel with the scales applied after it
  (``scaled_mm_linear``: cuBLAS has no row-wise kernel there); that choice is made at run time, as a guard.
* ``torch_int_mm`` (TORCH): INT8 dynamic per-token with a per-row / per-tensor weight, ``torch._int_mm`` on CUDA
  (same fusable quantization).
* ``emulated`` (EMULATED): ``lrq_ao.layouts.activation.emulated_linear``, the float32 reference.

The kernels engineer's Triton backends live in ``lrq_ao.kernels.backends`` (imported at the first eager selection
or construction, never at ``import lrq_ao``) and call ``register_linear_backend`` there.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

from lrq_ao.layouts.activation import (
    KernelChoice,
    activation_refusal,
    emulated_linear,
    quantize_activation_fusable,
)
from lrq_ao.layouts.base import QuantizedWeightTensor
from lrq_ao.primitives import FP8_DTYPE

logger = logging.getLogger(__name__)

PLUGIN_MODULES = ("lrq_ao.kernels.backends",)


@dataclass(frozen=True)
class LinearBackend:
    """One way to run ``y = x @ W.T + bias`` for a quantized ``W``.

    supports(x, weight, bias) -> None if usable, else the reason it refuses.
    run(x, weight, bias) -> the output, shape ``(*x.shape[:-1], N)`` in ``x.dtype``.
    """

    name: str
    kernel: KernelChoice
    supports: Callable[[torch.Tensor, QuantizedWeightTensor, torch.Tensor | None], str | None]
    run: Callable[[torch.Tensor, QuantizedWeightTensor, torch.Tensor | None], torch.Tensor]


_BACKENDS: list[tuple[int, LinearBackend]] = []
_plugins_loaded = False


def register_linear_backend(backend: LinearBackend, priority: int) -> None:
    """Add (or replace, by name) a backend; a higher ``priority`` wins under ``KernelChoice.AUTO``."""
    _BACKENDS[:] = [(p, b) for p, b in _BACKENDS if b.name != backend.name]
    _BACKENDS.append((priority, backend))
    _BACKENDS.sort(key=lambda pb: -pb[0])


def unregister_linear_backend(name: str) -> None:
    """Remove the backend called ``name`` (no error if absent)."""
    _BACKENDS[:] = [(p, b) for p, b in _BACKENDS if b.name != name]


def registered_backends() -> list[LinearBackend]:
    """Backends in priority order (highest first)."""
    return [b for _, b in _BACKENDS]


def ensure_plugin_backends() -> None:
    """Import the optional backend modules once, outside compiled code (an import cannot be traced)."""
    global _plugins_loaded
    if _plugins_loaded or torch.compiler.is_compiling():
        return
    _plugins_loaded = True
    for module in PLUGIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def select_linear_backend(
    x: torch.Tensor, weight: QuantizedWeightTensor, bias: torch.Tensor | None = None
) -> tuple[LinearBackend, list[tuple[str, str]]]:
    """The backend that will run ``F.linear(x, weight, bias)`` and the ``(name, reason)`` of each refusal.

    Raises ``RuntimeError`` listing the refusals if no backend allowed by ``weight.kernel`` can run it.
    """
    ensure_plugin_backends()
    _check_linear_shapes(x, weight, bias)
    wanted = weight.kernel
    refusals: list[tuple[str, str]] = []
    for backend in registered_backends():
        if wanted is not KernelChoice.AUTO and backend.kernel is not wanted:
            continue
        reason = backend.supports(x, weight, bias)
        if reason is None:
            return backend, refusals
        refusals.append((backend.name, reason))
    detail = "; ".join(f"{name}: {reason}" for name, reason in refusals) or "no backend of that kind is registered"
    raise RuntimeError(
        f"no linear backend of kind {wanted.value!r} can run a {type(weight).__name__} ({weight.layout_name}, "
        f"act={weight.act}) on {x.device} with {x.dtype} input: {detail}. Set kernel='auto' to fall back to the "
        f"best usable backend"
    )


def describe_selection(x: torch.Tensor, weight: QuantizedWeightTensor, bias: torch.Tensor | None = None) -> str:
    """The backend an input like ``x`` takes when run, every refusal, and a last line naming the backend inside
    ``torch.compile`` when that differs (selected as a traced call: with a fake copy of ``x``)."""
    backend, refusals = select_linear_backend(x, weight, bias)
    lines = [f"{type(weight).__name__} {weight.layout_name} act={weight.act} kernel={weight.kernel}: {backend.name}"]
    lines += [f"  {name} refused: {reason}" for name, reason in refusals]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        traced, _ = select_linear_backend(mode.from_tensor(x), weight, bias)
    if traced.name != backend.name:
        lines.append(f"  under torch.compile: {traced.name}")
    m, (n, k) = x.numel() // x.shape[-1], weight.shape
    if backend.name in SCALED_MM_BACKENDS and is_rowwise_scaled_mm(weight) and rowwise_scaled_mm_unsupported(m, n, k):
        lines.append(f"  at M={m}: cuBLAS's tensor-wise FP8 GEMM with unit scales, both scales applied to its output")
    if traced.name == "triton_weight_only" and m == 1:
        lines.append("  at M=1 under torch.compile: one Inductor reduction kernel (GEMV) in place of the op")
    return "\n".join(lines)


def quantized_linear(x: torch.Tensor, weight: QuantizedWeightTensor, bias: torch.Tensor | None = None):
    backend, _ = select_linear_backend(x, weight, bias)
    if not torch.compiler.is_compiling():
        logger.debug("lrq_ao linear %s -> %s", tuple(weight.shape), backend.name)
    return backend.run(x, weight, bias)


def _check_linear_shapes(x: torch.Tensor, weight: QuantizedWeightTensor, bias: torch.Tensor | None) -> None:
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: input has {x.shape[-1]} features but the quantized weight expects {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"linear: bias must have shape ({n},), got {tuple(bias.shape)}")


# ---- built-in backends ---------------------------------------------------------------------------------------


def _weight_only_refusal(x, weight, bias):
    if weight.act.is_dynamic:
        return "the weight asks for dynamic activation quantization"
    if not x.is_floating_point():
        return f"activations of dtype {x.dtype} are not floating point"
    return None


def _run_weight_only(x, weight, bias):
    return F.linear(x, weight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


def _emulated_refusal(x, weight, bias):
    if not x.is_floating_point():
        return f"activations of dtype {x.dtype} are not floating point"
    return activation_refusal(weight.shape[1], weight.act)


def _run_emulated(x, weight, bias):
    return emulated_linear(x, weight.qdata, weight.scale, weight.block_size, weight.act, bias)


def is_traced_for_compile(x: torch.Tensor) -> bool:
    """Whether this linear is being traced into a ``torch.compile`` graph rather than run.

    ``torch.compiler.is_compiling()`` alone misses one case: torch 2.11 traces a tensor subclass's
    ``__torch_dispatch__`` during AOTAutograd with it false (seen on the H100: ``kernel='auto'`` still compiled the
    opaque Triton op). The inputs are fake tensors there, and only there."""
    return torch.compiler.is_compiling() or is_fake(x)


def _cuda_capability_refusal(x: torch.Tensor, minimum: tuple[int, int], what: str) -> str | None:
    if x.device.type != "cuda":
        return f"{what} needs a CUDA device, input is on {x.device}"
    # get_device_properties is constant-folded by torch.compile (get_device_capability is not)
    props = torch.cuda.get_device_properties(x.device)
    capability = (props.major, props.minor)
    if capability < minimum:
        return f"{what} needs SM >= {minimum[0]}.{minimum[1]}, device is SM {capability[0]}.{capability[1]}"
    return None


def is_per_tensor_or_row(weight: QuantizedWeightTensor) -> bool:
    """Per-tensor or per-row: the only weight scales ``torch._scaled_mm`` / ``torch._int_mm`` epilogues take (a
    ``(b, K)`` block grid with ``b < N`` also has one scale along K but is neither)."""
    n, k = weight.shape
    return tuple(weight.block_size) in ((n, k), (1, k))


def scaled_mm_operand_refusal(x, weight) -> str | None:
    """Why ``torch._scaled_mm`` cannot take this FP8 weight and input (None: it can), device aside.

    Shared by every backend that ends in ``torch._scaled_mm`` (the TORCH one here, the Triton-quantized one in
    ``lrq_ao.kernels.backends``), so its constraints are stated once."""
    if weight.qdtype != FP8_DTYPE or not weight.act.is_dynamic:
        return "only for FP8 weights with dynamic activation quantization"
    if weight.act.granularity not in ("tensor", "row") or not is_per_tensor_or_row(weight):
        return "torch._scaled_mm here takes per-tensor or per-row scales, not block-wise ones"
    n, k = weight.shape
    if k % 16 or n % 16:
        return f"torch._scaled_mm needs K and N multiples of 16, got K={k}, N={n}"
    if is_rowwise_scaled_mm(weight) and x.dtype != torch.bfloat16:
        return f"row-wise torch._scaled_mm produces bfloat16 only, input is {x.dtype}"
    return None


# cuBLAS's FP8 GEMM without periodic promotion of the accumulator (torchao's inference default): on the H100 the
# row-wise GEMM at 4608 x 3072 x 9216 took 250 us without it, torchao's whole dynamic linear 240 us with it. The
# output SQNR against float64 did not move (28.6 dB for both at M = 256: activation rounding dominates).
SCALED_MM_FAST_ACCUM = True


def _scaled_mm_refusal(x, weight, bias):
    return scaled_mm_operand_refusal(x, weight) or _cuda_capability_refusal(x, (8, 9), "torch._scaled_mm")


def run_scaled_mm(x, weight, bias):
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    xq, x_scale = quantize_activation_fusable(x2d, FP8_DTYPE, weight.act)
    y = scaled_mm_linear(xq, x_scale, weight.qdata, weight.scale, is_rowwise_scaled_mm(weight), bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def is_rowwise_scaled_mm(weight: QuantizedWeightTensor) -> bool:
    """Whether ``torch._scaled_mm`` runs row-wise (per-token activations or a per-row weight) for this weight."""
    return weight.act.granularity == "row" or weight.block_size[0] == 1


# cuBLAS's row-wise (outer-vector scaled) FP8 GEMM finds no algorithm for K > N at small M:
# CUBLAS_STATUS_NOT_SUPPORTED from cublasLtMatmulAlgoGetHeuristic, for torchao's PerRow on the H100 at M = 1 and 16
# and for ours and torchao's on the H200 at M = 16 (torch 2.11, CUDA 13.0; 12288 -> 3072, 15360 -> 3072,
# 10240 -> 4096), while the same shapes ran at M >= 256 and the tensor-wise kernel ran at M = 1 and 16. M from 17
# to 255 was not measured, so below 256 such shapes take the tensor-wise kernel with unit scales instead.
ROWWISE_SCALED_MM_MIN_M = 256
SCALED_MM_BACKENDS = ("torch_scaled_mm", "triton_fp8_scaled_mm")  # the backends that end in scaled_mm_linear


def rowwise_scaled_mm_unsupported(m, n: int, k: int) -> bool:
    """Whether cuBLAS's row-wise FP8 GEMM is avoided for an ``(m, k) x (k, n)`` product (see above)."""
    return k > n and m < ROWWISE_SCALED_MM_MIN_M


def scale_output_torch(y: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias, out_dtype: torch.dtype):
    """``(y * x_scale) * w_scale + bias`` in float32, rounded once to ``out_dtype``: the epilogue of the unit-scale
    route for a float32 ``y (M, N)``; ``x_scale`` has M or 1 entries, ``w_scale`` N or 1."""
    y = y * x_scale.reshape(-1, 1) * w_scale.reshape(1, -1)
    return (y if bias is None else y + bias.float()).to(out_dtype)


ScaleOutput = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.dtype], torch.Tensor]


def scaled_mm_linear(
    xq,
    x_scale,
    wq,
    w_scale,
    rowwise: bool,
    bias,
    out_dtype: torch.dtype,
    scale_output: ScaleOutput = scale_output_torch,
) -> torch.Tensor:
    """``(xq * x_scale) @ (wq * w_scale).T + bias`` through ``torch._scaled_mm``, for FP8 ``xq (M, K)`` and
    ``wq (N, K)``, scales as ``quantize_activation`` and the weight layouts store them.

    Where the row-wise kernel is unavailable (``rowwise_scaled_mm_unsupported``) the tensor-wise one runs with unit
    scales and a float32 output, and ``scale_output`` applies the two scale vectors and the bias and rounds once:
    the row-wise product's arithmetic. Plain torch ops by default (Inductor fuses them inside ``torch.compile``);
    the Triton backend's opaque op passes its one-kernel epilogue instead: run eagerly, the plain ops were five more
    launches and held 12288 -> 3072 at M = 16 to 0.64x bf16 on the H200 (1.00x with the one kernel). Under
    ``torch.compile`` the test on M becomes a guard, so a graph serves either side of the threshold."""
    m, (n, k) = xq.shape[0], wq.shape
    wq_t = wq.contiguous().t()  # column-major (K, N), as cuBLAS wants the second operand
    bias = None if bias is None else bias.to(out_dtype)
    if rowwise and rowwise_scaled_mm_unsupported(m, n, k):
        one = x_scale.new_ones((1, 1))
        y = torch._scaled_mm(xq, wq_t, one, one, out_dtype=torch.float32, use_fast_accum=SCALED_MM_FAST_ACCUM)
        return scale_output(y, x_scale, w_scale, bias, out_dtype)
    x_scale, w_scale = scaled_mm_scales(x_scale, w_scale, rowwise, m, n)
    return torch._scaled_mm(
        xq, wq_t, scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=out_dtype, use_fast_accum=SCALED_MM_FAST_ACCUM
    )


def scaled_mm_scales(x_scale: torch.Tensor, w_scale: torch.Tensor, rowwise: bool, m, n: int):
    """The ``(scale_a, scale_b)`` that ``torch._scaled_mm`` takes: ``(1, 1)`` twice for its tensor-wise kernel,
    else ``(M, 1)`` and ``(1, N)``, contiguous, with a per-tensor side broadcast (cuBLAS takes no mix of kinds).
    Decided from the weight's metadata, never from M (symbolic under ``torch.compile(dynamic=True)``)."""
    if not rowwise:
        return x_scale.reshape(1, 1), w_scale.reshape(1, 1)
    return x_scale.reshape(-1, 1).expand(m, 1).contiguous(), w_scale.reshape(1, -1).expand(1, n).contiguous()


# torch._int_mm on CUDA requires M > 16. Padding 16 zero rows unconditionally meets that without a branch on M.
_INT_MM_ROW_PAD = 16


def _int_mm_refusal(x, weight, bias):
    if weight.qdtype != torch.int8 or not weight.act.is_dynamic:
        return "only for INT8 weights with dynamic activation quantization"
    if weight.act.granularity != "row" or not is_per_tensor_or_row(weight):
        return "torch._int_mm here needs per-token activations and a per-row or per-tensor weight"
    n, k = weight.shape
    if k % 8 or n % 8:
        return f"torch._int_mm needs K and N multiples of 8, got K={k}, N={n}"
    if not x.is_floating_point():
        return f"activations of dtype {x.dtype} are not floating point"
    return _cuda_capability_refusal(x, (7, 5), "torch._int_mm")


def _run_int_mm(x, weight, bias):
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    xq, x_scale = quantize_activation_fusable(x2d, torch.int8, weight.act)
    xq = F.pad(xq, (0, 0, 0, _INT_MM_ROW_PAD))
    acc = torch._int_mm(xq, weight.qdata.contiguous().t())[:m]
    y = (acc.float() * x_scale * weight.scale.reshape(1, -1)).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


register_linear_backend(LinearBackend("torch_scaled_mm", KernelChoice.TORCH, _scaled_mm_refusal, run_scaled_mm), 110)
register_linear_backend(LinearBackend("torch_int_mm", KernelChoice.TORCH, _int_mm_refusal, _run_int_mm), 110)
register_linear_backend(
    LinearBackend("torch_weight_only", KernelChoice.TORCH, _weight_only_refusal, _run_weight_only), 100
)
register_linear_backend(LinearBackend("emulated", KernelChoice.EMULATED, _emulated_refusal, _run_emulated), 0)


# ---- op handlers: every matmul spelling with a quantized operand ends in quantized_linear ---------------------

aten = torch.ops.aten
implements = QuantizedWeightTensor.implements
implements_torch_function = QuantizedWeightTensor.implements_torch_function


@implements_torch_function([F.linear])
@implements([aten.linear.default])
def _linear(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(x, QuantizedWeightTensor) or not isinstance(weight, QuantizedWeightTensor):
        raise NotImplementedError(
            f"{func}: a quantized tensor is only supported as the weight (second argument) of a linear"
        )
    return quantized_linear(x, weight, bias)


def _matmul(a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    """``a @ b`` where one side is a quantized 2-D tensor, expressed as a linear."""
    if isinstance(b, QuantizedWeightTensor) and not isinstance(a, QuantizedWeightTensor):
        return quantized_linear(a, b.t())  # a @ b == linear(a, b.T)
    if isinstance(a, QuantizedWeightTensor) and not isinstance(b, QuantizedWeightTensor) and b.dim() == 2:
        return quantized_linear(b.t(), a).t()  # a @ b == (b.T @ a.T).T == linear(b.T, a).T
    raise NotImplementedError(
        f"{what} with operands {type(a).__name__}{tuple(a.shape)} and {type(b).__name__}{tuple(b.shape)}: "
        f"lrq_ao supports one quantized 2-D operand (the weight) and one plain operand"
    )


@implements_torch_function([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__])
@implements([aten.mm.default, aten.matmul.default])
def _mm(func, types, args, kwargs):
    return _matmul(args[0], args[1], str(func))


@implements([aten.addmm.default])
def _addmm(func, types, args, kwargs):
    bias, a, b = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if beta != 1 or alpha != 1 or isinstance(bias, QuantizedWeightTensor):
        raise NotImplementedError(f"{func} with beta={beta}, alpha={alpha}: only bias + a @ b is supported")
    return _matmul(a, b, str(func)) + bias
