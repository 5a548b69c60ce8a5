"""NVFP4 against comfy-kitchen 0.2.40's own eager quantizer and dequantizer (the reference ComfyUI runs)."""

from __future__ import annotations

import json

import comfy_kitchen.tensor as ck_tensor  # a test dependency (pyproject's "test" extra)
import pytest
import torch
from comfy_kitchen.float_utils import _f32_to_floatx_unpacked, from_blocked, pack_uint4, to_blocked

from lrq_ao.formats import ELEMENTS, FORMATS, ComfyFormatError, FormatError, get_format, reader_for
from lrq_ao.formats.base import QuantizedWeight, broadcast_blocks
from lrq_ao.formats.comfy import ordered_marker
from lrq_ao.formats.nvfp4 import E2M1, swizzle_block_scales, unswizzle_block_scales

FMT = get_format("nvfp4")
LAYOUT = "TensorCoreNVFP4Layout"
LAYOUT_CLS = ck_tensor.get_layout_class(LAYOUT)
FP8 = torch.float8_e4m3fn

# N: 1, not a multiple of 16, a multiple of 16 but not of 128, over 128; K = 16 * odd where possible.
SHAPES = [(1, 16), (7, 48), (70, 80), (96, 16), (129, 144), (200, 272)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def awkward_weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian, plus (rows permitting) an all-zero group, a row of tiny values whose fp8 group scales underflow,
    a row far above the rest (sets the global scale) and tiny negatives (E2M1 code 8, -0)."""
    n, k = shape
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    huge = 1e4 if dtype == torch.float16 else 1e30
    if n >= 4:
        w[0, :16] = 0.0
        w[1] *= 1e-7
        w[2] *= huge
        w[3, 16:] = -1e-9 * w[3, 16:].abs()
    return w.to(dtype)


def kitchen_dequantize(tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """What ComfyUI does with the stored tensors: kitchen's QuantizedTensor with orig_dtype = compute dtype."""
    params = LAYOUT_CLS.Params(
        scale=tensors[".weight_scale_2"],
        block_scale=tensors[".weight_scale"].view(FP8),
        orig_dtype=dtype,
        orig_shape=shape,
    )
    return ck_tensor.QuantizedTensor(tensors[".weight"], LAYOUT, params).dequantize()


def kitchen_tensors(w: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Kitchen's own quantizer output under ComfyUI's suffixes (``.weight``, ``.weight_scale``, ``.weight_scale_2``)."""
    qdata, params = LAYOUT_CLS.quantize(w, scale=scale)
    return {".weight" + s: t for s, t in LAYOUT_CLS.state_dict_tensors(qdata, params).items()}


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def sqnr(reference: torch.Tensor, x: torch.Tensor) -> float:
    reference = reference.double()
    return float(20 * torch.log10(reference.norm() / (reference - x.double()).norm()))


# ---- (1) our file, dequantized by kitchen == our dequantize ------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_our_tensors_dequantize_in_kitchen_exactly_as_ours(shape, dtype):
    w = awkward_weight(shape, dtype)
    qw = FMT.quantize(w)
    tensors = FMT.comfy_tensors(qw, shape)
    for out_dtype in {torch.float32, dtype}:
        ours = FMT.dequantize(qw, out_dtype)
        theirs = kitchen_dequantize(tensors, shape, out_dtype)
        assert ours.dtype == theirs.dtype == out_dtype
        assert torch.equal(ours, theirs), f"{shape} {dtype} -> {out_dtype}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_our_tensors_equal_kitchens_quantizer_bytes_given_our_global_scale(shape, dtype):
    """Same global scale -> same codes (nibble order, -0 codes), same fp8 group scales, padding and swizzle."""
    w = awkward_weight(shape, dtype, seed=1)
    qw = FMT.quantize(w)
    ours = FMT.comfy_tensors(qw, shape)
    theirs = kitchen_tensors(w, qw.scale2)
    assert set(ours) == set(theirs) == {".weight", ".weight_scale", ".weight_scale_2"}
    for suffix in ours:
        assert ours[suffix].dtype == theirs[suffix].dtype, suffix
        assert ours[suffix].shape == theirs[suffix].shape, suffix
        assert torch.equal(as_bytes(ours[suffix]), as_bytes(theirs[suffix])), suffix


# ---- (2) kitchen's file, read back by us -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kitchen_quantizer_output_reads_back_exactly(shape, dtype):
    w = awkward_weight(shape, dtype, seed=2)
    tensors = kitchen_tensors(w)  # kitchen's default global scale (computed in the weight dtype)
    marker = ordered_marker("nvfp4", {}, orig_shape=list(shape))
    fmt, qw = reader_for("nvfp4")(marker, tensors, "model.layer")
    assert fmt is FMT and qw.block_size == (1, 16)
    assert qw.qdata.shape == (shape[0], shape[1] // 2) and qw.scale.shape == (shape[0], shape[1] // 16)
    assert qw.scale2.shape == () and qw.scale2.dtype == torch.float32
    for out_dtype in {torch.float32, dtype}:
        assert torch.equal(FMT.dequantize(qw, out_dtype), kitchen_dequantize(tensors, shape, out_dtype))
    # ... and writing it again gives kitchen's bytes back.
    rewritten = FMT.comfy_tensors(qw, shape)
    for suffix, tensor in tensors.items():
        assert torch.equal(as_bytes(rewritten[suffix]), as_bytes(tensor)), suffix


def test_reader_without_orig_shape_and_with_byte_scales():
    """ComfyUI's own writer puts only ``format`` in the marker; ``weight_scale`` may be stored as uint8 bytes."""
    shape = (32, 64)
    w = awkward_weight(shape, torch.bfloat16)
    tensors = kitchen_tensors(w)
    tensors[".weight_scale"] = tensors[".weight_scale"].view(torch.uint8)
    _, qw = reader_for("nvfp4")({"format": "nvfp4"}, tensors, "layer")
    assert torch.equal(FMT.dequantize(qw, torch.bfloat16), kitchen_dequantize(tensors, shape, torch.bfloat16))


# ---- (3) golden bytes, dtypes and shapes -------------------------------------------------------------------------


def test_golden_marker_bytes():
    fields = FMT.comfy_marker_fields((1, 16), (70, 48))
    assert fields == {}
    assert json.dumps(ordered_marker("nvfp4", fields)).encode() == b'{"format": "nvfp4"}'
    marker = ordered_marker("nvfp4", fields, orig_dtype="torch.bfloat16", orig_shape=[70, 48])
    assert json.dumps(marker).encode() == b'{"format": "nvfp4", "orig_dtype": "torch.bfloat16", "orig_shape": [70, 48]}'


@pytest.mark.parametrize(
    ("shape", "weight_shape", "scale_shape"),
    [((64, 256), (64, 128), (128, 16)), ((70, 48), (80, 24), (128, 4)), ((129, 80), (144, 40), (256, 8))],
)
def test_golden_tensor_dtypes_and_shapes(shape, weight_shape, scale_shape):
    expected = {
        ".weight": (torch.uint8, weight_shape),
        ".weight_scale": (FP8, scale_shape),
        ".weight_scale_2": (torch.float32, ()),
    }
    assert FMT.comfy_tensor_specs(shape) == expected
    written = FMT.comfy_tensors(FMT.quantize(torch.randn(shape)), shape)
    assert {s: (t.dtype, tuple(t.shape)) for s, t in written.items()} == expected


def test_golden_bytes_of_one_group():
    """Grid values at global amax 6: the group scale is fp8 448 (0x7E) and each code is the value's own."""
    row = [6.0, -0.5, 1.0, -1.5, 2.0, -3.0, 4.0, -6.0, 0.0, -0.0, 0.5, 3.0, -4.0, 1.5, -1.0, -2.0]
    tensors = FMT.comfy_tensors(FMT.quantize(torch.tensor([row])), (1, 16))
    weight = tensors[".weight"]
    assert weight.shape == (16, 8)
    assert weight[0].tolist() == [0x79, 0x2B, 0x4D, 0x6F, 0x08, 0x15, 0xE3, 0xAC]
    assert not weight[1:].any()  # zero padding rows
    scale = tensors[".weight_scale"].view(torch.uint8)
    assert scale[0, 0] == 0x7E and int(scale.count_nonzero()) == 1
    assert tensors[".weight_scale_2"].item() == torch.tensor(6.0 / 2688.0).item()


def test_swizzle_matches_kitchen_to_blocked_and_back():
    for rows, cols in [(1, 1), (16, 3), (130, 9), (256, 8)]:
        s = torch.randn(rows, cols)
        swizzled = swizzle_block_scales(s)
        assert torch.equal(swizzled, to_blocked(s, flatten=False))
        assert torch.equal(unswizzle_block_scales(swizzled, rows, cols), from_blocked(swizzled, rows, cols))
        assert torch.equal(unswizzle_block_scales(swizzled, rows, cols), s)


# ---- (4) the E2M1 element ----------------------------------------------------------------------------------------


def test_element_registered_and_values():
    assert ELEMENTS["float4_e2m1fn"] is E2M1 and FMT.element is E2M1
    assert E2M1.values().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert E2M1.packed and E2M1.stored_shape((5, 32)) == (5, 16) and FMT.kernel_dtype is None


def test_every_code_round_trips():
    codes = torch.arange(16, dtype=torch.uint8)
    values = E2M1.decode(codes)
    assert values.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert torch.equal(E2M1.encode(values), codes)  # -0.0 keeps its sign: code 8
    assert torch.equal(E2M1.decode(E2M1.encode(E2M1.values())), E2M1.values())


def test_round_half_to_even_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 1e9, float("inf"), 0.2500001, 5.0000005])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 0.5, 6.0]
    assert E2M1.decode(E2M1.round(x)).tolist() == expected
    assert E2M1.decode(E2M1.round(-x)).tolist() == [-v for v in expected]
    assert E2M1.round(torch.tensor([-0.1, -0.0])).tolist() == [8, 8]


