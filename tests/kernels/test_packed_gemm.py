"""The packed 4-bit weight-only linear (NVFP4, ConvRot W4A4) against float64, the reference path and exact sums.

Bound, Liger-Kernel style: against the float64 product of the format's exact float32 dequantization, the kernel's
error is at most twice the error of the reference path ``F.linear(x, dequantize(x.dtype))`` (the weight rounded to
``x.dtype``, then the matmul), with an absolute SQNR floor as well so a broken reference cannot excuse a broken
kernel. At M <= 16 the kernel's only rounding is the output's (NVFP4's code times fp8 scale and INT4 codes are exact
in bf16 / fp16; sums in float32). Measured on these cases: 53.4-58.7 dB (bf16) and 70.9-77.3 dB (fp16) at M <= 16,
at most 0.94x the reference path's error; 50.9-53.5 / 68.3-71.7 dB through dequantize + matmul (M = 20), at most
equal to it. Triton's interpreter truncates float32 -> bfloat16 casts; the kernel rounds by bits on CPU so these
numbers are the GPU's (with truncation the kernel's error was twice the output rounding's).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, ON_CUDA
from torch._subclasses.fake_tensor import FakeTensorMode

from lrq_ao.formats import FORMATS, get_format
from lrq_ao.formats.elements import ELEMENTS
from lrq_ao.kernels import packed_gemm as pg
from lrq_ao.layouts import weight_tensor
from lrq_ao.primitives import sqnr

FORMAT_NAMES = ["nvfp4", "convrot_w4a4"]
# (N, K) per format: K a multiple of 16 for NVFP4, of 64 and of the rotation group (64) for ConvRot W4A4.
SHAPES = {
    "nvfp4": [(17, 64), (48, 96), (17, 96), (48, 64)],
    "convrot_w4a4": [(17, 64), (48, 128), (17, 128), (48, 64)],
}
SQNR_FLOOR_DB = {torch.bfloat16: 50.0, torch.float16: 66.0}
DEQUANT_FLOOR_DB = {torch.bfloat16: 47.0, torch.float16: 64.0}  # M > 16: weight rounded to x.dtype as well


def _format(name: str):
    return get_format(name, block_size=64) if name == "convrot_w4a4" else get_format(name)


def _quantized(name: str, n: int, k: int, seed: int = 0):
    fmt = _format(name)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    qw = fmt.quantize(w)
    for attr in ("qdata", "scale", "scale2"):
        if getattr(qw, attr) is not None:
            setattr(qw, attr, getattr(qw, attr).to(DEVICE))
    return fmt, qw


def _activations(m: int, k: int, dtype, seed: int = 0) -> torch.Tensor:
    """Columns spanning two decades (no all-zero row: at M = 1 that would test the bias alone)."""
    g = torch.Generator().manual_seed(seed + 100)
    return (torch.randn(m, k, generator=g) * torch.logspace(-1, 1, k)).to(dtype).to(DEVICE)


def _bias(n: int, dtype) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype).to(DEVICE)


def _op(x, fmt, qw, bias, **kwargs):
    element = fmt.element
    args = (x, qw.qdata, qw.scale, qw.scale2, qw.block_size[1], list(element.nibble_values), element.even_code_high)
    return pg.packed_weight_only_linear(*args, bias, **kwargs)


def _relative_error(exact: torch.Tensor, y: torch.Tensor) -> float:
    return float((y.double().cpu() - exact).norm() / exact.norm())


def _cases():
    for name in FORMAT_NAMES:
        for n, k in SHAPES[name]:
            for m in (1, 3, 16, 20):
                yield pytest.param(name, m, n, k, id=f"{name}-M{m}-N{n}-K{k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, m, n, k", list(_cases()))
def test_op_within_twice_the_reference_path_error(name, m, n, k, dtype):
    """In the stored basis (what the op multiplies): every route (GEMV, MMA, dequantize + matmul)."""
    fmt, qw = _quantized(name, n, k, seed=n + k)
    x = _activations(m, k, dtype, seed=m)
    bias = _bias(n, dtype) if m != 3 else None
    y = _op(x, fmt, qw, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    stored = fmt.dequantize(qw).cpu().double()
    exact = x.cpu().double() @ stored.t() + (0 if bias is None else bias.cpu().double())
    reference_path = F.linear(x.cpu(), fmt.dequantize(qw, dtype).cpu(), None if bias is None else bias.cpu())
    assert _relative_error(exact, y) <= 2 * _relative_error(exact, reference_path)
    floor = SQNR_FLOOR_DB[dtype] if m <= pg.SMALL_M_MAX else DEQUANT_FLOOR_DB[dtype]
    assert sqnr(exact, y.cpu()) > floor


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("m", [1, 3, 20])
def test_linear_through_the_backend(name, m):
    """``F.linear`` on the weight tensor with ``kernel='triton'``: ConvRot's input is rotated by the linear, then the
    op runs; against the reference path in the model's own basis, ``F.linear(x, weight.dequantize())``."""
    fmt, qw = _quantized(name, 48, 128, seed=m)
    weight = weight_tensor(fmt, qw, torch.bfloat16, kernel="triton")
    x = _activations(2 * m, 128, torch.bfloat16, seed=m).reshape(2, m, 128)
    bias = _bias(48, torch.bfloat16)
    described = weight.describe(x)
    assert described.splitlines()[0].endswith(": triton_packed_weight_only"), described
    y = F.linear(x, weight, bias)
    exact = x.cpu().double() @ weight.dequantize(torch.float32).cpu().double().t() + bias.cpu().double()
    reference_path = F.linear(x.cpu(), weight.dequantize().cpu(), bias.cpu())
    assert y.shape == (2, m, 48) and y.dtype == torch.bfloat16
    assert _relative_error(exact, y) <= 2 * _relative_error(exact, reference_path)


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("route", ["gemv", "mma1", "mma5"])
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_sums_are_exact(name, route, split_k):
    """Codes of every nibble, unit scales, activations in {-1, 0, 1}, fp16 output: every product, partial and sum is
    exact (NVFP4: multiples of 1/2 with |sum| <= 6 * 128 < 2**10; INT4: integers, |sum| <= 8 * 128), so the output
    equals the float64 product whatever the split (K = 128: four K steps of 32, split 1, 2 and an uneven 3)."""
    fmt = _format(name)
    n, k = 40, 128
    m = 5 if route == "mma5" else 1
    g = torch.Generator().manual_seed(split_k)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    qdata = _pack_nibbles(fmt.element, codes).to(DEVICE)
    values = _nibble_values(fmt.element, codes)
    group = 16 if name == "nvfp4" else k
    scale = torch.ones(n, k // group, device=DEVICE)
    x = torch.randint(-1, 2, (m, k), generator=g).to(torch.float16).to(DEVICE)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
    config = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split_k}
    element = fmt.element
    table, even_high = list(element.nibble_values), element.even_code_high
    pg.small_m_packed_linear(x, qdata, scale, None, group, table, even_high, None, out, config, gemv=route == "gemv")
    assert torch.equal(out.cpu().double(), x.cpu().double() @ values.double().t())
    assert int(pg.tile_counters(x.device).count_nonzero()) == 0  # the last split of each tile reset its counter


