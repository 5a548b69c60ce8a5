"""Linear backend registry and selection: kernel choice, refusals, priorities, the TORCH backends' arithmetic."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from lrq_ao.layouts import (
    ActivationMode,
    Float8Tensor,
    Int8Tensor,
    KernelChoice,
    LinearBackend,
    emulated_linear,
    make_weight_tensor,
    register_linear_backend,
    registered_backends,
    select_linear_backend,
    unregister_linear_backend,
)
from lrq_ao.primitives import sqnr

DYNAMIC_ROW = ActivationMode("dynamic", "row")


def _w(seed=0, shape=(64, 96)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


def _x(m=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, m, 96, generator=g).to(torch.bfloat16)


def _with_kernel(t, kernel):
    return make_weight_tensor(t.qdata, t.scale, t.block_size, t.dtype, act=t.act, kernel=kernel)


def _backend(name: str) -> LinearBackend:
    return next(b for b in registered_backends() if b.name == name)


@pytest.fixture
def fake_backend():
    """A high-priority backend registered for one test and removed afterwards."""
    calls = []
    state = {"refuse": None}

    def supports(x, weight, bias):
        return state["refuse"]

    def run(x, weight, bias):
        calls.append(tuple(x.shape))
        return emulated_linear(x, weight.qdata, weight.scale, weight.block_size, weight.act, bias)

    register_linear_backend(LinearBackend("test_fake_triton", KernelChoice.TRITON, supports, run), priority=10_000)
    yield calls, state
    unregister_linear_backend("test_fake_triton")


def test_auto_on_cpu_picks_weight_only_or_emulated():
    x = _x()
    wo = Int8Tensor.from_hp(_w(), "row")
    assert select_linear_backend(x, wo)[0].name == "torch_weight_only"
    dyn = Float8Tensor.from_hp(_w(), "row", act=DYNAMIC_ROW)
    backend, refusals = select_linear_backend(x, dyn)
    assert backend.name == "emulated"
    reasons = dict(refusals)
    assert "needs a CUDA device" in reasons["torch_scaled_mm"]
    assert "dynamic activation" in reasons["torch_weight_only"]


def test_explicit_torch_choice_without_usable_backend_lists_refusals():
    dyn = Int8Tensor.from_hp(_w(), "row", act=DYNAMIC_ROW, kernel="torch")
    with pytest.raises(RuntimeError, match=r"kind 'torch'.*torch_int_mm: torch\._int_mm needs a CUDA device"):
        F.linear(_x(), dyn)


def test_triton_choice_on_cpu_is_refused_not_silently_replaced():
    w = Int8Tensor.from_hp(_w(), "row", kernel=KernelChoice.TRITON)
    with pytest.raises(RuntimeError, match="kind 'triton'"):
        F.linear(_x(), w)


def test_emulated_choice_is_honoured_for_weight_only():
    w = Int8Tensor.from_hp(_w(), "row", kernel="emulated")
    x = _x()
    assert select_linear_backend(x, w)[0].name == "emulated"
    expected = emulated_linear(x, w.qdata, w.scale, w.block_size, w.act)
    assert torch.equal(F.linear(x, w), expected)


def test_registered_backend_wins_by_priority_and_refusal_falls_through(fake_backend):
    calls, state = fake_backend
    w = Int8Tensor.from_hp(_w(), "block", block=32, act=ActivationMode("dynamic", "block", 32))
    x = _x()
    F.linear(x, w)
    assert calls == [(2, 5, 96)]
    state["refuse"] = "test says no"
    backend, refusals = select_linear_backend(x, w)
    assert backend.name == "emulated" and ("test_fake_triton", "test says no") in refusals
    assert "test_fake_triton refused: test says no" in w.describe(x)
    with pytest.raises(RuntimeError, match="test_fake_triton: test says no"):
        F.linear(x, _with_kernel(w, "triton"))


def test_describe_names_the_backend_a_compiled_graph_takes_when_it_differs(fake_backend):
    from lrq_ao.layouts.linear import is_traced_for_compile

    _, state = fake_backend
    w = Int8Tensor.from_hp(_w(), "row", act=DYNAMIC_ROW)
    assert "under torch.compile" not in w.describe(_x())
    refuse_when_traced = LinearBackend(
        "test_fake_triton", KernelChoice.TRITON, lambda x, w, b: "traced" if is_traced_for_compile(x) else None, None
    )
    register_linear_backend(refuse_when_traced, priority=10_000)  # replaced by the fixture's teardown
    assert w.describe(_x()).splitlines()[0].endswith(": test_fake_triton")
    assert w.describe(_x()).splitlines()[-1] == "  under torch.compile: emulated"


def test_selection_does_not_depend_on_batch_size():
    for t in (Int8Tensor.from_hp(_w(), "row", act=DYNAMIC_ROW), Float8Tensor.from_hp(_w(), "tensor")):
        names = {select_linear_backend(_x(m), t)[0].name for m in (1, 16, 17, 300)}
        assert len(names) == 1


def test_shape_errors_are_clear():
    w = Int8Tensor.from_hp(_w(), "row")
    with pytest.raises(ValueError, match="input has 64 features but the quantized weight expects 96"):
        F.linear(torch.randn(3, 64, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
        F.linear(_x(), w, torch.zeros(8, dtype=torch.bfloat16))


def test_quantized_activation_operand_is_rejected():
    w = Int8Tensor.from_hp(_w(), "row")
    with pytest.raises(NotImplementedError, match="only supported as the weight"):
        F.linear(w, w)


# The TORCH dynamic backends declare CUDA only, but torch._int_mm and torch._scaled_mm also run on CPU, so their
# arithmetic (scale layout, M padding, bias) is checked here against the emulated reference.


@pytest.mark.parametrize("m", [1, 16, 17])
def test_int_mm_backend_arithmetic_matches_emulated(m):
    w = Int8Tensor.from_hp(_w(), "row", act=DYNAMIC_ROW)
    x, bias = _x(m), _w(2, (64,))
    y = _backend("torch_int_mm").run(x, w, bias)
    assert torch.equal(y, emulated_linear(x, w.qdata, w.scale, w.block_size, w.act, bias))


def _scaled_mm_device() -> str:
    """CUDA where it runs FP8 (SM >= 8.9); else CPU, whose row-wise ``_scaled_mm`` exists from torch 2.12 on."""
    return "cuda" if _cuda_capability() >= (8, 9) else "cpu"


@pytest.mark.parametrize("layout,granularity", [("tensor", "tensor"), ("row", "row"), ("tensor", "row")])
def test_scaled_mm_backend_arithmetic_matches_emulated(layout, granularity):
    device = _scaled_mm_device()
    w = Float8Tensor.from_hp(_w().to(device), layout, act=ActivationMode("dynamic", granularity))
    x, bias = _x().to(device), _w(2, (64,)).to(device)
    y = _backend("torch_scaled_mm").run(x, w, bias)
    expected = emulated_linear(x, w.qdata, w.scale, w.block_size, w.act, bias)
    assert sqnr(expected.double(), y) >= 45  # same quantized operands; only accumulation order differs


def _cuda_capability():
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


@functools.cache
def _cpu_rowwise_scaled_mm_refusal() -> str | None:
    """Why torch's CPU ``_scaled_mm`` cannot take row-wise scales (None: it can). torch 2.11 raises "Now _scaled_mm
    only supports per-tensor scaling for CPU backend" (seen on the GPU machine); 2.13 takes them."""
    a = torch.ones(16, 32).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError as error:
        return f"torch {torch.__version__}: CPU _scaled_mm: {str(error).splitlines()[0][-90:]}"
    return None


