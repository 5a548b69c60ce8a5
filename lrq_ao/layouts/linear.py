"""How a linear with a quantized weight runs: the built-in backends and the op handlers that end in them.

Every backend asks the weight's format, never which format it is: ``fmt.kernel_dtype`` (``None``: the codes are
dequantized, no 8-bit kernel takes them; a floating dtype: FP8 kernels; an integer one: INT8 kernels), ``scale2``
(two-level scales: only the dequantizing paths apply them), ``fmt.rotate_input_float32`` and ``fmt.hadamard_group``
(rotating formats, below). Selection is ``lrq_ao.layouts.registry``.

Rotating formats (ConvRot). A backend that declares ``rotates_input`` gets ``x`` as given and rotates it itself;
for every other backend ``quantized_linear`` first rotates ``x`` into the basis the codes are stored in
(``fmt.rotate_input``, in ``x.dtype``), so the ordinary backends multiply the stored codes.

* Dynamic (W8A8) linears of a format with a ``hadamard_group`` never take that route: rounding the rotated values
  to bf16 before quantizing them changes about 10 % of the codes (bf16 activations with outlier channels). The
  ConvRot backends (``torch_convrot_int_mm`` here, ``triton_convrot_w8a8`` in ``triton_backends``) and ``emulated``
  quantize the float32 rotation ``fmt.rotate_input_float32`` (the butterfly ``formats.convrot.rotate_exact``), and
  all of them compute the same activation codes and scales bit for bit, those of ``lrq_ao::rotate_quant_int8``.
  The generic INT8 dynamic backends refuse such a weight.
* Weight-only linears take it: the rotated activation is rounded to ``x.dtype`` for the GEMM whichever way it is
  computed, and kitchen's product in ``x.dtype`` (float32 accumulation, one rounding) gives the same bf16 values as
  the butterfly (all 196,608 equal, 64 x 3072 bf16, G = 256, CPU). The product stays because it is one batched GEMM
  where Inductor writes each butterfly stage to its own full float32 buffer (4 for G = 256, seen in its CPU code);
  switching needs a GPU measurement showing the butterfly no slower under ``torch.compile``. (The W8A8 TORCH
  backend pays those buffers too; on a GPU with Triton the fused pass runs instead.)

Built-in backends:

* ``torch_weight_only`` (TORCH): ``F.linear(x, W.dequantize_stored(x.dtype), bias)``; runs every format everywhere
  and Inductor fuses the dequantization into the matmul's prologue. For a format without a kernel dtype this is the
  path, and ``describe`` says so ("dequantize + matmul (no kernel for format X)").
* ``torch_scaled_mm`` (TORCH): FP8 codes, dynamic, per-tensor or per-row scales, ``torch._scaled_mm`` on CUDA
  SM >= 8.9, bias in cuBLAS's epilogue (``lrq_ao.kernels.scaled_mm``). Its activation quantization
  (``quantize_activation_fusable``) is plain torch code, so inside ``torch.compile`` Inductor fuses it with the
  LayerNorm / modulation / GELU that produced the activation; it stays bit-identical to the reference unless the
  weight asks for the fast mode (``act.exact`` false). For K > N at M < 256 the GEMM is cuBLAS's tensor-wise kernel
  with the scales applied after it (cuBLAS has no row-wise kernel there); that choice is made at run time, as a guard.
* ``torch_int_mm`` (TORCH): INT8 codes, dynamic per-token with a per-row / per-tensor weight, ``torch._int_mm`` on
  CUDA (same fusable quantization).
* ``torch_convrot_int_mm`` (TORCH): INT8 ConvRot (``fmt.hadamard_group``), dynamic per-token: the float32
  butterfly rotation and the exact per-token quantization in plain torch, ``torch._int_mm`` on the stored rotated
  codes, and the epilogue of the Triton row GEMM (``acc * sx * sw + bias`` in float32, one cast). Runs on CPU too
  (``torch._int_mm`` does): the reference the fused Triton backend is checked against bit for bit, and the product
  path where Triton is absent.
* ``emulated`` (EMULATED): ``lrq_ao.layouts.activation.reference_linear`` on the format's exact dequantization, the
  float32 reference; a rotating format's ``x`` is rotated here in float32 and the result cast to ``x.dtype`` at the
  end.

The Triton backends live in ``lrq_ao.layouts.triton_backends`` (imported at the first eager selection or
construction, never at ``import lrq_ao``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from lrq_ao.layouts.activation import (
    KernelChoice,
    activation_refusal,
    quantize_activation_fusable,
    reference_linear,
)
from lrq_ao.layouts.base import QuantizedWeightTensor
from lrq_ao.layouts.registry import LinearBackend, register_linear_backend, select_linear_backend

logger = logging.getLogger(__name__)


def quantized_linear(x: torch.Tensor, weight: QuantizedWeightTensor, bias: torch.Tensor | None = None):
    """``F.linear(x, weight, bias)``: select a backend, rotate ``x`` into the stored basis unless the backend does it
    itself (``LinearBackend.rotates_input``), run."""
    backend, _ = select_linear_backend(x, weight, bias)
    if not torch.compiler.is_compiling():
        logger.debug("lrq_ao linear %s %s -> %s", weight.fmt.name, tuple(weight.shape), backend.name)
    if backend.rotates_input:
        return backend.run(x, weight, bias)
    return backend.run(stored_basis_input(x, weight), weight, bias)


def stored_basis_input(x: torch.Tensor, weight: QuantizedWeightTensor) -> torch.Tensor:
    """``fmt.rotate_input(x)`` in ``x.dtype`` (``x`` itself unless the format rotates)."""
    return weight.fmt.rotate_input(x).to(x.dtype)


def is_convrot_dynamic(weight: QuantizedWeightTensor) -> bool:
    """A dynamic linear of a format whose rotation the ConvRot backends implement (``fmt.hadamard_group``)."""
    return weight.act.is_dynamic and weight.fmt.hadamard_group is not None


def convrot_w8a8_refusal(x: torch.Tensor, weight: QuantizedWeightTensor) -> str | None:
    """Why the ConvRot W8A8 backends (TORCH and TRITON) cannot run ``weight`` (``None``: they can), device aside."""
    if weight.fmt.hadamard_group is None:
        return f"format {weight.fmt.name} does not rotate its inputs by a block Hadamard (ConvRot)"
    refusal = kernel_codes_refusal(weight)
    if refusal is not None:
        return refusal
    if weight.fmt.kernel_dtype != torch.int8 or not weight.act.is_dynamic or weight.act.granularity != "row":
        return "only for INT8 codes with dynamic per-token activation quantization"
    if not is_per_tensor_or_row(weight):
        return "needs a per-row or per-tensor weight scale"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations must be bfloat16, float16 or float32, got {x.dtype}"
    return None


def convrot_generic_refusal(weight: QuantizedWeightTensor) -> str | None:
    """The generic INT8 dynamic backends step aside for ConvRot: they would quantize ``x`` rotated and rounded to
    ``x.dtype``, not the float32 rotation every ConvRot path quantizes."""
    if is_convrot_dynamic(weight):
        return f"format {weight.fmt.name} rotates x: the ConvRot backends quantize its float32 rotation"
    return None


def kernel_codes_refusal(weight: QuantizedWeightTensor) -> str | None:
    """Why no 8-bit kernel can take ``weight``'s codes as they are stored (``None`` if kernels can)."""
    if weight.fmt.kernel_dtype is None:
        return f"no kernel for format {weight.fmt.name}: its codes are dequantized (torch_weight_only)"
    if weight.scale2 is not None:
        return f"format {weight.fmt.name} has a second-level scale, which only the dequantizing paths apply"
    return None