def _pack_nibbles(element, nibbles: torch.Tensor) -> torch.Tensor:
    """Bytes holding ``nibbles`` (N, K) in the element's nibble order, in its storage dtype (written here, not with
    the element's own ``pack``, so the kernel is checked against the declared order)."""
    even, odd = nibbles[:, 0::2].to(torch.int16), nibbles[:, 1::2].to(torch.int16)
    high, low = (even, odd) if element.even_code_high else (odd, even)
    return ((high << 4) | low).to(torch.uint8).view(element.storage_dtype)


def _nibble_values(element, nibbles: torch.Tensor) -> torch.Tensor:
    return torch.tensor(element.nibble_values, dtype=torch.float32)[nibbles.long()]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_dequantization_decodes_every_byte_exactly(name):
    """All 256 bytes through the dequantization kernel in float32 with unit scales: bit for bit (signed zero
    included) what the element's own ``unpack`` and ``decode`` give."""
    element = _format(name).element
    qdata = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(element.storage_dtype).reshape(2, 128)
    scale = torch.ones(2, 1)
    table, even_high = list(element.nibble_values), element.even_code_high
    w = pg.dequantize_packed(qdata.to(DEVICE), scale.to(DEVICE), None, 256, table, even_high, torch.float32)
    expected = element.decode(element.unpack(qdata))
    assert torch.equal(w.cpu(), expected)
    assert torch.equal(torch.signbit(w.cpu()), torch.signbit(expected))


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_dequantization_is_the_correctly_rounded_float32_product(name):
    """``code * scale`` is exact in float32, so with ``scale2`` one rounding: the float64 product rounded once."""
    fmt, qw = _quantized(name, 33, 64)
    element = fmt.element
    table, even_high = list(element.nibble_values), element.even_code_high
    group = qw.block_size[1]
    w = pg.dequantize_packed(qw.qdata, qw.scale, qw.scale2, group, table, even_high, torch.float32).cpu()
    exact = element.decode(fmt.codes(qw).cpu()).double() * qw.scale.cpu().double().repeat_interleave(group, dim=1)
    if qw.scale2 is not None:
        exact = exact * qw.scale2.cpu().double()
    assert torch.equal(w, exact.float())


@pytest.mark.parametrize("element", [e for e in ELEMENTS.values() if e.nibble_values is not None], ids=str)
def test_declared_nibble_table_and_order_match_the_element(element):
    """``nibble_values`` / ``even_code_high`` (what the kernel reads) agree with the element's pack / unpack /
    decode for all 256 bytes."""
    stored = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(element.storage_dtype).reshape(256, 1)
    decoded = element.decode(element.unpack(stored))  # (256, 2): the even and the odd column
    table = torch.tensor(element.nibble_values)
    byte = torch.arange(256)
    high, low = table[byte >> 4], table[byte & 15]
    expected = torch.stack([high, low] if element.even_code_high else [low, high], dim=1)
    assert torch.equal(decoded, expected) and torch.equal(torch.signbit(decoded), torch.signbit(expected))
    assert pg.decoder_for(element.nibble_values) is not None


