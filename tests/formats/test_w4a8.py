"""W4A8 (``lrq_ao.formats.w4a8``, ComfyUI ``asym_w4a8_int8``) against comfy-kitchen 0.2.40's own eager functions (the
code ComfyUI runs) and float64 references: our tensors through kitchen's dequantize and linear, kitchen's quantizer
output (fixed and fitted codebooks, uniform 4- and 6-bit) through our reader, the packing, the marker bytes and
tensor specs, the per-group grid learned rounding will need, SQNR of both quantizers, and the reader's errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from comfy_kitchen.backends.eager import quantization as ck_quant  # a test dependency (pyproject's "test" extra)
from comfy_kitchen.backends.eager import w4a8_int8 as ck_w4a8
from comfy_kitchen.tensor import AsymW4A8Int8Layout, QuantizedTensor
from comfy_kitchen.tensor.w4a8_packed import _pack_codes, _unpack_codes, default_w4a8_codebook

from lrq_ao.formats import FORMATS, ComfyFormatError, FormatError, get_format, reader_for
from lrq_ao.formats.comfy import ordered_marker
from lrq_ao.formats.w4a8 import LLOYD_MAX_16, W4A8, W4A8Format, pack_codes, unpack_codes

LAYOUT = "AsymW4A8Int8Layout"
# (out, in, rotation group G, quantization group g): odd row counts, groups of 4 .. 64, one or several rotations.
SHAPES = [(9, 64, 16, 16), (33, 320, 64, 16), (5, 1024, 256, 16), (17, 1280, 256, 32), (3, 2048, 1024, 64),
          (1, 256, 256, 8), (7, 96, 16, 4)]  # fmt: skip
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MARKER = {"format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": 256}


def sqnr64(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return float(20 * torch.log10(ref.norm() / (ref - approx).norm()))


def gaussian(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.02).to(dtype)


def heavy_tailed(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Student-t (3 degrees of freedom) entries and 1 / 64 of the input channels 8x larger (outlier channels, as in
    diffusion transformers' attention projections)."""
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    chi2 = (torch.randn(3, n, k, generator=g) ** 2).sum(0)
    w = torch.randn(n, k, generator=g) / (chi2 / 3).sqrt() * 0.02
    w[:, torch.randperm(k, generator=g)[: k // 64]] *= 8
    return w.to(dtype)


def kitchen_tensor(tensors: dict, shape, fmt: W4A8Format, orig_dtype: torch.dtype) -> QuantizedTensor:
    """The tensor ComfyUI's ``_load_quantized_module`` (Comfy-Org/ComfyUI ``comfy/ops.py``) builds from a layer."""
    params = AsymW4A8Int8Layout.Params(
        scale=tensors[".weight_s_rel"],
        s_channel=tensors[".weight_s_channel"],
        codebook=tensors.get(".weight_codebook"),
        orig_dtype=orig_dtype,
        orig_shape=tuple(shape),
        group_size=fmt.group,
        convrot_groupsize=fmt.block,
    )
    return QuantizedTensor(tensors[".weight"], LAYOUT, params)


def kitchen_quantize(w: torch.Tensor, group: int = 16, rotation: int = 256, **kw) -> dict:
    """Kitchen's own quantizer (eager), as stored tensors by suffix."""
    packed, s_rel, s_channel, correction, codebook = ck_w4a8.quantize_w4a8_int8_weight(w, group, rotation, **kw)
    assert correction is None
    tensors = {".weight": packed, ".weight_s_rel": s_rel, ".weight_s_channel": s_channel}
    if codebook is not None:
        tensors[".weight_codebook"] = codebook
    return tensors


def kitchen_dequantize(tensors: dict, group: int, rotation: int, dtype: torch.dtype) -> torch.Tensor:
    return ck_w4a8.dequantize_w4a8_int8_weight(
        tensors[".weight"],
        tensors[".weight_s_rel"],
        tensors[".weight_s_channel"],
        tensors.get(".weight_codebook"),
        None,
        group,
        rotation,
        dtype,
    )


def read(tensors: dict, marker: dict = MARKER, where: str = "model.layer"):
    return reader_for(marker["format"])(marker, tensors, where)


# ---- identity ---------------------------------------------------------------------------------------------------


def test_registry_and_identity():
    fmt = FORMATS["w4a8"]
    assert fmt is W4A8 and fmt == W4A8Format(256, 16, LLOYD_MAX_16, 4) and fmt.has_blocks and fmt.rotates
    assert get_format("w4a8", block_size=64) == W4A8Format(64)
    assert fmt.comfy_name == "asym_w4a8_int8" and fmt.stock and fmt.kernel_dtype is None
    assert fmt.dynamic_activation((1, 16), (8, 512)) == ("row", 0)
    assert fmt.describe() == "w4a8 (Lloyd-Max codebook, fp8 scale per 1x16, fp32 per row, ConvRot 256)"
    # our table is kitchen's frozen LUT, value for value
    assert torch.equal(fmt.element.table(), default_w4a8_codebook())
    assert torch.equal(fmt.element.values(), default_w4a8_codebook())  # sorted already, no duplicates
    with pytest.raises(FormatError, match="ConvRot group must be one of"):
        W4A8Format(128)
    with pytest.raises(FormatError, match="group_size must be"):
        W4A8Format(256, 24)


# ---- (1) our tensors through kitchen's dequantize and linear ----------------------------------------------------


@pytest.mark.parametrize("shape_groups", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_our_tensors_dequantize_exactly_through_kitchen(shape_groups, dtype):
    n, k, rotation, group = shape_groups
    fmt = W4A8Format(rotation, group)
    w = gaussian((n, k), seed=n + k, dtype=dtype)
    qw = fmt.quantize(w)
    tensors = fmt.comfy_tensors(qw, (n, k))
    ours = fmt.dequantize_original(qw, dtype)
    assert ours.dtype == dtype
    assert torch.equal(kitchen_dequantize(tensors, group, rotation, dtype), ours)
    assert torch.equal(kitchen_tensor(tensors, (n, k), fmt, dtype).dequantize(), ours)
    # the rotated basis: kitchen's decoded INT8 grid times s_channel
    codebook = tensors[".weight_codebook"]
    grid = ck_w4a8._dequant_int4_grouped_to_int8(tensors[".weight"], tensors[".weight_s_rel"], codebook, group)
    assert torch.equal(fmt.int8_grid(qw), grid)
    assert torch.equal(fmt.dequantize(qw), grid.float() * tensors[".weight_s_channel"][:, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kitchens_linear_is_the_int8_linear_of_our_grid(dtype):
    """Kitchen's ``F.linear(x, W4A8 tensor)`` decodes to our INT8 grid and runs its ConvRot INT8 linear: per-token
    INT8 activations of the rotated input (what ``dynamic_activation`` says)."""
    n, k = 24, 512
    qw = W4A8.quantize(gaussian((n, k), 3, dtype))
    tensors = W4A8.comfy_tensors(qw, (n, k))
    x = gaussian((5, k), 4, dtype) * 50
    out = F.linear(x, kitchen_tensor(tensors, (n, k), W4A8, dtype))
    expected = ck_quant.int8_linear(
        x, W4A8.int8_grid(qw), qw.extra["s_channel"], None, dtype, convrot=True, convrot_groupsize=256
    )
    assert torch.equal(out, expected)
    ref = x.double() @ W4A8.dequantize_original(qw, torch.float64).T
    assert (
        sqnr64(ref, out) > 30
    )  # W8A8-style error on top of the exact weight; measured 42.4 dB (float32), 41.1 dB (bf16)


# ---- (2) kitchen's quantizer output, read back -------------------------------------------------------------------


@pytest.mark.parametrize("shape_groups", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kitchen_quantizer_output_reads_back_exactly(shape_groups, dtype):
    n, k, rotation, group = shape_groups
    w = gaussian((n, k), seed=7 * n + k, dtype=dtype)
    tensors = kitchen_quantize(w, group, rotation)
    marker = ordered_marker("asym_w4a8_int8", {"group_size": group, "convrot_groupsize": rotation})
    fmt, qw = read(tensors, marker)
    # kitchen's kurtosis gate keeps the fixed table for groups of <= 32 Gaussian values; normalised by the amax of
    # 64, the group is peaked enough that it fits its own 16 levels (the (3, 2048, 1024, 64) case)
    assert fmt == W4A8Format(rotation, group, tuple(tensors[".weight_codebook"].tolist()))
    assert (fmt.codebook == LLOYD_MAX_16) == (group <= 32)
    assert torch.equal(fmt.dequantize_original(qw, dtype), kitchen_dequantize(tensors, group, rotation, dtype))
    # and written back, byte for byte
    again = fmt.comfy_tensors(qw, (n, k))
    assert set(again) == set(tensors)
    for suffix, stored in tensors.items():
        assert again[suffix].dtype == stored.dtype and torch.equal(
            again[suffix].view(torch.uint8), stored.view(torch.uint8)
        )


def test_fitted_codebook_reads_back_exactly():
    """A weight heavy-tailed in the rotated basis trips kitchen's kurtosis gate: it fits its own 16 levels by k-means
    and stores them; the reader carries them in the format (a different element) and decodes exactly."""
    gen = torch.Generator().manual_seed(0)
    chi2 = torch.randn(64, 512, generator=gen) ** 2
    w_rot = torch.randn(64, 512, generator=gen) / chi2.sqrt() * 0.01  # Student-t, 1 degree of freedom
    w = W4A8.unrotate_weight(w_rot)
    tensors = kitchen_quantize(w)
    assert not torch.equal(tensors[".weight_codebook"], default_w4a8_codebook())
    fmt, qw = read(tensors)
    assert fmt.codebook == tuple(tensors[".weight_codebook"].tolist()) and fmt.element != W4A8.element
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(fmt.dequantize_original(qw, dtype), kitchen_dequantize(tensors, 16, 256, dtype))
    assert torch.equal(fmt.comfy_tensors(qw, (64, 512))[".weight_codebook"], tensors[".weight_codebook"])


@pytest.mark.parametrize(("bits", "name"), [(4, "w4a8_uniform"), (6, "w6a8_uniform")])
def test_uniform_variants_read_exactly_and_are_read_only(bits, name):
    """Without a codebook kitchen decodes ``code - 8`` (4 bits) or ``code - 32`` (6 bits, a ``3K / 4``-byte row)."""
    n, k = 11, 512
    w = gaussian((n, k), 5, torch.bfloat16)
    tensors = kitchen_quantize(w, codebook=False, bits=bits)
    assert tuple(tensors[".weight"].shape) == (n, k * bits // 8) and ".weight_codebook" not in tensors
    fmt, qw = read(tensors)
    assert fmt.name == name and fmt.bits == bits and fmt.codebook is None
    assert torch.equal(
        fmt.dequantize_original(qw, torch.bfloat16), kitchen_dequantize(tensors, 16, 256, torch.bfloat16)
    )
    assert set(fmt.comfy_tensors(qw, (n, k))) == set(tensors)
    with pytest.raises(FormatError, match="reads .* but does not write"):
        fmt.quantize(w)


def test_byte_scales_and_params_marker():
    """ComfyUI views a uint8 ``weight_s_rel`` as fp8 and reads the groups from ``"params"`` too."""
    tensors = kitchen_quantize(gaussian((6, 256), 9), group=32, rotation=64)
    expected = kitchen_dequantize(tensors, 32, 64, torch.float32)
    tensors[".weight_s_rel"] = tensors[".weight_s_rel"].view(torch.uint8)
    fmt, qw = read(tensors, {"format": "asym_w4a8_int8", "params": {"group_size": 32, "convrot_groupsize": 64}})
    assert fmt == W4A8Format(64, 32)
    assert torch.equal(fmt.dequantize_original(qw), expected)


# ---- (3) golden marker bytes, tensor dtypes and shapes ---------------------------------------------------------


def test_golden_marker_bytes():
    fields = W4A8.comfy_marker_fields((1, 16), (70, 512))
    marker = ordered_marker("asym_w4a8_int8", fields)
    # what ComfyUI's _quantized_weight_state_dict writes for this layout
    assert json.dumps(marker).encode() == b'{"format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": 256}'
    marker = ordered_marker("asym_w4a8_int8", W4A8Format(64, 32).comfy_marker_fields((1, 32), (70, 512)),
                            orig_dtype="torch.bfloat16", orig_shape=[70, 512])  # fmt: skip
    assert json.dumps(marker).encode() == (
        b'{"format": "asym_w4a8_int8", "orig_dtype": "torch.bfloat16", "orig_shape": [70, 512], "group_size": 32, '
        b'"convrot_groupsize": 64}'
    )


@pytest.mark.parametrize("shape_groups", SHAPES, ids=str)
def test_golden_tensor_dtypes_and_shapes(shape_groups):
    n, k, rotation, group = shape_groups
    fmt = W4A8Format(rotation, group)
    expected = {
        ".weight": (torch.int8, (n, k // 2)),
        ".weight_s_rel": (torch.float8_e4m3fn, (n, k // group)),
        ".weight_s_channel": (torch.float32, (n,)),
        ".weight_codebook": (torch.float32, (16,)),
    }
    tensors = fmt.comfy_tensors(fmt.quantize(gaussian((n, k), 1)), (n, k))
    assert {s: (t.dtype, tuple(t.shape)) for s, t in tensors.items()} == expected == fmt.comfy_tensor_specs((n, k))
    assert {
        s: (t.dtype, tuple(t.shape)) for s, t in kitchen_quantize(gaussian((n, k), 1), group, rotation).items()
    } == (expected)


def test_golden_bytes_of_one_group():
    """A hand-checked group: w_rot = the 16 Lloyd-Max levels times 0.5 in one row of 16 (G = 16)."""
    fmt = W4A8Format(16, 16)
    w_rot = torch.tensor([LLOYD_MAX_16], dtype=torch.float32) * 0.5
    qw = fmt.quantize(fmt.unrotate_weight(w_rot.double()).float())
    # amax 0.490336 -> s_channel = amax * 0.980671 / 127; s_rel = fp8(127 / 0.980671 = 129.5) = 128
    assert qw.scale.tolist() == [[128.0]]
    assert torch.allclose(qw.extra["s_channel"], torch.tensor([0.5 * 0.980671 * 0.980671 / 127]), rtol=1e-6)
    assert fmt.codes(qw).tolist() == [list(range(16))]
    assert qw.qdata.view(torch.uint8).tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]
    # INT8 levels round(128 * level), clamped at 127 (the top levels 125.5.. round to 126)
    assert fmt.int8_grid(qw).tolist() == [[round(128 * v) if abs(round(128 * v)) <= 127 else 127 for v in LLOYD_MAX_16]]


# ---- (4) packing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("k", [32, 96, 544])
def test_packing_equals_kitchens_both_ways(bits, k):
    g = torch.Generator().manual_seed(k + bits)
    codes = torch.randint(0, 1 << bits, (7, k), generator=g, dtype=torch.int32)
    ours = pack_codes(codes, bits)
    assert ours.dtype == torch.int8 and tuple(ours.shape) == (7, k * bits // 8)
    assert torch.equal(ours, _pack_codes(codes, bits))
    assert torch.equal(unpack_codes(ours, bits), codes)
    assert torch.equal(_unpack_codes(ours, k, bits), codes)


def test_even_column_in_the_low_nibble():
    assert pack_codes(torch.tensor([[1, 2]]), 4).view(torch.uint8).tolist() == [[0x21]]
    # 6 bits: codes 0b10_0001, 0b01_0010, 0b11_0011, 0b00_0100 -> nibbles 0x21, 0x43; top bits 10, 01, 11, 00
    six = pack_codes(torch.tensor([[0x21, 0x12, 0x33, 0x04]]), 6).view(torch.uint8).tolist()
    assert six == [[0x21, 0x43, 0b00_11_01_10]]


# ---- (5) round to nearest: the rule, the grid, and SQNR ---------------------------------------------------------


@pytest.mark.parametrize("make", [gaussian, heavy_tailed], ids=["gaussian", "heavy"])
def test_our_rounding_under_kitchens_scales_is_kitchens_assignment(make):
    """Given kitchen's s_rel and s_channel, our round-to-nearest picks the same INT8 level as kitchen's quantizer
    (codes may differ only between equal levels)."""
    w = make((48, 1024), 2)
    tensors = kitchen_quantize(w)
    _, qw = read(tensors)
    codes = W4A8.round_to_levels(W4A8.rotate_weight(w), qw.scale, qw.extra["s_channel"])
    assert torch.equal(W4A8.int8_grid(W4A8.from_codes(codes, qw)), W4A8.int8_grid(qw))


def test_candidate_values_are_the_per_group_grid():
    """``dequantize == candidate_values[n, k // g, code]`` exactly, for every code the engine may choose."""
    n, k = 13, 512
    qw = W4A8.quantize(heavy_tailed((n, k), 4))
    cand = W4A8.candidate_values(qw)
    assert tuple(cand.shape) == (n, k // 16, 16)
    assert bool((cand.diff(dim=-1) >= 0).all())  # sorted along the codes (duplicates possible)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=g)
    moved = W4A8.from_codes(codes, qw)
    picked = torch.gather(cand, 2, codes.reshape(n, k // 16, 16)).reshape(n, k)
    assert torch.equal(W4A8.dequantize(moved), picked)
    assert torch.equal(W4A8.codes(moved), codes.int())
    # the RTN codes are the nearest candidates of the rotated weight
    w_rot = W4A8.rotate_weight(heavy_tailed((n, k), 4))
    nearest = (cand[:, :, None, :] - w_rot.reshape(n, k // 16, 16, 1)).abs().amin(dim=-1).reshape(n, k)
    assert torch.equal((W4A8.dequantize(qw) - w_rot).abs(), nearest)


def test_no_single_effective_scale():
    for call in (lambda: W4A8.effective_scale(torch.ones(1, 1), None),
                 lambda: W4A8.compute_scales(torch.ones(1, 16), (1, 16)),
                 lambda: W4A8.round_values(torch.ones(1, 16), torch.ones(1, 1), None, (1, 16))):  # fmt: skip
        with pytest.raises(FormatError, match="per-group grids"):
            call()


# Measured on these weights (dequantized in float32; float32 and bf16 weights agree within 0.01 dB): ours 22.50 and
# 22.98 dB, kitchen 22.75 and 23.27 dB (Gaussian, heavy-tailed). Both use the fixed Lloyd-Max table here (the
# rotation makes these groups Gaussian enough for kitchen's gate); kitchen's two least-squares refits of the group
# scale are the gap.
@pytest.mark.parametrize(("make", "ours_floor", "kitchen_floor"), [(gaussian, 22.4, 22.6), (heavy_tailed, 22.8, 23.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rtn_sqnr_against_float64_ours_and_kitchens(make, ours_floor, kitchen_floor, dtype):
    w = make((256, 1024), 0, dtype)
    ours = sqnr64(w, W4A8.dequantize_original(W4A8.quantize(w)))
    tensors = kitchen_quantize(w)
    assert torch.equal(tensors[".weight_codebook"], default_w4a8_codebook())
    kitchen = sqnr64(w, kitchen_dequantize(tensors, 16, 256, torch.float32))
    assert ours > ours_floor and kitchen > kitchen_floor
    assert 0.1 < kitchen - ours < 0.5  # kitchen's refit buys ~0.25 dB


# ---- (6) refusals and reader errors name the tensor -------------------------------------------------------------


def test_refuses_shapes_kitchen_cannot_run():
    with pytest.raises(FormatError, match="my.layer: .*ConvRot group 256 does not divide in_features 320"):
        W4A8.quantize(gaussian((4, 320), 0), name="my.layer")
    with pytest.raises(FormatError, match="multiple of 16"):
        W4A8Format(16, 16).quantize(gaussian((4, 40), 0))
    with pytest.raises(FormatError, match="NaN"):
        W4A8.quantize(torch.full((4, 256), float("nan")), name="L")
    assert "does not divide" in W4A8.refusal((4, 320))


def _good():
    return kitchen_quantize(gaussian((8, 512), 3))


@pytest.mark.parametrize(
    ("edit", "marker", "names"),
    [
        (lambda t: t.pop(".weight_s_rel"), {}, "L.weight_s_rel: missing"),
        (lambda t: t.pop(".weight_s_channel"), {}, "L.weight_s_channel: missing"),
        (lambda t: t.pop(".weight"), {}, "L.weight: missing"),
        (lambda t: t.update({".weight": t[".weight"].view(torch.uint8)}), {}, "L.weight: .*int8"),
        (lambda t: t.update({".weight_s_rel": t[".weight_s_rel"].float()}), {}, "L.weight_s_rel: .*float32 variant"),
        (lambda t: t.update({".weight_s_rel": t[".weight_s_rel"][:4]}), {}, r"L.weight_s_rel: shape \[4, 32\]"),
        (
            lambda t: t.update({".weight_s_channel": t[".weight_s_channel"][:, None]}),
            {},
            "L.weight_s_channel: .*\\[8\\]",
        ),
        (lambda t: t.update({".weight_codebook": torch.zeros(8)}), {}, "L.weight_codebook: .*\\[16\\]"),
        (lambda t: t.update({".weight_correction": torch.zeros(32, 8)}), {}, "L.weight_correction: asymmetric"),
        (lambda t: t.update({".weight": t[".weight"][:, :100]}), {}, "L.weight: packed row of 100 bytes"),
        (lambda t: None, {"group_size": "16"}, "L.comfy_quant: group_size '16' is not an integer"),
        (lambda t: None, {"convrot_groupsize": 1024}, "L.weight: .*ConvRot group 1024 does not divide in_features 512"),
        (lambda t: None, {"orig_shape": [8, 256]}, r"L.weight: stored tensors hold a \[8, 512\] weight"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_reader_errors_name_the_tensor(edit, marker, names):
    tensors = _good()
    edit(tensors)
    with pytest.raises(ComfyFormatError, match=names):
        read(tensors, {**MARKER, **marker}, where="L")