def codes_are_float(weight: QuantizedWeightTensor) -> bool:
    """Whether the 8-bit kernels take the codes as floats (FP8) rather than integers (``fmt.kernel_dtype``)."""
    return weight.fmt.kernel_dtype is not None and weight.fmt.kernel_dtype.is_floating_point


# ---- built-in backends ---------------------------------------------------------------------------------------


def _weight_only_refusal(x, weight, bias):
    if weight.act.is_dynamic:
        return "the weight asks for dynamic activation quantization"
    if not x.is_floating_point():
        return f"activations of dtype {x.dtype} are not floating point"
    return None


def _run_weight_only(x, weight, bias):
    return F.linear(x, weight.dequantize_stored(x.dtype), None if bias is None else bias.to(x.dtype))


def _weight_only_note(x, weight, traced):
    if weight.fmt.kernel_dtype is None:
        return f"dequantize + matmul (no kernel for format {weight.fmt.name})"
    return None


def _emulated_refusal(x, weight, bias):
    if not x.is_floating_point():
        return f"activations of dtype {x.dtype} are not floating point"
    if weight.act.is_dynamic and weight.fmt.kernel_dtype is None:
        return f"format {weight.fmt.name} has no 8-bit dtype to quantize activations to"
    return activation_refusal(weight.shape[1], weight.act)