def test_round_matches_kitchen_on_a_dense_sweep():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.arange(-7, 7.001, 0.125), torch.randn(200_000, generator=g) * 3, torch.tensor([-0.0, 1e-40])])
    assert torch.equal(E2M1.round(x), _f32_to_floatx_unpacked(x, 2, 1))


def test_pack_unpack():
    codes = torch.randint(0, 16, (3, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = E2M1.pack(codes)
    assert packed.shape == (3, 5) and torch.equal(E2M1.unpack(packed), codes)
    assert torch.equal(packed, pack_uint4(codes, hi_first=True))
    assert E2M1.pack(E2M1.round(torch.tensor([[6.0, -0.5]]))).item() == 0x79  # even column -> high nibble


# ---- (5) accuracy and the learned-rounding grid ------------------------------------------------------------------

SQNR_FLOOR_DB = 20.0  # measured 20.42-20.46 dB on 512 x 1024 N(0, 1), seeds 0-2


def test_rtn_sqnr_against_float64_and_kitchens_quantizer():
    w64 = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        w = w64.to(dtype)
        ours = sqnr(w, FMT.dequantize(FMT.quantize(w)))
        theirs = sqnr(w, kitchen_dequantize(kitchen_tensors(w), tuple(w.shape), torch.float32))
        print(f"nvfp4 RTN SQNR {dtype}: lrq_ao {ours:.4f} dB, comfy-kitchen {theirs:.4f} dB")
        assert ours >= SQNR_FLOOR_DB
        # float32: identical files; bf16: kitchen rounds its global scale to bf16, which moves SQNR by < 0.05 dB.
        assert ours == theirs if dtype == torch.float32 else abs(ours - theirs) < 0.05


def test_grid_times_effective_scale_is_the_dequantized_weight():
    """What learned rounding optimizes, ``values[idx] * effective_scale`` per group, is exactly the float32
    dequantized weight (awkward weight included). In bf16 / fp16, kitchen (so ComfyUI) rounds the global scale and
    the scale product to that dtype before multiplying: measured on N(0, 0.02^2) 256 x 512, bf16 differs from the
    float32 result cast to bf16 in 47 % of elements by at most 0.75 % (< 1 bf16 eps), 49.7 dB SQNR; fp16 (global
    scale 3.4e-5 is subnormal there) in 81 % by at most 0.13 %, 62.1 dB."""
    for w in (
        awkward_weight((70, 80), torch.float32),
        0.02 * torch.randn(256, 512, generator=torch.Generator().manual_seed(0)),
    ):
        qw = FMT.quantize(w)
        values = E2M1.values()
        idx = torch.searchsorted(values, E2M1.decode(FMT.codes(qw)))  # -0 finds 0
        grid = broadcast_blocks(values[idx], FMT.effective_scale(qw.scale, qw.scale2), qw.block_size)
        assert torch.equal(grid, FMT.dequantize(qw, torch.float32))
    bf16 = FMT.dequantize(qw, torch.bfloat16).float()
    cast = grid.to(torch.bfloat16).float()
    assert bool(((bf16 - cast).abs() <= torch.finfo(torch.bfloat16).eps * cast.abs()).all())
    assert sqnr(grid, bf16) > 49.0 and sqnr(grid, FMT.dequantize(qw, torch.float16)) > 60.0


def test_learned_codes_go_through_from_codes():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    qw = FMT.quantize(w)
    codes = FMT.codes(qw).clone()
    codes[0, 0] = 7  # any code on the grid
    moved = FMT.from_codes(codes, qw)
    assert torch.equal(FMT.codes(moved), codes)
    assert FMT.dequantize(moved)[0, 0] == 6.0 * FMT.effective_scale(qw.scale, qw.scale2)[0, 0]


# ---- (6) refusals and reader errors name the tensor --------------------------------------------------------------


def test_refuses_k_not_multiple_of_16():
    assert "multiple of 16" in FMT.refusal((64, 40))
    assert FMT.refusal((70, 48)) is None
    with pytest.raises(FormatError, match=r"blocks\.0\.attn\.qkv.*multiple of 16"):
        FMT.quantize(torch.randn(64, 40), name="blocks.0.attn.qkv")
    assert isinstance(FMT.dynamic_activation((1, 16), (64, 64)), str) and not FMT.has_blocks
    assert FORMATS["nvfp4"] is FMT


def _good_tensors(shape=(70, 48)):
    w = awkward_weight(shape, torch.float32)
    return FMT.comfy_tensors(FMT.quantize(w), shape)


@pytest.mark.parametrize(
    ("edit", "marker", "names"),
    [
        (lambda t: t.pop(".weight_scale_2"), {}, "L.weight_scale_2"),
        (lambda t: t.pop(".weight_scale"), {}, "L.weight_scale"),
        (lambda t: t.update({".weight": t[".weight"].view(torch.int8)}), {}, "L.weight"),
        (lambda t: t.update({".weight_scale": t[".weight_scale"].float()}), {}, "L.weight_scale"),
        (lambda t: t.update({".weight_scale": t[".weight_scale"][:, :2]}), {}, "L.weight_scale"),
        (lambda t: t.update({".weight_scale_2": -t[".weight_scale_2"]}), {}, "L.weight_scale_2"),
        (lambda t: t.update({".weight_scale_2": torch.ones(2)}), {}, "L.weight_scale_2"),
        (lambda t: t[".weight_scale"].view(torch.uint8).__setitem__((0, 0), 0xFF), {}, "L.weight_scale"),
        (lambda t: None, {"orig_shape": [70, 40]}, "L.weight"),
        (lambda t: None, {"orig_shape": [90, 48]}, "L.weight"),
    ],
)
def test_reader_errors_name_the_tensor(edit, marker, names):
    tensors = _good_tensors()
    edit(tensors)
    with pytest.raises(ComfyFormatError) as err:
        reader_for("nvfp4")({"format": "nvfp4", "orig_shape": [70, 48], **marker}, tensors, "L")
    message = str(err.value)
    assert message.startswith(names + ":") and "\n" not in message, message


def test_comfy_tensors_refuses_scales_off_the_fp8_grid():
    qw = FMT.quantize(torch.randn(16, 32))
    bad = QuantizedWeight(qw.qdata, qw.scale * 1.01, qw.block_size, qw.scale2)
    with pytest.raises(FormatError, match="fp8"):
        FMT.comfy_tensors(bad, (16, 32))
