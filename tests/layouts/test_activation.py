"""Reference activation quantization (the oracle for the Triton activation kernels) vs float64 computations."""

from __future__ import annotations

import re

import pytest
import torch

from lrq_ao.layouts import ActivationMode, Int8Tensor, dequantize_activation, emulated_linear, quantize_activation
from lrq_ao.layouts.activation import (
    activation_refusal,
    nearest_quotient_near,
    quantize_activation_fusable,
    round_to_e4m3_exactly,
)
from lrq_ao.primitives import FP8_DTYPE, MIN_SCALE, sqnr

MODES = [ActivationMode("dynamic", "tensor"), ActivationMode("dynamic", "row"), ActivationMode("dynamic", "block", 32)]
# dq(q(x)) SQNR floors (dB) on Gaussian (37, 96) activations whose rows span 1e-2..1e1 in magnitude.
# Measured: FP8 tensor/row/block 31.5/32.0/32.3; INT8 34.6/43.7/44.8 (one INT8 scale for rows of very different
# magnitude is what per-token scaling fixes). Floors ~2 dB below.
FLOORS = {(FP8_DTYPE, "tensor"): 29, (FP8_DTYPE, "row"): 30, (FP8_DTYPE, "block"): 30}
FLOORS |= {(torch.int8, "tensor"): 32, (torch.int8, "row"): 41, (torch.int8, "block"): 42}


def _x(m=37, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * torch.logspace(-2, 1, m).unsqueeze(1)).to(torch.bfloat16)


def _float64_scale(x: torch.Tensor, mode: ActivationMode, qmax: float) -> torch.Tensor:
    x64 = x.double().abs()
    m, k = x64.shape
    if mode.granularity == "tensor":
        amax = x64.amax().reshape(1, 1)
    elif mode.granularity == "row":
        amax = x64.amax(dim=1, keepdim=True)
    else:
        amax = torch.stack([x64[:, j : j + mode.block].amax(dim=1) for j in range(0, k, mode.block)], dim=1)
    return (amax / qmax).clamp_min(MIN_SCALE)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.granularity)
@pytest.mark.parametrize("qdtype", [FP8_DTYPE, torch.int8], ids=["fp8", "int8"])
def test_scales_saturation_and_sqnr(qdtype, mode):
    x = _x()
    xq, scale = quantize_activation(x, qdtype, mode)
    qmax = 448.0 if qdtype == FP8_DTYPE else 127.0
    expected_scale = _float64_scale(x, mode, qmax)
    assert xq.dtype == qdtype and xq.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == expected_scale.shape
    torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)
    # every scale group reaches the top of the grid exactly once its amax is divided out
    groups = xq.float().abs().reshape(x.shape[0], -1, mode.block if mode.granularity == "block" else x.shape[1])
    peak = groups.amax(dim=2) if mode.granularity != "tensor" else groups.amax().reshape(1, 1)
    assert torch.all(peak == qmax)
    assert sqnr(x.double(), dequantize_activation(xq, scale, mode)) >= FLOORS[(qdtype, mode.granularity)]


def test_int8_values_are_round_half_even_of_float64_quotient():
    x = _x()
    mode = ActivationMode("dynamic", "row")
    xq, scale = quantize_activation(x, torch.int8, mode)
    q64 = torch.round(x.double() / _float64_scale(x, mode, 127.0)).clamp(-127, 127)
    # float32 vs float64 division may flip a value sitting on a .5 tie; nothing else may differ
    diff = (xq.double() - q64).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_all_zero_rows_get_min_scale():
    x = torch.zeros(3, 64)
    xq, scale = quantize_activation(x, torch.int8, ActivationMode("dynamic", "row"))
    assert torch.all(scale == MIN_SCALE) and torch.all(xq == 0)


def test_block_must_divide_k():
    mode = ActivationMode("dynamic", "block", 64)
    assert "does not divide K=96" in activation_refusal(96, mode)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_activation(_x(k=96), torch.int8, mode)