def _run_emulated(x, weight, bias):
    w = weight.dequantize_stored(torch.float32)
    if not weight.fmt.rotates:
        return reference_linear(x, w, weight.fmt.kernel_dtype, weight.act, bias)
    rotated = weight.fmt.rotate_input_float32(x)  # quantized (dynamic) or multiplied as float32, never rounded first
    return reference_linear(rotated, w, weight.fmt.kernel_dtype, weight.act, bias).to(x.dtype)


def _emulated_note(x, weight, traced):
    if weight.fmt.rotates:
        return f"{weight.fmt.name}: x rotated in float32 (fmt.rotate_input_float32), float32 reference linear"
    return None


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
    """Why ``torch._scaled_mm`` cannot take this weight and input (None: it can), device aside.

    Shared by every backend that ends in ``torch._scaled_mm`` (the TORCH one here, the Triton-quantized one in
    ``lrq_ao.layouts.triton_backends``), so its constraints are stated once."""
    refusal = kernel_codes_refusal(weight)
    if refusal is not None:
        return refusal
    if not codes_are_float(weight) or not weight.act.is_dynamic:
        return "only for FP8 codes with dynamic activation quantization"
    if weight.act.granularity not in ("tensor", "row") or not is_per_tensor_or_row(weight):
        return "torch._scaled_mm here takes per-tensor or per-row scales, not block-wise ones"
    n, k = weight.shape
    if k % 16 or n % 16:
        return f"torch._scaled_mm needs K and N multiples of 16, got K={k}, N={n}"
    if is_rowwise_scaled_mm(weight) and x.dtype != torch.bfloat16:
        return f"row-wise torch._scaled_mm produces bfloat16 only, input is {x.dtype}"
    return None


def _scaled_mm_refusal(x, weight, bias):
    return scaled_mm_operand_refusal(x, weight) or _cuda_capability_refusal(x, (8, 9), "torch._scaled_mm")


