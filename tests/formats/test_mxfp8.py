"""MXFP8 against comfy-kitchen 0.2.40's own quantizer and dequantizer (eager backend, CPU), byte for byte."""

from __future__ import annotations

import json

import pytest
import torch
from comfy_kitchen.float_utils import to_blocked
from comfy_kitchen.tensor import QuantizedTensor, TensorCoreMXFP8Layout

from lrq_ao.formats import FORMATS, ComfyFormatError, FormatError, QuantizedWeight, get_format, reader_for
from lrq_ao.formats.base import expand_scale
from lrq_ao.formats.comfy import SCALE_SUFFIX, WEIGHT_SUFFIX, ordered_marker
from lrq_ao.formats.mxfp8 import MXFP8, swizzle, unswizzle

LAYOUT = "TensorCoreMXFP8Layout"
WHERE = "blocks.0.attn.qkv"
# (N, K): N not a multiple of 32 or 128, K = 32 x odd, a single block, an aligned case.
SHAPES = [(70, 96), (33, 160), (1, 32), (300, 544), (128, 256)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def awkward_weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random rows whose magnitude sweeps the dtype's range along K, plus the blocks the scale rule treats
    specially: all zero, all -0.0, amax exactly 448 * 2^k, amax one float32 ulp above it, and tiny values."""
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    lo, hi = (-7.0, 3.0) if dtype == torch.float16 else (-30.0, 30.0)
    w = torch.randn(n, k, generator=g) * torch.logspace(lo, hi, k)[None]
    special = [
        torch.zeros(32),
        torch.full((32,), -0.0),
        torch.linspace(-448.0, 1.0, 32) * 2.0**-3,  # amax = 448 * 2^-3 exactly
        torch.linspace(-1.0, 448.0, 32).nextafter(torch.tensor(1e9)),  # amax just above 448
        torch.randn(32, generator=g) * 1e-5,
    ]
    for i, block in enumerate(special[:n]):
        w[i, :32] = block
    return w.to(dtype)


def kitchen_dequantize(tensors: dict[str, torch.Tensor], dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """What ComfyUI computes from the stored tensors (its loader views the scale bytes as float8_e8m0fnu)."""
    params = TensorCoreMXFP8Layout.Params(
        scale=tensors[SCALE_SUFFIX].view(torch.float8_e8m0fnu), orig_dtype=dtype, orig_shape=shape
    )
    return QuantizedTensor(tensors[WEIGHT_SUFFIX], LAYOUT, params).dequantize()


def kitchen_tensors(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Kitchen's own quantizer output, under the suffixes its ``state_dict`` gives them."""
    qt = QuantizedTensor.from_float(w, LAYOUT)
    return {WEIGHT_SUFFIX: qt._qdata, SCALE_SUFFIX: qt._params.scale}


def marker(shape: tuple[int, int] | None = None) -> dict:
    return {"format": "mxfp8"} if shape is None else {"format": "mxfp8", "orig_shape": list(shape)}


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.double()
    return float(20 * torch.log10(ref.norm() / (ref - approx.double()).norm()))


# ---- round-to-nearest and the stored tensors ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rtn_tensors_equal_kitchen_quantizer(shape, dtype):
    w = awkward_weight(shape, dtype)
    ours = MXFP8.comfy_tensors(MXFP8.quantize(w), shape)
    theirs = kitchen_tensors(w)
    assert ours[WEIGHT_SUFFIX].dtype == torch.float8_e4m3fn
    assert torch.equal(ours[WEIGHT_SUFFIX].view(torch.uint8), theirs[WEIGHT_SUFFIX].view(torch.uint8))
    assert ours[SCALE_SUFFIX].dtype == torch.uint8
    assert torch.equal(ours[SCALE_SUFFIX], theirs[SCALE_SUFFIX].view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kitchen_dequantizes_our_tensors_like_we_do(shape, dtype):
    w = awkward_weight(shape, dtype, seed=1)
    qw = MXFP8.quantize(w)
    assert torch.equal(kitchen_dequantize(MXFP8.comfy_tensors(qw, shape), dtype, shape), MXFP8.dequantize(qw, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kitchen_output_reads_back_to_kitchen_dequantization(shape, dtype):
    w = awkward_weight(shape, dtype, seed=2)
    tensors = kitchen_tensors(w)  # scale as float8_e8m0fnu, weight rows padded
    fmt, qw = reader_for("mxfp8")(marker(shape), tensors, WHERE)
    assert fmt is MXFP8 and qw.block_size == (1, 32)
    assert tuple(qw.qdata.shape) == shape and tuple(qw.scale.shape) == (shape[0], shape[1] // 32)
    assert torch.equal(fmt.dequantize(qw, dtype), QuantizedTensor.from_float(w, LAYOUT).dequantize())
    assert torch.equal(fmt.comfy_tensors(qw, shape)[SCALE_SUFFIX], tensors[SCALE_SUFFIX].view(torch.uint8))


def test_marker_without_orig_shape_reads_the_stored_shape():
    w = awkward_weight((64, 96), torch.bfloat16)
    _, qw = reader_for("mxfp8")(marker(), kitchen_tensors(w), WHERE)
    assert torch.equal(MXFP8.dequantize(qw, torch.bfloat16), QuantizedTensor.from_float(w, LAYOUT).dequantize())


def test_tiny_blocks_differ_from_kitchen_by_design():
    """amax <= 448 * 2^-127: kitchen writes byte 0 (decoded as 0.0) over ±448 codes; we write byte 1 and keep it."""
    w = torch.zeros(32, 64, dtype=torch.bfloat16)
    w[:, :32] = torch.linspace(1.0, 2.0, 32) * 1e-37  # no zero element: kitchen's codes are ±448, not NaN
    w[:, 32:] = torch.randn(32, 32).to(torch.bfloat16)
    theirs = kitchen_tensors(w)
    kitchen_w = kitchen_dequantize(theirs, torch.bfloat16, (32, 64))
    assert torch.equal(kitchen_w[:, :32], torch.zeros(32, 32, dtype=torch.bfloat16))
    qw = MXFP8.quantize(w)
    assert torch.equal(qw.scale[:, 0], torch.full((32,), 2.0**-126))
    ours = MXFP8.comfy_tensors(qw, (32, 64))
    assert torch.equal(kitchen_dequantize(ours, torch.bfloat16, (32, 64)), MXFP8.dequantize(qw, torch.bfloat16))
    assert sqnr(w[:, :32], MXFP8.dequantize(qw)[:, :32]) > 20  # kept, where kitchen's is -inf dB
    assert torch.equal(ours[WEIGHT_SUFFIX][:, 32:].view(torch.uint8), theirs[WEIGHT_SUFFIX][:, 32:].view(torch.uint8))
    # Reading kitchen's file gives kitchen's zeros (byte-0 blocks read as zero codes).
    _, read = reader_for("mxfp8")(marker((32, 64)), theirs, WHERE)
    assert torch.equal(MXFP8.dequantize(read, torch.bfloat16), kitchen_w)


def test_rtn_sqnr_on_a_real_weight():
    """Measured: 31.56 dB (float32) / 31.53 dB (bfloat16) on MiniLM-L6 layer 0 FFN-in (1536 x 384); fp8_row 31.62."""
    from lrq_ao.quality.minilm import load_state_dict_from_package

    w = load_state_dict_from_package()["encoder.layer.0.intermediate.dense.weight"]
    for dtype in (torch.float32, torch.bfloat16):
        wd = w.to(dtype)
        assert sqnr(wd, MXFP8.dequantize(MXFP8.quantize(wd))) >= 31.4


def test_scales_are_powers_of_two_covering_the_block():
    w = awkward_weight((70, 96), torch.float32)
    qw = MXFP8.quantize(w)
    mantissa, _ = torch.frexp(qw.scale)
    assert bool((mantissa == 0.5).all())
    amax = w.abs().reshape(70, 3, 32).amax(-1)
    nonzero = amax > 0
    # The smallest power of two that keeps the block within ±448 (kitchen's ceil rule; -1 ulp slack for log2).
    assert bool((amax[nonzero] <= 448 * qw.scale[nonzero] * (1 + 2**-22)).all())
    assert bool((amax[nonzero] > 224 * qw.scale[nonzero]).all())


def test_learned_rounding_grid_reproduces_dequantize():
    """Codes chosen among ``element.values()`` under ``effective_scale`` are exactly what ``dequantize`` returns."""
    w = awkward_weight((33, 160), torch.bfloat16)
    qw = MXFP8.quantize(w)
    values = MXFP8.element.values()
    decoded = MXFP8.element.decode(MXFP8.codes(qw))
    idx = torch.searchsorted(values, decoded.contiguous())
    assert torch.equal(values[idx], decoded)
    scale = expand_scale(MXFP8.effective_scale(qw.scale, qw.scale2), qw.block_size)
    assert torch.equal(values[idx] * scale, MXFP8.dequantize(qw))
    # The grid has one zero, so a -0.0 code (0x80, kept by RTN as kitchen keeps it) comes back as +0.0: same value.
    again = MXFP8.from_codes(MXFP8.element.encode(values[idx]), qw)
    unsigned_zeros = qw.qdata.view(torch.uint8) & torch.where(decoded == 0, 0x7F, 0xFF)
    assert torch.equal(again.qdata.view(torch.uint8), unsigned_zeros)
    assert torch.equal(MXFP8.dequantize(again), MXFP8.dequantize(qw))


# ---- golden bytes and shapes ----------------------------------------------------------------------------------------


def test_golden_marker_bytes():
    fields = MXFP8.comfy_marker_fields((1, 32), (70, 96))
    plain = ordered_marker(MXFP8.comfy_name, fields)
    assert json.dumps(plain).encode() == b'{"format": "mxfp8", "orig_shape": [70, 96]}'
    full = ordered_marker(
        MXFP8.comfy_name, fields, orig_dtype="torch.bfloat16", orig_shape=(70, 96), full_precision_matrix_mult=True
    )
    assert json.dumps(full).encode() == (
        b'{"format": "mxfp8", "orig_dtype": "torch.bfloat16", "orig_shape": [70, 96], '
        b'"full_precision_matrix_mult": true}'
    )


@pytest.mark.parametrize(
    ("shape", "weight", "scale"),
    [((70, 96), (96, 96), (128, 4)), ((300, 544), (320, 544), (384, 20)), ((128, 256), (128, 256), (128, 8))],
)
def test_golden_tensor_specs(shape, weight, scale):
    expected = {WEIGHT_SUFFIX: (torch.float8_e4m3fn, weight), SCALE_SUFFIX: (torch.uint8, scale)}
    assert MXFP8.comfy_tensor_specs(shape) == expected
    tensors = MXFP8.comfy_tensors(MXFP8.quantize(torch.randn(shape)), shape)
    assert {s: (t.dtype, tuple(t.shape)) for s, t in tensors.items()} == expected
    assert bool((tensors[WEIGHT_SUFFIX][shape[0] :].view(torch.uint8) == 0).all())  # padded rows hold zero codes


def test_swizzle_follows_the_cublas_offset_formula():
    rows, cols = 200, 9
    grid = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
    stored = swizzle(grid)
    assert tuple(stored.shape) == (256, 12)
    flat = stored.flatten()
    for r in range(rows):
        for c in range(cols):
            offset = (r // 128 * 3 + c // 4) * 512 + r % 32 * 16 + r % 128 // 32 * 4 + c % 4
            assert flat[offset] == grid[r, c]
    assert int(stored.sum()) == int(grid.sum())  # padding bytes are zero
    assert torch.equal(stored, to_blocked(grid, flatten=False))
    assert torch.equal(unswizzle(stored, rows, cols), grid)


# ---- registry, refusals, errors -------------------------------------------------------------------------------------


def test_registered_with_its_answers():
    assert get_format("mxfp8") is FORMATS["mxfp8"] is MXFP8
    assert MXFP8.comfy_name == "mxfp8" and MXFP8.stock and not MXFP8.has_blocks
    assert MXFP8.block_size_for((70, 96)) == (1, 32)
    assert MXFP8.kernel_dtype is None
    assert "weight_only" in MXFP8.dynamic_activation((1, 32), (70, 96))
    with pytest.raises(ValueError, match="no block size"):
        get_format("mxfp8", block_size=64)


def test_refuses_in_features_not_multiple_of_32():
    assert "in_features 100" in MXFP8.refusal((64, 100))
    with pytest.raises(FormatError, match=r"^blocks.0.ff.weight: .*in_features 48 .* not a multiple of 32"):
        MXFP8.quantize(torch.randn(64, 48), name="blocks.0.ff.weight")


def test_writer_rejects_scales_kitchen_cannot_store():
    qw = MXFP8.quantize(torch.randn(4, 32))
    with pytest.raises(FormatError, match="powers of two"):
        MXFP8.comfy_tensors(QuantizedWeight(qw.qdata, qw.scale * 1.5, (1, 32)), (4, 32))
    zero_scale = torch.full_like(qw.scale, 2.0**-127)  # byte 0, which ComfyUI decodes as 0.0
    with pytest.raises(ComfyFormatError, match="byte 0"):
        MXFP8.comfy_tensors(QuantizedWeight(qw.qdata, zero_scale, (1, 32)), (4, 32))


def _good_tensors(shape=(70, 96)):
    return MXFP8.comfy_tensors(MXFP8.quantize(torch.randn(shape)), shape)


@pytest.mark.parametrize(
    ("change", "named", "message"),
    [
        (lambda t: {**t, WEIGHT_SUFFIX: t[WEIGHT_SUFFIX].view(torch.uint8)}, WEIGHT_SUFFIX, "does not match format"),
        (lambda t: {**t, SCALE_SUFFIX: t[SCALE_SUFFIX].float()}, SCALE_SUFFIX, "not an E8M0 scale"),
        (lambda t: {**t, SCALE_SUFFIX: t[SCALE_SUFFIX][:, :3]}, SCALE_SUFFIX, r"expected the swizzled \[128, 4\]"),
        (lambda t: {**t, SCALE_SUFFIX: torch.full_like(t[SCALE_SUFFIX], 255)}, SCALE_SUFFIX, "NaN"),
        (lambda t: {WEIGHT_SUFFIX: t[WEIGHT_SUFFIX]}, SCALE_SUFFIX, "missing"),
    ],
    ids=["weight-dtype", "scale-dtype", "scale-shape", "scale-nan", "scale-missing"],
)
def test_reader_errors_name_the_tensor(change, named, message):
    with pytest.raises(ComfyFormatError, match=rf"^{WHERE}{named}: .*{message}"):
        reader_for("mxfp8")(marker((70, 96)), change(_good_tensors()), WHERE)


def test_reader_rejects_an_orig_shape_the_weight_does_not_fit():
    with pytest.raises(ComfyFormatError, match=rf"^{WHERE}{WEIGHT_SUFFIX}: stored shape \[96, 96\]"):
        reader_for("mxfp8")(marker((40, 96)), _good_tensors(), WHERE)


def test_reader_rejects_nan_codes():
    """Kitchen's quantizer writes NaN codes for a zero element of a block with amax <= 448 * 2^-127 (0 / 0)."""
    w = torch.zeros(32, 32, dtype=torch.bfloat16)
    w[:, 1:] = 1e-37
    with pytest.raises(ComfyFormatError, match=rf"^{WHERE}{WEIGHT_SUFFIX}: holds float8_e4m3fn NaN"):
        reader_for("mxfp8")(marker((32, 32)), kitchen_tensors(w), WHERE)
