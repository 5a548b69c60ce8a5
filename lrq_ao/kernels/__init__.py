"""Kernels for lrq_ao's quantized linears and learned rounding: functions of plain tensors, no tensor classes.

Importing this package imports neither Triton nor CUDA; each kernel family lives in its own module and is imported
on first use (``lrq_ao.layouts.triton_backends`` decides which quantized weight runs which op):

* ``act_quant``: dynamic activation quantization (FP8 / INT8; per tensor, per row, per 1 x block group).
* ``rotate_quant``: ConvRot activation rotation fused into per-token INT8 quantization (one pass over ``x``).
* ``fp8_linear``: FP8 dynamic linear, ``act_quant`` feeding ``torch._scaled_mm``.
* ``row_gemm``: per-row W8A8 GEMM (INT8 / FP8) with scales and bias fused in the epilogue.
* ``block_gemm``: block-wise W8A8 GEMM (INT8 / FP8), rescaled per K block.
* ``weight_only_gemm``: bf16 activations x INT8 / FP8 weights dequantized inside the GEMM.
* ``packed_gemm``: bf16 activations x packed 4-bit weights (NVFP4, ConvRot W4A4) decoded inside the GEMM.
* ``scaled_mm``: ``torch._scaled_mm`` as the FP8 linears call it (cuBLAS; no Triton, imported by both FP8 paths).
* ``rounding_sweep``: learned rounding's GPTQ / greedy sweeps (plain launchers, used by ``lrq_ao.rounding``).

Every op is a ``torch.library`` custom op in the ``lrq_ao`` namespace with a fake implementation beside it.
Its PyTorch reference is ``lrq_ao.layouts.activation`` (activations, emulated linear); ``rotate_quant`` carries its
own (``rotate_quantize_activation_reference``). Nothing here imports ``lrq_ao.layouts``: the element dtype a kernel
specializes on is an argument (the codes' dtype).
"""

KERNEL_MODULES = (
    "lrq_ao.kernels.act_quant",
    "lrq_ao.kernels.rotate_quant",
    "lrq_ao.kernels.fp8_linear",
    "lrq_ao.kernels.row_gemm",
    "lrq_ao.kernels.block_gemm",
    "lrq_ao.kernels.weight_only_gemm",
    "lrq_ao.kernels.packed_gemm",
)


def load_all() -> None:
    """Import every kernel module (registers all ``lrq_ao::`` kernel ops). Imports Triton."""
    import importlib

    for name in KERNEL_MODULES:
        importlib.import_module(name)