def run_scaled_mm(x, weight, bias):
    """The ``torch_scaled_mm`` backend: fusable activation quantization + ``kernels.scaled_mm.scaled_mm_linear``."""
    from lrq_ao.kernels.scaled_mm import scaled_mm_linear  # imported with the plug-in backends, before compile

    n, k = weight.shape
    x2d = x.reshape(-1, k)
    xq, x_scale = quantize_activation_fusable(x2d, weight.fmt.kernel_dtype, weight.act)
    y = scaled_mm_linear(xq, x_scale, weight.qdata, weight.scale, is_rowwise_scaled_mm(weight), bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def is_rowwise_scaled_mm(weight: QuantizedWeightTensor) -> bool:
    """Whether ``torch._scaled_mm`` runs row-wise (per-token activations or a per-row weight) for this weight."""
    return weight.act.granularity == "row" or weight.block_size[0] == 1


def scaled_mm_note(x, weight, traced):
    """``describe``'s line for the backends that end in ``scaled_mm_linear``: the unit-scale route at small M."""
    from lrq_ao.kernels.scaled_mm import rowwise_scaled_mm_unsupported

    m, (n, k) = x.numel() // x.shape[-1], weight.shape
    if is_rowwise_scaled_mm(weight) and rowwise_scaled_mm_unsupported(m, n, k):
        return f"at M={m}: cuBLAS's tensor-wise FP8 GEMM with unit scales, both scales applied to its output"
    return None


# torch._int_mm on CUDA requires M > 16. Padding 16 zero rows unconditionally meets that without a branch on M.
_INT_MM_ROW_PAD = 16


def _int_mm_refusal(x, weight, bias):
    refusal = kernel_codes_refusal(weight) or convrot_generic_refusal(weight)
    if refusal is not None:
        return refusal
    if codes_are_float(weight) or not weight.act.is_dynamic:
        return "only for INT8 codes with dynamic activation quantization"
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
    xq, x_scale = quantize_activation_fusable(x2d, weight.fmt.kernel_dtype, weight.act)
    xq = F.pad(xq, (0, 0, 0, _INT_MM_ROW_PAD))
    acc = torch._int_mm(xq, weight.qdata.contiguous().t())[:m]
    y = (acc.float() * x_scale * weight.scale.reshape(1, -1)).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _convrot_int_mm_refusal(x, weight, bias):
    refusal = convrot_w8a8_refusal(x, weight)
    if refusal is not None or x.device.type == "cpu":  # torch._int_mm runs on CPU, any shape
        return refusal
    n, k = weight.shape
    if k % 8 or n % 8:
        return f"torch._int_mm needs K and N multiples of 8, got K={k}, N={n}"
    return _cuda_capability_refusal(x, (7, 5), "torch._int_mm")


def _run_convrot_int_mm(x, weight, bias):
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    rotated = weight.fmt.rotate_input_float32(x2d)
    xq, x_scale = quantize_activation_fusable(rotated, weight.fmt.kernel_dtype, weight.act)
    acc = torch._int_mm(F.pad(xq, (0, 0, 0, _INT_MM_ROW_PAD)), weight.qdata.contiguous().t())[:m]
    y = acc.float() * x_scale * weight.scale.reshape(1, -1)  # the Triton row GEMM's epilogue, in its order
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _convrot_int_mm_note(x, weight, traced):
    return (
        f"ConvRot (G={weight.fmt.hadamard_group}): float32 butterfly rotation + per-token INT8 in plain torch, then "
        f"torch._int_mm on the stored rotated codes"
    )


register_linear_backend(
    LinearBackend(
        "torch_convrot_int_mm",
        KernelChoice.TORCH,
        _convrot_int_mm_refusal,
        _run_convrot_int_mm,
        _convrot_int_mm_note,
        rotates_input=True,
    ),
    112,
)
register_linear_backend(
    LinearBackend("torch_scaled_mm", KernelChoice.TORCH, _scaled_mm_refusal, run_scaled_mm, scaled_mm_note), 110
)
register_linear_backend(LinearBackend("torch_int_mm", KernelChoice.TORCH, _int_mm_refusal, _run_int_mm), 110)
register_linear_backend(
    LinearBackend("torch_weight_only", KernelChoice.TORCH, _weight_only_refusal, _run_weight_only, _weight_only_note),
    100,
)
register_linear_backend(
    LinearBackend("emulated", KernelChoice.EMULATED, _emulated_refusal, _run_emulated, _emulated_note, True), 0
)


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
