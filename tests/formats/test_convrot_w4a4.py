"""ConvRot W4A4 (``lrq_ao.formats.convrot_w4a4``) against comfy-kitchen 0.2.40's own eager functions (the code
ComfyUI runs on CPU) and float64 references: our tensors through kitchen's dequantizer, kitchen's quantizer output
through our reader, the marker bytes ComfyUI writes, the low-nibble-first INT4 element, RTN accuracy, reader errors
and the learned-rounding grid."""

from __future__ import annotations

import json

import pytest
import torch
from comfy_kitchen.backends.eager import convrot_w4a4 as ck_w4a4  # a test dependency (pyproject's "test" extra)
from comfy_kitchen.backends.eager.svdquant import _pack_int4_row_major, _unpack_int4_row_major
from comfy_kitchen.tensor import QuantizedTensor, get_layout_class

from lrq_ao.formats import ELEMENTS, FORMATS, ComfyFormatError, FormatError, get_format, reader_for
from lrq_ao.formats.base import broadcast_blocks
from lrq_ao.formats.comfy import ordered_marker
from lrq_ao.formats.convrot import ConvRotFormat
from lrq_ao.formats.convrot_w4a4 import INT4_LO, ConvRotW4A4Format
from lrq_ao.formats.scaled import ScaledFormat

LAYOUT = "TensorCoreConvRotW4A4Layout"
LAYOUT_CLS = get_layout_class(LAYOUT)
FMT = get_format("convrot_w4a4")
# (out, in, group): odd row counts, one row, several groups per row, one group per row, group 16 with K = 64.
SHAPES = [(1, 64, 16), (9, 192, 64), (33, 320, 64), (5, 1024, 256), (17, 1280, 256), (3, 2048, 1024), (70, 64, 16)]


