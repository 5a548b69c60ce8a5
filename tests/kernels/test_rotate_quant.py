"""The fused ConvRot rotation + per-token INT8 pass is bit-identical to its PyTorch reference, whose rotation is
the block-diagonal regular Hadamard (checked in float64 against comfy-kitchen's own matrix) and whose quantization
is ``layouts.activation.quantize_activation``'s."""

from __future__ import annotations

import math

import pytest
import torch
from comfy_kitchen.backends.eager.quantization import quantize_and_rotate_rowwise
from comfy_kitchen.tensor.int8_utils import _build_hadamard
from kernel_testing import DEVICE, ON_CUDA
from torch._subclasses.fake_tensor import FakeTensorMode

from lrq_ao.kernels import KERNEL_MODULES, load_all
from lrq_ao.kernels.rotate_quant import (
    rotate_exact,
    rotate_quantize_activation_reference,
    rotate_quantize_activation_triton,
)
from lrq_ao.layouts.activation import ActivationMode, quantize_activation

GROUPS = (16, 64, 256, 1024)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DTYPE_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# (M, K, G, dtype): M in {1, 3, 17} x K in {G, 3G} for every group, the dtype cycling through the cases (every dtype
# meets every group); then K past one 4096 tile (two passes, the last tile ragged: 5 x 1024 and 17 x 256 columns).
CASES = [
    (m, mult * g, g, DTYPES[i % 3])
    for i, (g, m, mult) in enumerate((g, m, mult) for g in GROUPS for m in (1, 3, 17) for mult in (1, 3))
]
CASES += [(2, 5 * 1024, 1024, torch.bfloat16), (3, 17 * 256, 256, torch.float16), (1, 4096, 1024, torch.float32)]
if ON_CUDA:
    CASES += [(4608, 3072, 256, torch.bfloat16), (16, 15360, 256, torch.bfloat16), (1024, 12288, 1024, torch.float16)]


def activations(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Columns of very different magnitude; with M >= 3 row 0 is all zero and row 1 has one huge outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)
    if m >= 3:
        x[0] = 0.0
        x[1, k // 3] = 3.0e4  # fits fp16 (max 65504); dominates its row's amax after rotation
    return x.to(dtype)


def _id(case) -> str:
    m, k, g, dtype = case
    return f"{m}x{k}-G{g}-{DTYPE_IDS[dtype]}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_bit_identical_to_reference(case):
    m, k, g, dtype = case
    x = activations(m, k, dtype, seed=m + k + g)
    q_ref, s_ref = rotate_quantize_activation_reference(x, g)
    q, s = rotate_quantize_activation_triton(x.to(DEVICE), g)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (m, 1)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu(), q_ref)


def test_strided_rows():
    """A row stride wider than K (a column slice of a wider activation) reads the right values."""
    wide = activations(5, 512, torch.bfloat16, seed=3)
    x = wide[:, :256]
    q, s = rotate_quantize_activation_triton(x.to(DEVICE), 64)
    q_ref, s_ref = rotate_quantize_activation_reference(x.contiguous(), 64)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


def test_zero_and_outlier_rows():
    x = activations(3, 768, torch.bfloat16, seed=1)
    q, s = rotate_quantize_activation_triton(x.to(DEVICE), 256)
    assert s[0].item() == torch.tensor(1e-8, dtype=torch.float32).item() and not q[0].any()  # the scale floor
    # One outlier spreads over its whole group of 256: every rotated value there is ±3e4 / 16 + small terms.
    assert q[1].abs().max().item() == 127
    start = (768 // 3) // 256 * 256  # the outlier's group
    assert (q[1, start : start + 256].abs().cpu() >= 126).all()


@pytest.mark.parametrize("g", GROUPS)
def test_reference_rotation_within_float32_rounding_of_float64(g):
    """The butterfly equals ``x @ blockdiag(H)`` in float64 (kitchen's ``_build_hadamard``) within its rounding:
    ``log4(G)`` stages of two float32 additions each, on partial sums bounded by the group's L1 norm."""
    x = activations(7, 3 * g, torch.float32, seed=g)
    exact = (x.double().reshape(7, 3, g) @ _build_hadamard(g, dtype=torch.float64)).reshape(7, 3 * g)
    l1 = x.double().abs().reshape(7, 3, g).sum(-1, keepdim=True).expand(7, 3, g).reshape(7, 3 * g)
    bound = 2 * math.log(g, 4) * 2.0**-24 * l1 / math.sqrt(g)
    err = (rotate_exact(x, g).double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_reference_quantizes_as_quantize_activation(dtype):
    """Same rules as the project's activation quantization (scale floor, true division, ties to even, ±127)."""
    x = activations(17, 768, dtype, seed=5)
    rotated = rotate_exact(x, 256)
    q_ref, s_ref = quantize_activation(rotated, torch.int8, ActivationMode("dynamic", "row"))
    q, s = rotate_quantize_activation_reference(x, 256)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_near_comfy_kitchen_float32():
    """Against kitchen's own rotate-then-quantize (dense float32 matmul, its own scale): same codes but where the
    rotated value sits within float32 rounding of a rounding boundary."""
    x = activations(17, 3 * 256, torch.float32, seed=7)
    q_kitchen, s_kitchen = quantize_and_rotate_rowwise(x, _build_hadamard(256, dtype=torch.float32), 256)
    q, s = rotate_quantize_activation_reference(x, 256)
    torch.testing.assert_close(s[1:], s_kitchen[1:], rtol=1e-6, atol=0)  # row 0 is zero: kitchen's floor is 1e-30
    diff = (q.int() - q_kitchen.int()).abs()
    assert diff.max().item() <= 1 and diff.float().mean().item() < 1e-3


def test_errors():
    x = activations(3, 96, torch.float32)
    with pytest.raises(ValueError, match="does not divide K=96"):
        rotate_quantize_activation_triton(x.to(DEVICE), 64)
    with pytest.raises(ValueError, match="must be one of"):
        rotate_quantize_activation_triton(x.to(DEVICE), 32)
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        rotate_quantize_activation_triton(x.double().to(DEVICE), 16)
    with pytest.raises(ValueError, match="2-D tensor"):
        rotate_quantize_activation_triton(x[0].to(DEVICE), 16)


def test_registered_by_load_all():
    assert "lrq_ao.kernels.rotate_quant" in KERNEL_MODULES
    load_all()
    assert hasattr(torch.ops.lrq_ao, "rotate_quant_int8")


def test_opcheck():
    for x, g in [(activations(3, 48, torch.bfloat16).to(DEVICE), 16), (activations(5, 256, torch.float32), 64)]:
        torch.library.opcheck(torch.ops.lrq_ao.rotate_quant_int8.default, (x.to(DEVICE), g))


def test_fake_shapes():
    with FakeTensorMode():
        q, s = torch.ops.lrq_ao.rotate_quant_int8(torch.empty(9, 3072, dtype=torch.bfloat16), 256)
    assert (q.shape, q.dtype, s.shape, s.dtype) == ((9, 3072), torch.int8, (9, 1), torch.float32)


def test_compiled_fullgraph():
    x = activations(3, 192, torch.bfloat16, seed=2).to(DEVICE)
    fn = torch.compile(lambda t: torch.ops.lrq_ao.rotate_quant_int8(t, 64), fullgraph=True)
    q, s = fn(x)
    q_ref, s_ref = rotate_quantize_activation_reference(x.cpu(), 64)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)