@pytest.mark.parametrize("fmt", [f for f in FORMATS.values() if f.element.nibble_values is not None], ids=str)
def test_effective_scale_is_scale_times_scale2(fmt):
    """The kernel multiplies ``scale`` per group and ``scale2`` once: the effective scale of every registered format
    whose element it decodes must be that product."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    scale, scale2 = fmt.compute_scales(fmt.rotate_weight(w), fmt.block_size_for(w.shape))
    expected = scale if scale2 is None else scale * scale2
    assert torch.equal(fmt.effective_scale(scale, scale2), expected)


# ---- dispatch, refusals, op contract -----------------------------------------------------------------------------


@pytest.mark.skipif(ON_CUDA, reason="the interpreter rule concerns CPU tensors")
def test_cpu_auto_dequantizes_and_says_why():
    fmt, qw = _quantized("nvfp4", 48, 64)
    described = weight_tensor(fmt, qw, torch.bfloat16, kernel="auto").describe(_activations(2, 64, torch.bfloat16))
    assert described.splitlines()[0].endswith(": torch_weight_only")
    assert (
        "triton_packed_weight_only refused: the Triton interpreter runs on CPU only when kernel='triton'" in described
    )


def test_describe_names_the_route():
    fmt, qw = _quantized("convrot_w4a4", 48, 64)
    weight = weight_tensor(fmt, qw, torch.bfloat16, kernel="triton")
    for m, route in [(1, "GEMV kernel"), (7, "split-K MMA kernel"), (40, "one Triton dequantization")]:
        described = weight.describe(_activations(m, 64, torch.bfloat16))
        assert f"at M={m}: int4_lo codes decoded in registers, {route}" in described, described


def test_refusals_name_the_reason():
    fmt, qw = _quantized("nvfp4", 48, 64)
    weight = weight_tensor(fmt, qw, torch.bfloat16, kernel="triton")
    with pytest.raises(RuntimeError, match="triton_packed_weight_only: the tensor-core kernel takes bfloat16"):
        F.linear(torch.randn(2, 64, device=DEVICE), weight)
    w4a8 = get_format("w4a8", block_size=64)
    packed = weight_tensor(w4a8, w4a8.quantize(torch.randn(32, 128)), torch.bfloat16, kernel="triton").to(DEVICE)
    with pytest.raises(RuntimeError, match="triton_packed_weight_only: element .* is not a packed 4-bit code table"):
        F.linear(_activations(2, 128, torch.bfloat16), packed)


def test_op_rejects_unknown_tables_and_groups():
    fmt, qw = _quantized("nvfp4", 16, 64)
    x = _activations(2, 64, torch.bfloat16)
    table = list(fmt.element.nibble_values)
    with pytest.raises(ValueError, match="nibble_values .* is not a table these kernels decode"):
        pg.packed_weight_only_linear(x, qw.qdata, qw.scale, qw.scale2, 16, [v * 2 for v in table], True, None)
    with pytest.raises(ValueError, match="group 48 along K=64 must be the whole row or an even divisor of 64"):
        pg.packed_weight_only_linear(x, qw.qdata, qw.scale, qw.scale2, 48, table, True, None)
    with pytest.raises(ValueError, match=r"scale must be a float grid \(16, 2\)"):
        pg.packed_weight_only_linear(x, qw.qdata, qw.scale, qw.scale2, 32, table, True, None)
    with pytest.raises(ValueError, match="x has K=48 but qdata holds 64 codes"):
        pg.packed_weight_only_linear(x[:, :48], qw.qdata, qw.scale, qw.scale2, 16, table, True, None)


def _op_args(name: str, m: int):
    fmt, qw = _quantized(name, 24, 64)
    element = fmt.element
    x = _activations(m, 64, torch.bfloat16)
    group = qw.block_size[1]
    return (
        x,
        qw.qdata,
        qw.scale,
        qw.scale2,
        group,
        list(element.nibble_values),
        element.even_code_high,
        _bias(24, x.dtype),
    )


@pytest.mark.parametrize("name, m", [("nvfp4", 1), ("nvfp4", 5), ("nvfp4", 20), ("convrot_w4a4", 5)])
def test_opcheck(name, m):
    torch.library.opcheck(torch.ops.lrq_ao.packed_weight_only_linear.default, _op_args(name, m))


def test_fake_gives_shape_and_dtype():
    args = _op_args("convrot_w4a4", 3)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        y = torch.ops.lrq_ao.packed_weight_only_linear(*fake)
    assert y.shape == (3, 24) and y.dtype == torch.bfloat16