def sqnr64(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return float(20 * torch.log10(ref.norm() / (ref - approx).norm()))


def awkward_weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian, plus (rows permitting) an all-zero row, a row of tiny values, a row far above the rest and a row
    with one outlier input."""
    n, k = shape
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.02
    if n >= 4:
        w[0] = 0.0
        w[1] *= 1e-12
        w[2] *= 1e6
        w[3, k // 3] = 5.0
    return w.to(dtype)


def comfyui_marker(group: int) -> dict:
    """What ComfyUI master's ``_quantized_weight_state_dict`` (comfy/ops.py) writes for a convrot_w4a4 layer."""
    return {"format": "convrot_w4a4", "convrot_groupsize": group}


def kitchen_tensor(tensors: dict, shape, group: int, orig_dtype: torch.dtype) -> QuantizedTensor:
    """The tensor ComfyUI's ``_load_from_state_dict`` builds from a ``convrot_w4a4`` layer (weight value-cast to
    int8, the scale as stored, ``quant_group_size`` 64, ``orig_dtype`` the compute dtype)."""
    params = LAYOUT_CLS.Params(
        scale=tensors[".weight_scale"],
        orig_dtype=orig_dtype,
        orig_shape=tuple(shape),
        convrot_groupsize=group,
        quant_group_size=64,
        linear_dtype="int4",
    )
    return QuantizedTensor(tensors[".weight"].to(torch.int8), LAYOUT, params)


def kitchen_layer(w: torch.Tensor, group: int) -> tuple[QuantizedTensor, dict]:
    """Kitchen's own quantizer output under ComfyUI's suffixes."""
    qt = QuantizedTensor.from_float(w, LAYOUT, convrot_groupsize=group)
    sd = qt.state_dict("blocks.0.proj.weight")
    return qt, {".weight": sd["blocks.0.proj.weight"], ".weight_scale": sd["blocks.0.proj.weight_scale"]}


# ---- identity ----------------------------------------------------------------------------------------------------


def test_registry_and_identity():
    assert FORMATS["convrot_w4a4"] == ConvRotW4A4Format(256) and FMT.group == 256 and FMT.has_blocks
    assert get_format("convrot_w4a4", block_size=64) == ConvRotW4A4Format(64)
    assert ConvRotW4A4Format(256) != ConvRotFormat(256)  # same rotation, another format
    assert FMT.describe() == "convrot_w4a4 (group 256, INT4 per row)"
    assert FMT.rotates and FMT.kernel_dtype is None and FMT.element is INT4_LO
    assert FMT.comfy_name == "convrot_w4a4" and FMT.stock
    why = FMT.dynamic_activation((1, 512), (8, 512))
    assert isinstance(why, str) and "INT4" in why and "weight_only" in why
    with pytest.raises(FormatError, match="rotation group must be one of"):
        ConvRotW4A4Format(128)


def test_rotation_is_convrots():
    """The rotation hooks are INT8 ConvRot's (one implementation): ``rotate_input(x) @ W_rot.T == x @ W.T``."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(11, 192, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 192, generator=gen, dtype=torch.float64)
    fmt = ConvRotW4A4Format(64)
    assert torch.equal(fmt.rotate_weight(w), ConvRotFormat(64).rotate_weight(w))
    torch.testing.assert_close(fmt.rotate_input(x) @ fmt.rotate_weight(w).T, x @ w.T, rtol=1e-12, atol=1e-12)
    sigma = x.T @ x
    assert torch.equal(fmt.rotate_hessian(sigma), ConvRotFormat(64).rotate_hessian(sigma))


# ---- (1) our tensors through kitchen's dequantizer -----------------------------------------------------------------


@pytest.mark.parametrize("shape_group", SHAPES, ids=str)
@pytest.mark.parametrize("orig_dtype", [torch.float32, torch.bfloat16])
def test_our_tensors_dequantize_exactly_through_kitchen(shape_group, orig_dtype):
    """Kitchen un-rotates on dequantize: its result is our ``dequantize_original``; our ``dequantize`` is the stored,
    rotated weight, kitchen's ``unpack(codes).float() * scale`` before its rotation."""
    n, k, group = shape_group
    fmt = ConvRotW4A4Format(group)
    w = awkward_weight((n, k), orig_dtype, seed=n + k)
    qw = fmt.quantize(w)
    tensors = fmt.comfy_tensors(qw, (n, k))

    theirs = kitchen_tensor(tensors, (n, k), group, orig_dtype).dequantize()
    assert theirs.dtype == orig_dtype and theirs.shape == (n, k)
    assert torch.equal(fmt.dequantize_original(qw, orig_dtype), theirs)
    direct = ck_w4a4.dequantize_convrot_w4a4_weight(tensors[".weight"], tensors[".weight_scale"], group, 64)
    assert torch.equal(fmt.dequantize_original(qw), direct)  # float32 output
    rotated = _unpack_int4_row_major(tensors[".weight"]).float() * tensors[".weight_scale"].reshape(-1, 1)
    assert torch.equal(fmt.dequantize(qw), rotated)
    if n >= 4:
        assert not theirs[0].any()  # the all-zero row stays zero (our scale floor 1e-8, kitchen's 1e-10)


@pytest.mark.parametrize("shape_group", SHAPES, ids=str)
def test_rtn_of_float32_weights_equals_kitchens_quantizer(shape_group):
    """Same float32 rotation, amax / 7, division and rounding: the same bytes. Only rows with amax < 7e-8 differ:
    lrq_ao floors the scale at 1e-8 (``MIN_SCALE``), kitchen floors amax at 1e-10 (scale 1.43e-11), so the
    awkward weight's all-zero and tiny rows are replaced here (both decode to ~0 either way)."""
    n, k, group = shape_group
    w = awkward_weight((n, k), torch.float32, seed=3 * n + k)
    if n >= 4:
        w[:2] = torch.randn(2, k, generator=torch.Generator().manual_seed(1))
    qw = ConvRotW4A4Format(group).quantize(w)
    qdata, scale = ck_w4a4.quantize_convrot_w4a4_weight(w, group, 64)
    assert torch.equal(qw.qdata, qdata)
    assert torch.equal(qw.scale.reshape(-1), scale)


# ---- (2) kitchen's quantizer output read back ----------------------------------------------------------------------


@pytest.mark.parametrize("shape_group", SHAPES, ids=str)
@pytest.mark.parametrize("orig_dtype", [torch.float32, torch.bfloat16])
def test_kitchen_quantized_tensors_read_back_exactly(shape_group, orig_dtype):
    n, k, group = shape_group
    w = awkward_weight((n, k), orig_dtype, seed=5 * n + k)
    qt, tensors = kitchen_layer(w, group)
    assert tensors[".weight"].dtype == torch.int8 and tuple(tensors[".weight"].shape) == (n, k // 2)
    assert tensors[".weight_scale"].dtype == torch.float32 and tuple(tensors[".weight_scale"].shape) == (n,)
    fmt, qw = reader_for("convrot_w4a4")(comfyui_marker(group), tensors, "blocks.0.proj")
    assert fmt == ConvRotW4A4Format(group)
    assert qw.block_size == (1, k) and tuple(qw.scale.shape) == (n, 1)
    assert torch.equal(fmt.dequantize_original(qw, orig_dtype), qt.dequantize())
    # written back unchanged
    again = fmt.comfy_tensors(qw, (n, k))
    assert all(torch.equal(again[s], tensors[s]) for s in tensors)


def test_a_stored_minus_8_reads_as_kitchen_reads_it():
    """Kitchen's quantizer never writes nibble 0x8, but its unpacker sign-extends it to -8; so does our reader."""
    n, k = 3, 64
    stored = torch.full((n, k // 2), 0x88 - 256, dtype=torch.int8)  # every nibble 0x8
    stored[1, :] = 0x7F  # low 0xF (-1), high 0x7 (7)
    scale = torch.tensor([0.5, 0.25, 2.0])
    fmt, qw = reader_for("convrot_w4a4")(comfyui_marker(16), {".weight": stored, ".weight_scale": scale}, "l")
    assert fmt.codes(qw)[0].unique().tolist() == [-8] and fmt.codes(qw)[1, :2].tolist() == [-1, 7]
    assert fmt.dequantize(qw)[0, 0].item() == -4.0
    theirs = ck_w4a4.dequantize_convrot_w4a4_weight(stored, scale, 16, 64)
    assert torch.equal(fmt.dequantize_original(qw), theirs)


@pytest.mark.parametrize(
    "marker",
    [
        {"format": "convrot_w4a4", "convrot_groupsize": 64},  # ComfyUI's state_dict
        {"format": "convrot_w4a4", "convrot_groupsize": 64, "linear_dtype": "int8"},  # its int8-GEMM variant
        {"format": "convrot_w4a4", "orig_dtype": "torch.bfloat16", "orig_shape": [24, 128], "convrot_groupsize": 64},
        {"format": "convrot_w4a4", "params": {"convrot_groupsize": 64}},  # ComfyUI reads these too
    ],
    ids=["comfyui", "linear_int8", "orig_fields", "params"],
)
def test_reader_accepts_the_markers_producers_write(marker):
    qt, tensors = kitchen_layer(awkward_weight((24, 128), torch.bfloat16, seed=7), 64)
    fmt, qw = reader_for("convrot_w4a4")(marker, tensors, "l")
    assert fmt == ConvRotW4A4Format(64)
    assert torch.equal(fmt.dequantize_original(qw, torch.bfloat16), qt.dequantize())


def test_reader_defaults_group_256_and_reads_row_column_scales():
    qt, tensors = kitchen_layer(awkward_weight((8, 512), torch.float32, seed=11), 256)
    fmt, qw = reader_for("convrot_w4a4")({"format": "convrot_w4a4"}, tensors, "l")
    assert fmt == ConvRotW4A4Format(256)  # ComfyUI's default when convrot_groupsize is absent
    column = dict(tensors, **{".weight_scale": tensors[".weight_scale"].reshape(8, 1)})
    _, qw_column = reader_for("convrot_w4a4")({"format": "convrot_w4a4"}, column, "l")
    assert torch.equal(fmt.dequantize_original(qw_column), qt.dequantize())


# ---- (3) golden marker bytes, tensor dtypes and shapes ---------------------------------------------------------------


def test_marker_bytes_are_what_comfyui_writes():
    fields = FMT.comfy_marker_fields((1, 3072), (3072, 3072))
    assert json.dumps(ordered_marker(FMT.comfy_name, fields)).encode() == (
        b'{"format": "convrot_w4a4", "convrot_groupsize": 256}'
    )
    assert ordered_marker(FMT.comfy_name, fields) == comfyui_marker(256)
    common = {"orig_dtype": "torch.bfloat16", "orig_shape": [64, 320], "full_precision_matrix_mult": True}
    fields = ConvRotW4A4Format(64).comfy_marker_fields((1, 320), (64, 320))
    assert json.dumps(ordered_marker(FMT.comfy_name, fields, **common)) == (
        '{"format": "convrot_w4a4", "orig_dtype": "torch.bfloat16", "orig_shape": [64, 320], '
        '"full_precision_matrix_mult": true, "convrot_groupsize": 64}'
    )


@pytest.mark.parametrize(("shape", "group"), [((64, 256), 256), ((7, 192), 64), ((33, 64), 16)])
def test_tensor_specs_match_the_tensors_and_kitchens(shape, group):
    fmt = ConvRotW4A4Format(group)
    expected = {".weight": (torch.int8, (shape[0], shape[1] // 2)), ".weight_scale": (torch.float32, (shape[0],))}
    assert fmt.comfy_tensor_specs(shape) == expected
    written = fmt.comfy_tensors(fmt.quantize(awkward_weight(shape, torch.float32)), shape)
    assert {s: (t.dtype, tuple(t.shape)) for s, t in written.items()} == expected
    _, theirs = kitchen_layer(awkward_weight(shape, torch.float32), group)
    assert {s: (t.dtype, tuple(t.shape)) for s, t in theirs.items()} == expected


def test_golden_bytes_of_one_row():
    """Codes -7..7 (and 0) times 0.25 un-rotated through ``H`` of group 16 (every sum exact in float32): RTN gets
    scale 0.25 and the codes back, packed even column low: byte = (c[2j] & 0xF) | (c[2j + 1] & 0xF) << 4."""
    fmt = ConvRotW4A4Format(16)
    codes = torch.tensor([[-7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 0] * 4], dtype=torch.float32)
    w = fmt.unrotate_weight(codes * 0.25)
    tensors = fmt.comfy_tensors(fmt.quantize(w), (1, 64))
    assert tensors[".weight_scale"].tolist() == [0.25]
    expected = [0xA9, 0xCB, 0xED, 0x0F, 0x21, 0x43, 0x65, 0x07] * 4
    assert tensors[".weight"].view(torch.uint8)[0].tolist() == expected


# ---- (4) the INT4 element ------------------------------------------------------------------------------------------


def test_element_registered_values_and_shapes():
    assert ELEMENTS["int4_lo"] is INT4_LO
    assert INT4_LO.values().tolist() == list(range(-7, 8))
    assert INT4_LO.packed and INT4_LO.bits == 4 and INT4_LO.storage_dtype == torch.int8 and INT4_LO.qmax == 7
    assert INT4_LO.stored_shape((5, 64)) == (5, 32) and INT4_LO.kernel_dtype is None


def test_packing_is_low_nibble_first_as_kitchens_packer():
    known = torch.tensor([[3, -2, -7, 7, -8, 0]], dtype=torch.int8)
    packed = INT4_LO.pack(known)
    assert packed.dtype == torch.int8 and packed.view(torch.uint8).tolist() == [[0xE3, 0x79, 0x08]]
    assert torch.equal(packed, _pack_int4_row_major(known))
    assert torch.equal(INT4_LO.unpack(packed), known)
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)[:, torch.randperm(32)]
    packed = INT4_LO.pack(every)
    assert torch.equal(packed, _pack_int4_row_major(every))
    assert torch.equal(INT4_LO.unpack(packed), every) and torch.equal(_unpack_int4_row_major(packed), every)
    every_byte = torch.arange(-128, 128, dtype=torch.int8).reshape(2, 128)
    assert torch.equal(INT4_LO.unpack(every_byte), _unpack_int4_row_major(every_byte))
    with pytest.raises(FormatError, match="odd number"):
        INT4_LO.pack(torch.zeros(2, 3, dtype=torch.int8))


def test_round_half_to_even_and_saturation_as_kitchens_round():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 6.5, 7.49, 7.5, 100.0, -100.0, -7.5, 3.4999])
    assert INT4_LO.round(x).tolist() == [0, 2, 2, 0, -2, 6, 7, 7, 7, -7, -7, 3]
    assert torch.equal(INT4_LO.round(x), ck_w4a4._round_int4(x.clone()))
    assert torch.equal(INT4_LO.encode(INT4_LO.values()), torch.arange(-7, 8, dtype=torch.int8))


# ---- (5) RTN accuracy --------------------------------------------------------------------------------------------

SQNR_FLOOR_DB = 16.5  # measured 16.93 dB (512 x 1024 N(0, 1), group 256) for float32 and bf16 weights


def test_rtn_sqnr_against_float64_and_kitchens_quantizer():
    """SQNR of the dequantized (un-rotated) weight vs the weight in float64. float32: lrq_ao and kitchen write the
    same bytes, 16.9285 dB both. bf16: kitchen rotates, divides and rounds in bf16 (2779 of 524288 codes differ
    from lrq_ao's float32 RTN), 16.9248 dB vs lrq_ao's 16.9285 dB."""
    w64 = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        w = w64.to(dtype)
        ours = sqnr64(w, FMT.dequantize_original(FMT.quantize(w)))
        qdata, scale = ck_w4a4.quantize_convrot_w4a4_weight(w, 256, 64)
        theirs = sqnr64(w, ck_w4a4.dequantize_convrot_w4a4_weight(qdata, scale, 256, 64))
        print(f"convrot_w4a4 RTN SQNR {dtype}: lrq_ao {ours:.4f} dB, comfy-kitchen {theirs:.4f} dB")
        assert ours >= SQNR_FLOOR_DB
        assert ours == theirs if dtype == torch.float32 else ours >= theirs


# ---- (6) refusals, fallbacks, reader errors --------------------------------------------------------------------------


def test_refusal_names_the_tensor_and_says_what_to_do():
    with pytest.raises(FormatError, match=r"^blocks\.3\.proj\.weight: convrot_w4a4 needs in_features divisible by"):
        FMT.quantize(awkward_weight((8, 320), torch.float32), name="blocks.3.proj.weight")
    assert "ConvRotW4A4Format.fallback" in FMT.refusal((8, 320))
    assert ConvRotW4A4Format(16).refusal((8, 48)) is not None  # 48 % 16 == 0, but 48 % 64 != 0
    assert FMT.refusal((8, 512)) is None and ConvRotW4A4Format(16).refusal((8, 64)) is None


@pytest.mark.parametrize(
    ("group", "k", "expected", "reason"),
    [
        (256, 3072, ConvRotW4A4Format(256), None),
        (256, 320, ConvRotW4A4Format(64), "written as convrot_w4a4 (group 64, INT4 per row), the largest group"),
        (1024, 192, ConvRotW4A4Format(64), "written as convrot_w4a4 (group 64"),
        (256, 96, ConvRotFormat(16), "needs in_features divisible by 64, got 96; written as int8_convrot (group 16)"),
        (64, 100, ScaledFormat(torch.int8, "row"), "got 100; written as int8"),
    ],
)
def test_fallback_is_a_smaller_group_else_int8(group, k, expected, reason):
    fmt = ConvRotW4A4Format(group)
    assert fmt.fallback((4, k)) == expected
    if reason is None:
        assert fmt.fallback_reason((4, k)) is None
        return
    assert reason in fmt.fallback_reason((4, k))
    assert fmt.fallback((4, k)).refusal((4, k)) is None
    assert fmt.fallback() == ScaledFormat(torch.int8, "row")


def _good_tensors() -> dict:
    return FMT.comfy_tensors(FMT.quantize(awkward_weight((8, 256), torch.float32)), (8, 256))


@pytest.mark.parametrize(
    ("edit", "marker", "names"),
    [
        (lambda t: t.pop(".weight_scale"), {}, "L.weight_scale"),
        (lambda t: t.pop(".weight"), {}, "L.weight"),
        (lambda t: t.update({".weight": t[".weight"].view(torch.uint8)}), {}, "L.weight"),
        (lambda t: t.update({".weight": t[".weight"].reshape(-1)}), {}, "L.weight"),
        (lambda t: t.update({".weight": t[".weight"][:, :96]}), {}, "L.weight"),  # K 192: group 256 does not divide
        (lambda t: t.update({".weight_scale": t[".weight_scale"][:4]}), {}, "L.weight_scale"),
        (lambda t: t.update({".weight_scale": torch.ones(())}), {}, "L.weight_scale"),
        (lambda t: t.update({".weight_scale": t[".weight_scale"].to(torch.int32)}), {}, "L.weight_scale"),
        (lambda t: t[".weight_scale"].__setitem__(3, float("nan")), {}, "L.weight_scale"),
        (lambda t: t[".weight_scale"].__setitem__(3, -1.0), {}, "L.weight_scale"),
        (lambda t: None, {"convrot_groupsize": "256"}, "L.comfy_quant"),
        (lambda t: None, {"convrot_groupsize": 128}, "L.weight"),
        (lambda t: None, {"linear_dtype": "fp8"}, "L.comfy_quant"),
    ],
    ids=[
        "no_scale",
        "no_weight",
        "uint8",
        "1d",
        "indivisible",
        "scale_rows",
        "scalar_scale",
        "int_scale",
        "nan_scale",
        "negative_scale",
        "group_type",
        "group_value",
        "linear_dtype",
    ],
)
def test_reader_errors_name_the_tensor(edit, marker, names):
    tensors = _good_tensors()
    edit(tensors)
    with pytest.raises(ComfyFormatError) as err:
        reader_for("convrot_w4a4")({"format": "convrot_w4a4", **marker}, tensors, "L")
    message = str(err.value)
    assert message.startswith(names + ":") and "\n" not in message, message


def test_comfy_tensors_refuses_tensors_of_another_shape():
    qw = FMT.quantize(awkward_weight((8, 256), torch.float32))
    with pytest.raises(FormatError, match="qdata must be int8"):
        FMT.comfy_tensors(qw, (8, 512))


# ---- (7) the learned-rounding grid -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_group", [(70, 64, 16), (33, 320, 64), (17, 1280, 256)], ids=str)
def test_grid_times_effective_scale_is_the_dequantized_weight(shape_group):
    n, k, group = shape_group
    fmt = ConvRotW4A4Format(group)
    qw = fmt.quantize(awkward_weight((n, k), torch.bfloat16, seed=k))
    values = INT4_LO.values()
    idx = torch.searchsorted(values, INT4_LO.decode(fmt.codes(qw)))
    assert torch.equal(values[idx], INT4_LO.decode(fmt.codes(qw)))
    grid = broadcast_blocks(values[idx], fmt.effective_scale(qw.scale, qw.scale2), qw.block_size)
    assert torch.equal(grid, fmt.dequantize(qw))
    moved = fmt.codes(qw).clone()
    moved[0, 0] = -7 if moved[0, 0] != -7 else 7  # any grid code goes through from_codes
    assert torch.equal(fmt.codes(fmt.from_codes(moved, qw)), moved)