def test_emulated_weight_only_is_float32_matmul_of_dequantized_weight():
    w = Int8Tensor.from_hp(torch.randn(16, 96), "row")
    x, bias = _x(5), torch.randn(16).to(torch.bfloat16)
    y = emulated_linear(x, w.qdata, w.scale, w.block_size, ActivationMode(), bias)
    expected = (x.float() @ w.dequantize(torch.float32).t()).to(torch.bfloat16) + bias
    assert torch.equal(y, expected)


# quantize_activation_fusable: the plain-torch form the TORCH backends run inside torch.compile. Awkward shapes: M in
# {1, 7, 33}, K = 40 (not a multiple of 16), K = 96 for 1 x 32 blocks; activations spanning 1e-3..1e2.
FUSABLE_CASES = [(m, k, g) for m in (1, 7, 33) for k, g in ((40, "tensor"), (40, "row"), (96, "block"))]


def _wide(m: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(m * 1000 + k)
    return (torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)).to(torch.bfloat16)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("qdtype", [FP8_DTYPE, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("case", FUSABLE_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_fusable_is_bit_identical_to_reference(qdtype, case):
    m, k, granularity = case
    x, mode = _wide(m, k), ActivationMode("dynamic", granularity, 32)
    q_ref, s_ref = quantize_activation(x, qdtype, mode)
    q, s = quantize_activation_fusable(x, qdtype, mode)
    assert torch.equal(s, s_ref) and _same_bytes(q, q_ref)


def test_fusable_rejects_what_the_reference_rejects():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_activation_fusable(_x(k=96), torch.int8, ActivationMode("dynamic", "block", 64))
    with pytest.raises(ValueError, match="2-D"):
        quantize_activation_fusable(_x().unsqueeze(0), torch.int8, MODES[1])


def _scale_then_quantize_three_ways(x40: torch.Tensor, x96: torch.Tensor, gain: torch.Tensor):
    # gain is a power of two per column: the producer's output is exact, so eager and Inductor agree on it
    return (
        quantize_activation_fusable(x40 * gain[:40], FP8_DTYPE, ActivationMode("dynamic", "tensor")),
        quantize_activation_fusable(x40 * gain[:40], FP8_DTYPE, ActivationMode("dynamic", "row")),
        quantize_activation_fusable(x96 * gain, FP8_DTYPE, ActivationMode("dynamic", "block", 32)),
    )


def test_fusable_compiled_is_bit_identical_and_fused_with_its_producer():
    """One compiled graph (fullgraph, dynamic M; M = 1 is specialized by torch.compile) for every awkward M."""
    from torch._inductor.utils import run_and_get_code

    gain = torch.exp2(torch.arange(96) % 5 - 2.0).to(torch.bfloat16)
    fn = torch.compile(_scale_then_quantize_three_ways, fullgraph=True, dynamic=True)
    for m in (7, 33):  # M = 1 would be a second graph (torch.compile specializes it); eager covers it above
        x40, x96 = _wide(m, 40), _wide(m, 96)
        results, code = run_and_get_code(fn, x40, x96, gain)
        expected = [
            quantize_activation(x40 * gain[:40], FP8_DTYPE, ActivationMode("dynamic", "tensor")),
            quantize_activation(x40 * gain[:40], FP8_DTYPE, ActivationMode("dynamic", "row")),
            quantize_activation(x96 * gain, FP8_DTYPE, ActivationMode("dynamic", "block", 32)),
        ]
        for (q, s), (q_ref, s_ref), what in zip(results, expected, ("tensor", "row", "block"), strict=True):
            assert torch.equal(s, s_ref) and _same_bytes(q, q_ref), f"{what}, M={m}"
    # the producer's multiply and the amax live in one generated kernel (Inductor names kernels by their ops)
    kernels = set(re.findall(r"\b(?:cpp|triton_\w+?)_fused_(\w+)", "\n".join(code)))
    assert any("mul" in name and "amax" in name for name in kernels), kernels


@pytest.mark.parametrize("divisor", [448.0, 127.0])
def test_scale_is_recovered_from_a_guess_one_ulp_off(divisor):
    """What Inductor's CUDA code may give for ``amax / qmax`` (one unit in the last place off) is corrected."""
    g = torch.Generator().manual_seed(int(divisor))
    a = torch.cat([torch.rand(4000, generator=g) * 10.0 ** torch.randint(-6, 4, (4000,), generator=g), torch.zeros(1)])
    exact = a / divisor  # float32 IEEE division on CPU: the reference's scale
    for shift in (-1, 0, 1):
        guess = (exact.view(torch.int32) + shift).clamp_min(0).view(torch.float32)
        assert torch.equal(nearest_quotient_near(a.double(), divisor, guess), exact), f"guess shifted by {shift}"


def test_explicit_e4m3_rounding_matches_the_cast_on_every_bfloat16_and_near_every_midpoint():
    bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = grid[grid.isfinite()].unique()
    midpoints = (grid[1:] + grid[:-1]) / 2
    near = (midpoints.view(torch.int32).unsqueeze(1) + torch.arange(-2, 3, dtype=torch.int32)).view(torch.float32)
    values = torch.cat([bf16[bf16.isfinite()], near.flatten(), -near.flatten(), torch.tensor([500.0, -1e30])])
    expected = values.clamp(-448, 448).to(FP8_DTYPE)
    assert torch.equal(round_to_e4m3_exactly(values).view(torch.uint8), expected.view(torch.uint8))


# exact=False: the reference's own ops, left to Inductor (cheaper, fused; a value may move by one grid step).
FAST_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_fast_mode_is_named_serialized_and_old_modes_read_as_exact():
    fast = ActivationMode("dynamic", "block", 64, exact=False)
    assert str(fast) == "dynamic/block64/fast" and str(ActivationMode("dynamic", "row")) == "dynamic/row"
    assert ActivationMode.from_dict(fast.to_dict()) == fast
    assert ActivationMode.from_dict({"kind": "dynamic", "granularity": "row", "block": 128}).exact is True
    old = object.__new__(ActivationMode)  # what unpickling a mode saved before the field existed builds
    old.__dict__.update(kind="dynamic", granularity="row", block=128)
    assert old.exact is True and old == ActivationMode("dynamic", "row")
    with pytest.raises(TypeError, match="exact must be a bool"):
        ActivationMode("dynamic", "row", exact="no")


def _grid_ordinal(q: torch.Tensor) -> torch.Tensor:
    """Position on the quantization grid: neighbouring representable values differ by one."""
    if q.dtype == torch.int8:
        return q.int()
    code = q.view(torch.uint8).int()
    magnitude = code & 0x7F  # e4m3fn magnitudes are ordered like their codes
    return torch.where(code >= 0x80, -magnitude, magnitude)


def _quantize_fast(x: torch.Tensor, qdtype: torch.dtype, mode: ActivationMode):
    return quantize_activation_fusable(x * 1.0, qdtype, mode)  # the multiply: a producer to fuse with


@pytest.mark.parametrize("device", FAST_DEVICES)
@pytest.mark.parametrize("qdtype", [FP8_DTYPE, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
def test_fast_mode_compiled_is_within_one_grid_step_of_the_reference(device, qdtype, granularity):
    # Dynamo caches graphs on _quantize_fast's code object and each case guards on another device, qdtype or mode:
    # with CUDA, 12 cases would pass recompile_limit (8). A fresh cache per case: still one real compile per case.
    torch._dynamo.reset()
    mode = ActivationMode("dynamic", granularity, 32, exact=False)
    x = _wide(33, 96).to(device)
    eager = quantize_activation_fusable(x, qdtype, mode)
    reference = quantize_activation(x, qdtype, mode)
    assert torch.equal(eager[1], reference[1]) and _same_bytes(eager[0], reference[0])  # eager: the reference
    (q, s), (q_ref, s_ref) = torch.compile(_quantize_fast, fullgraph=True)(x, qdtype, mode), reference
    assert ((s.view(torch.int32) - s_ref.view(torch.int32)).abs() <= 1).all()  # one unit in the last place
    assert ((_grid_ordinal(q) - _grid_ordinal(q_ref)).abs() <= 1).all()
    x_ref = x.float().cpu()
    exact_db = sqnr(x_ref, dequantize_activation(q_ref, s_ref, mode).cpu())
    assert abs(sqnr(x_ref, dequantize_activation(q, s, mode).cpu()) - exact_db) < 0.05