needs_cpu_rowwise_scaled_mm = pytest.mark.skipif(
    _cpu_rowwise_scaled_mm_refusal() is not None, reason=str(_cpu_rowwise_scaled_mm_refusal())
)


def test_scaled_mm_backend_compiled_equals_eager_with_fused_quantization():
    """Inside torch.compile the backend's activation quantization is plain torch code: same bits as eager."""
    from torch._inductor.utils import run_and_get_code

    backend = _backend("torch_scaled_mm")
    device = _scaled_mm_device()
    w = Float8Tensor.from_hp(_w().to(device), "row", act=DYNAMIC_ROW)
    x, bias = _x(7).reshape(14, 96).to(device), _w(2, (64,)).to(device)
    fn = torch.compile(lambda x, b: backend.run(x * 2, w, b), fullgraph=True, dynamic=True)
    y, code = run_and_get_code(fn, x, bias)
    assert torch.equal(y, backend.run(x * 2, w, bias))
    code = "\n".join(code)
    assert "_scaled_mm" in code and "lrq_ao" not in code  # no opaque op: Inductor sees the quantization


def test_only_narrow_fast_activations_are_quantized_in_graph_and_only_while_traced():
    """AOTAutograd traces the subclass with fake inputs (and, on torch 2.11, ``is_compiling()`` false)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lrq_ao.layouts.activation import ActivationMode
    from lrq_ao.layouts.triton_backends import FUSED_QUANT_MAX_K, quantize_in_graph

    fast = ActivationMode("dynamic", "row", exact=False)
    x_narrow, x_wide = _x(), torch.randn(3, FUSED_QUANT_MAX_K, dtype=torch.bfloat16)
    narrow_fast = Float8Tensor.from_hp(_w(), "row", act=fast)
    narrow_exact = Float8Tensor.from_hp(_w(), "row", act=DYNAMIC_ROW)
    wide_fast = Float8Tensor.from_hp(torch.randn(16, FUSED_QUANT_MAX_K, dtype=torch.bfloat16), "row", act=fast)
    assert not quantize_in_graph(x_narrow, narrow_fast)  # eager: the Triton pass
    with FakeTensorMode() as mode:
        assert quantize_in_graph(mode.from_tensor(x_narrow), narrow_fast)
        assert not quantize_in_graph(mode.from_tensor(x_narrow), narrow_exact)
        assert not quantize_in_graph(mode.from_tensor(x_wide), wide_fast)


@pytest.mark.skipif(_cuda_capability() < (8, 9), reason="torch._scaled_mm FP8 needs CUDA SM >= 8.9")
def test_scaled_mm_selected_and_accurate_on_cuda():
    from torch._inductor.utils import run_and_get_code

    w = Float8Tensor.from_hp(_w().cuda(), "row", act=DYNAMIC_ROW)
    x = _x(33).cuda()
    # eager: the one-pass Triton quantizer if Triton is there; compiled: the fusable TORCH backend
    assert select_linear_backend(x, w)[0].name in ("triton_fp8_scaled_mm", "torch_scaled_mm")
    expected = emulated_linear(x, w.qdata, w.scale, w.block_size, w.act)
    assert sqnr(expected.double(), F.linear(x, w)) >= 40
    y, code = run_and_get_code(torch.compile(F.linear, fullgraph=True), x, w)
    assert "fp8_scaled_mm_linear" in "\n".join(code)  # exact mode: the Triton quantizer
    assert sqnr(expected.double(), y) >= 40


@pytest.mark.skipif(_cuda_capability() < (7, 5), reason="torch._int_mm needs CUDA")
def test_int_mm_selected_and_accurate_on_cuda():
    w = _with_kernel(Int8Tensor.from_hp(_w().cuda(), "row", act=DYNAMIC_ROW), KernelChoice.TORCH)
    x = _x(3).cuda()
    assert select_linear_backend(x, w)[0].name == "torch_int_mm"  # under AUTO the Triton row GEMM ranks first
    expected = emulated_linear(x, w.qdata, w.scale, w.block_size, w.act)
    assert sqnr(expected.double(), F.linear(x, w)) >= 40


# cuBLAS's row-wise FP8 GEMM has no algorithm for K > N at small M (measured on the H100 / H200; see
# kernels.scaled_mm.ROWWISE_SCALED_MM_MIN_M): such products take the tensor-wise kernel with unit scales.
def test_rowwise_scaled_mm_is_avoided_only_for_k_above_n_at_small_m():
    from lrq_ao.kernels.scaled_mm import ROWWISE_SCALED_MM_MIN_M, rowwise_scaled_mm_unsupported

    assert rowwise_scaled_mm_unsupported(16, 3072, 12288) and rowwise_scaled_mm_unsupported(1, 4096, 10240)
    assert not rowwise_scaled_mm_unsupported(ROWWISE_SCALED_MM_MIN_M, 3072, 12288)
    assert not rowwise_scaled_mm_unsupported(16, 9216, 3072)


def _fp8_operands(m: int, n: int, k: int, device: str = "cpu"):
    from lrq_ao.layouts.activation import quantize_activation

    g = torch.Generator().manual_seed(m * 7 + n)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 1, k)).to(torch.bfloat16).to(device)
    w = Float8Tensor.from_hp(torch.randn(n, k, generator=g).to(torch.bfloat16).to(device), "row", act=DYNAMIC_ROW)
    xq, x_scale = quantize_activation(x, w.qdata.dtype, DYNAMIC_ROW)
    bias = torch.randn(n, generator=g).to(torch.bfloat16).to(device)
    expected = x_scale.double() * (xq.double() @ w.qdata.double().t()) * w.scale.double().t() + bias.double()
    return xq, x_scale, w, bias, expected


@needs_cpu_rowwise_scaled_mm
@pytest.mark.parametrize("m", [1, 16, 40])
def test_scaled_mm_linear_unit_scale_route_matches_the_rowwise_product(m):
    """On CPU both routes run (torch's CPU ``_scaled_mm``): the unit-scale one (K > N, M < 256) must give the
    row-wise product within bfloat16 rounding, against a float64 computation of the same quantized operands."""
    from lrq_ao.kernels.scaled_mm import scaled_mm_linear, scaled_mm_scales

    xq, x_scale, w, bias, expected = _fp8_operands(m, 32, 96)
    y = scaled_mm_linear(xq, x_scale, w.qdata, w.scale, True, bias, torch.bfloat16)
    a, b = scaled_mm_scales(x_scale, w.scale, True, m, 32)
    rowwise = torch._scaled_mm(xq, w.qdata.t(), a, b, bias=bias, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == (m, 32)
    assert sqnr(expected, y) > 45 and sqnr(expected, rowwise) > 45


@pytest.mark.skipif(_cuda_capability() < (8, 9), reason="torch._scaled_mm FP8 needs CUDA SM >= 8.9")
@pytest.mark.parametrize("m", [1, 16, 17, 255, 256])
def test_fp8_dynamic_k_above_n_runs_at_every_m_on_cuda(m):
    """12288 -> 3072 at M = 16 raised CUBLAS_STATUS_NOT_SUPPORTED through the row-wise kernel (H200, torch 2.11)."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 12288, generator=g).to(torch.bfloat16).cuda()
    w = Float8Tensor.from_hp(torch.randn(3072, 12288, generator=g).to(torch.bfloat16).cuda(), "row", act=DYNAMIC_ROW)
    bias = torch.randn(3072, generator=g).to(torch.bfloat16).cuda()
    expected = emulated_linear(x, w.qdata, w.scale, w.block_size, w.act, bias)
    assert ("tensor-wise FP8 GEMM with unit scales" in w.describe(x)) == (m < 256)
    for kernel in (KernelChoice.AUTO, KernelChoice.TORCH):
        weight = _with_kernel(w, kernel)
        assert sqnr(expected, F.linear(x, weight, bias)) > 40, kernel
        torch._dynamo.reset()
        assert sqnr(expected, torch.compile(F.linear, fullgraph=True)(x, weight, bias)) > 40, kernel


@needs_cpu_rowwise_scaled_mm
def test_scaled_mm_linear_compiles_on_both_sides_of_the_m_threshold():
    """The test on M is a guard under torch.compile(dynamic=True): no graph break, the same result as eager below
    and above ``ROWWISE_SCALED_MM_MIN_M`` (CPU ``_scaled_mm``, K > N)."""
    from lrq_ao.kernels.scaled_mm import ROWWISE_SCALED_MM_MIN_M, scaled_mm_linear

    torch._dynamo.reset()
    compiled = torch.compile(scaled_mm_linear, fullgraph=True, dynamic=True)
    for m in (16, 40, ROWWISE_SCALED_MM_MIN_M + 44, 20):
        xq, x_scale, w, bias, _ = _fp8_operands(m, 32, 96)
        eager = scaled_mm_linear(xq, x_scale, w.qdata, w.scale, True, bias, torch.bfloat16)
        assert torch.equal(compiled(xq, x_scale, w.qdata, w.scale, True, bias, torch.bfloat16), eager), m
