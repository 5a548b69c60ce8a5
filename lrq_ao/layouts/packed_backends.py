"""TRITON linear backend for packed 4-bit formats: ``lrq_ao.kernels.packed_gemm`` decodes the codes in registers.

Registered with ``lrq_ao.layouts.registry``, which imports this module beside ``triton_backends`` at the first eager
selection or construction (never at ``import lrq_ao``). Importing it does not import Triton; the kernel module is
imported once the device can run Triton and the weight passed every other check.

| backend | weight | activations | kernel | priority |
| --- | --- | --- | --- | --- |
| ``triton_packed_weight_only`` | packed 4-bit, ``(1, G)`` / per-row scales | bf16 / fp16 | ``packed_gemm`` | 104 |

Capability is asked of the weight, never of the format's name: the element says how a stored nibble decodes
(``element.nibble_values``, a 16-entry table the kernel must have a decoder for: E2M1 and two's-complement INT4
today) and which nibble holds the even column (``element.even_code_high``); the format says whether its weight is
``decode(code) * effective scale`` per group (``fmt.rounding_refusal() is None``, the same product learned rounding
relies on) and carries no further tensors (``weight.extra``). The kernel multiplies ``scale`` per ``(1, G)`` group
and ``scale2`` once: the two-level rule ``effective_scale = scale * scale2`` of NVFP4, checked for every registered
format in ``tests/kernels/test_packed_gemm.py``. So NVFP4 and ConvRot W4A4 (``x`` arrives rotated) run here; W4A8,
whose values are an INT8 grid per group, is refused and dequantized by ``torch_weight_only``.

Priority 104: under the TRITON weight-only kernel (105, which refuses formats without an 8-bit kernel dtype) and
above ``torch_weight_only`` (100), whose eager dequantization unpacks through several float32 temporaries.
The op chooses its route on the concrete M (``describe`` says which): a GEMV at M = 1, a split-K MMA kernel up to
M = 16, one Triton dequantization pass to ``x.dtype`` and cuBLAS above. On CPU it runs only through Triton's
interpreter, only when ``TRITON_INTERPRET=1`` and only for ``kernel='triton'`` (tests).
"""

from __future__ import annotations

import importlib

import torch

from lrq_ao.kernels._runtime import triton_refusal
from lrq_ao.layouts.activation import KernelChoice
from lrq_ao.layouts.registry import LinearBackend, register_linear_backend

NAME = "triton_packed_weight_only"
PRIORITY = 104
KERNEL_MODULE = "lrq_ao.kernels.packed_gemm"


def _kernels():
    """The kernel module (imports Triton; registers ``lrq_ao::packed_weight_only_linear``)."""
    return importlib.import_module(KERNEL_MODULE)


def _element_refusal(weight) -> str | None:
    element = weight.fmt.element
    if element.bits != 4 or element.nibble_values is None or element.even_code_high is None:
        return f"element {element.name} of format {weight.fmt.name} is not a packed 4-bit code table"
    return None


def _format_refusal(weight) -> str | None:
    fmt = weight.fmt
    if weight.extra:
        return f"format {fmt.name} stores further tensors ({', '.join(weight.extra)}) the kernel does not apply"
    if fmt.rounding_refusal() is not None:
        return f"format {fmt.name} is not decode(code) * scale per group: {fmt.rounding_refusal()}"
    bn, bk = weight.block_size
    if bn != 1:
        return f"needs one scale per row or per (1, G) group along K, got block size {weight.block_size}"
    return None


def _device_refusal(x: torch.Tensor, weight) -> str | None:
    reason = triton_refusal(x.device)
    if reason is None and x.device.type == "cpu" and weight.kernel is not KernelChoice.TRITON:
        reason = "the Triton interpreter runs on CPU only when kernel='triton' is asked for"
    return reason


def _packed_refusal(x, weight, bias):
    if weight.act.is_dynamic:
        return "the weight asks for dynamic activation quantization"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"the tensor-core kernel takes bfloat16 / float16 activations, got {x.dtype}"
    reason = _element_refusal(weight) or _format_refusal(weight) or _device_refusal(x, weight)
    if reason is not None:
        return reason
    kernels = _kernels()
    if kernels.decoder_for(weight.fmt.element.nibble_values) is None:
        return f"the kernel has no decoder for the codes of element {weight.fmt.element.name}"
    return kernels.group_refusal(weight.block_size[1], weight.shape[1])


def _run_packed(x, weight, bias):
    element = weight.fmt.element
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.lrq_ao.packed_weight_only_linear(
        x2d,
        weight.qdata,
        weight.scale,
        weight.scale2,
        weight.block_size[1],
        list(element.nibble_values),
        element.even_code_high,
        bias,
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _packed_note(x, weight, traced):
    m = x.numel() // x.shape[-1]
    if m == 1:
        route = "GEMV kernel (float32 products, no MMA)"
    elif m <= _kernels().SMALL_M_MAX:
        route = "split-K MMA kernel"
    else:
        route = f"one Triton dequantization to {x.dtype} + cuBLAS"
    return f"at M={m}: {weight.fmt.element.name} codes decoded in registers, {route}"


register_linear_backend(LinearBackend(NAME, KernelChoice.TRITON, _packed_refusal, _run_packed, _packed_note), PRIORITY)
