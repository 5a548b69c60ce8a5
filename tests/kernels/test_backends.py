"""TRITON linear backends: declared capability, dispatch from the layouts, and torch.compile visibility."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, FP8_COMPUTE, ON_CUDA, scaled_randn
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

from lrq_ao.layouts import make_weight_tensor
from lrq_ao.layouts.activation import activation_mode_for, emulated_linear
from lrq_ao.primitives import format_spec, quantize_rtn, sqnr

# (format, activation kind) -> the backend that must take it and the op it calls.
EXPECTED = {
    ("fp8", "dynamic"): ("triton_fp8_scaled_mm", "fp8_scaled_mm_linear"),
    ("fp8_row", "dynamic"): ("triton_fp8_scaled_mm", "fp8_scaled_mm_linear"),
    ("fp8_block", "dynamic"): ("triton_w8a8_block", "block_scaled_linear"),
    ("int8", "dynamic"): ("triton_w8a8_row", "row_scaled_linear"),
    ("int8_tensor", "dynamic"): ("triton_w8a8_row", "row_scaled_linear"),
    ("int8_block", "dynamic"): ("triton_w8a8_block", "block_scaled_linear"),
}
EXPECTED.update({(fmt, "weight_only"): ("triton_weight_only", "weight_only_linear") for fmt, _ in list(EXPECTED)})
# Inside torch.compile, narrow fast-mode activations are quantized in fusable torch code; the graph calls only the GEMM.
COMPILED_OP = {"row_scaled_linear": "row_scaled_gemm", "block_scaled_linear": "block_scaled_gemm"}
SQNR_FLOOR_DB = 37.0  # vs the float32 emulation; bf16 output (and bf16 dequantized weight) rounding ~43-50 dB


def _quantized_linear(fmt: str, kind: str, kernel: str = "triton", n: int = 64, k: int = 96, exact: bool = True):
    spec = format_spec(fmt, 32)
    linear = torch.nn.Linear(k, n, bias=True, dtype=torch.bfloat16)
    q, s, block_size = quantize_rtn(linear.weight.detach(), spec)
    act = activation_mode_for(kind, spec.qdtype, block_size, (n, k), exact)
    weight = make_weight_tensor(q, s, block_size, torch.bfloat16, act=act, kernel=kernel)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return linear.to(DEVICE)


def _cases():
    for (fmt, kind), expected in EXPECTED.items():
        marks = [] if FP8_COMPUTE or not fmt.startswith("fp8") or kind == "weight_only" else [pytest.mark.skip("SM<89")]
        yield pytest.param(fmt, kind, *expected, id=f"{fmt}-{kind}", marks=marks)


@pytest.mark.parametrize("fmt, kind, backend, op", list(_cases()))
def test_dispatch_and_output(fmt, kind, backend, op):
    linear = _quantized_linear(fmt, kind)
    x = scaled_randn(6, 96).reshape(2, 3, 96)
    described = linear.weight.describe(x)
    assert described.splitlines()[0].endswith(f": {backend}"), described
    y = linear(x)
    w = linear.weight
    ref = emulated_linear(x.float(), w.qdata, w.scale, w.block_size, w.act, linear.bias.float())
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    assert sqnr(ref, y) > SQNR_FLOOR_DB


@pytest.mark.skipif(ON_CUDA, reason="the interpreter rule concerns CPU tensors")
def test_cpu_auto_never_takes_the_interpreter():
    linear = _quantized_linear("int8", "dynamic", kernel="auto")
    described = linear.weight.describe(scaled_randn(2, 96))
    assert "triton_w8a8_row refused: the Triton interpreter runs on CPU only when kernel='triton'" in described


def test_refusal_names_the_reason():
    linear = _quantized_linear("int8_block", "dynamic", n=64, k=96)
    x = scaled_randn(2, 96, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="activations must be floating point|bfloat16"):
        F.linear(x, linear.weight, None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt, kind, backend, op",
    [c for c in _cases() if c.id in ("fp8-dynamic", "int8-dynamic", "int8_block-dynamic", "fp8_row-weight_only")],
)
def test_compiled_model_calls_our_op_without_graph_break(fmt, kind, backend, op):
    torch._dynamo.reset()
    model = torch.nn.Sequential(_quantized_linear(fmt, kind), torch.nn.GELU())
    x = scaled_randn(5, 96)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():  # the kernels are inference-only (no autograd formula)
        eager = model(x)
        out, codes = run_and_get_code(compiled, x)
    FileCheck().check(f"lrq_ao.{op}").run("\n".join(codes))
    assert sqnr(eager, out) > 40.0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "fp8_row", "int8_block"])
def test_compiled_single_row_weight_only_is_an_inductor_reduction(fmt):
    """M = 1 under torch.compile: plain torch (one reduction kernel) instead of the op, against the float32
    emulation; the same compiled function at M = 5 still calls the op."""
    torch._dynamo.reset()
    linear = _quantized_linear(fmt, "weight_only")
    w = linear.weight
    x1 = scaled_randn(2, 96)[1:].reshape(1, 1, 96)  # row 0 of scaled_randn is all zero
    assert "at M=1 under torch.compile: one Inductor reduction" in w.describe(x1)
    compiled = torch.compile(linear, fullgraph=True, dynamic=True)
    with torch.no_grad():
        y1, code1 = run_and_get_code(compiled, x1)
        y5, code5 = run_and_get_code(compiled, scaled_randn(5, 96))
    FileCheck().check_not("lrq_ao.weight_only_linear").run("\n".join(code1))
    FileCheck().check("lrq_ao.weight_only_linear").run("\n".join(code5))
    ref = emulated_linear(x1.float(), w.qdata, w.scale, w.block_size, w.act, linear.bias.float())
    assert y1.shape == (1, 1, 64) and y1.dtype == torch.bfloat16
    assert sqnr(ref, y1) > SQNR_FLOOR_DB


@pytest.mark.slow
@pytest.mark.parametrize(
    "exact, wide", [(False, False), (False, True), (True, False)], ids=["fast", "fast-wide", "exact"]
)
@pytest.mark.parametrize("fmt", ["int8", "int8_block"])
def test_compiled_activation_quantized_in_graph_only_when_fast_and_narrow(fmt, exact, wide, monkeypatch):
    """Fast mode below FUSED_QUANT_MAX_K: the compiled graph quantizes in plain torch ops and calls only the GEMM op,
    within bf16 noise of the eager (exact) call. Fast mode at or above it, and exact mode at any K: the one Triton op
    (quantization + GEMM) and a result bit-identical to the eager call."""
    from lrq_ao.layouts import triton_backends as backends

    if wide:  # K = 96 here: the real threshold needs huge CPU shapes
        monkeypatch.setattr(backends, "FUSED_QUANT_MAX_K", 64)
    torch._dynamo.reset()
    linear = _quantized_linear(fmt, "dynamic", exact=exact)
    assert str(linear.weight.act).endswith("/fast") != exact
    op = EXPECTED[(fmt, "dynamic")][1]
    x = scaled_randn(5, 96)
    with torch.no_grad():
        eager = linear(x)
        out, codes = run_and_get_code(torch.compile(linear, fullgraph=True, dynamic=True), x)
    code = "\n".join(codes)
    if exact or wide:
        FileCheck().check(f"lrq_ao.{op}").check_not(f"lrq_ao.{COMPILED_OP[op]}").run(code)
        assert torch.equal(eager, out)
    else:
        FileCheck().check(f"lrq_ao.{COMPILED_OP[op]}").check_not(f"lrq_ao.{op}").run(code)
        assert sqnr(eager, out) > 40.0


def test_rotating_format_runs_the_ordinary_int8_kernel_on_rotated_activations():
    """A format that rotates its inputs (ConvRot-like; here a sign flip of every other input feature, its own
    inverse) and keeps INT8 kernels: the Triton row GEMM runs on ``rotate_input(x)`` and the stored codes."""
    from dataclasses import dataclass

    from lrq_ao.formats.scaled import ScaledFormat
    from lrq_ao.layouts import weight_tensor

    @dataclass(frozen=True)
    class FlipSigns(ScaledFormat):
        rotates = True  # a class attribute shadows the base property: every instance rotates
        kernel_dtype = torch.int8

        def rotate_input(self, x):
            return x * torch.tensor([1.0, -1.0], dtype=x.dtype, device=x.device).repeat(x.shape[-1] // 2)

        rotate_weight = unrotate_weight = rotate_input

    fmt = FlipSigns(torch.int8, "row")
    w = scaled_randn(64, 96, dtype=torch.float32, seed=3).cpu()
    qw = fmt.quantize(w)
    act = activation_mode_for("dynamic", fmt, qw.block_size, w.shape)
    weight = weight_tensor(fmt, qw, torch.bfloat16, act=act, kernel="triton").to(DEVICE)
    x = scaled_randn(6, 96)
    assert weight.describe(x).splitlines()[0].endswith(": triton_w8a8_row")
    y = F.linear(x, weight)
    plain = F.linear(x.float(), weight.dequantize(torch.float32))
    assert sqnr(plain, y) > SQNR_FLOOR_DB
