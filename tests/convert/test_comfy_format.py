"""The ComfyUI container: format names, stored scale shapes (written through ``layer_tensors``, read back through
the formats' registered readers), and the exact bytes of the JSON markers and header."""

from __future__ import annotations

import json

import pytest
import torch

from lrq_ao.convert.comfy_format import (
    ComfyFormatError,
    decode_marker,
    encode_marker,
    layer_marker,
    layer_tensors,
    metadata_header,
    parse_dtype_name,
    parse_metadata_header,
)
from lrq_ao.formats import QuantizedWeight, comfy, reader_for
from lrq_ao.primitives import FORMATS, format_spec

SHAPE = (256, 128)  # tiles every block size the markers below use

# What FORMAT.md (from ComfyUI master and convert-to-quant 1.3.4) says each lrq_ao format is stored as:
# (ComfyUI format name, stock ComfyUI loads it, stored scale shape for a (96, 64) weight with block 32).
EXPECTED = {
    "fp8": ("float8_e4m3fn", True, ()),
    "int8": ("int8_tensorwise", True, (96, 1)),
    "int8_tensor": ("int8_tensorwise", True, ()),
    "fp8_row": ("float8_e4m3fn_rowwise", False, (96,)),
    "fp8_block": ("float8_e4m3fn_blockwise", False, (3, 2)),
    "int8_block": ("int8_blockwise", False, (3, 2)),
}


def test_every_lrq_format_has_a_comfy_format():
    assert set(EXPECTED) == set(FORMATS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_format_name_stock_flag_and_scale_shape(name):
    comfy_name, stock, scale_shape = EXPECTED[name]
    fmt = format_spec(name, 32)
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    tensors, marker = layer_tensors("m", fmt, fmt.quantize(w))
    assert marker["format"] == fmt.comfy_name == comfy_name
    assert fmt.stock is stock
    stored = tensors["m.weight_scale"]
    assert tuple(stored.shape) == scale_shape
    assert stored.dtype == torch.float32 and stored.is_contiguous()
    # what a plan lays out before quantizing is exactly what is written
    written = {k[1:]: (t.dtype, tuple(t.shape)) for k, t in tensors.items() if k != "m.comfy_quant"}
    assert fmt.comfy_tensor_specs((96, 64)) == written


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("shape", [(96, 64), (1, 64), (64, 32), (9, 41)])
def test_scale_round_trip_is_exact(name, shape):
    fmt = format_spec(name, 32)
    if fmt.refusal(shape) is not None:
        assert fmt.has_blocks and (shape[0] % 32 or shape[1] % 32)
        with pytest.raises(ValueError, match="cannot tile"):
            fmt.block_size_for(shape)
        return
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    qw = fmt.quantize(w)
    tensors, marker = layer_tensors("m", fmt, qw)
    by_suffix = {k[1:]: t for k, t in tensors.items()}
    fmt_back, qw_back = reader_for(marker["format"])(marker, by_suffix, "m")
    assert torch.equal(qw_back.scale, qw.scale)
    assert qw_back.block_size == qw.block_size
    assert torch.equal(qw_back.qdata.view(torch.uint8), qw.qdata.view(torch.uint8))
    assert fmt_back == fmt


def _read(comfy_name, scale, weight_shape, marker_extra=None, name="m"):
    """Read one layer of ComfyUI format ``comfy_name`` with the given stored scale (zero codes)."""
    dtype = torch.int8 if comfy_name.startswith("int8") else torch.float8_e4m3fn
    tensors = {".weight": torch.zeros(weight_shape, dtype=dtype), ".weight_scale": scale}
    marker = {"format": comfy_name, **(marker_extra or {})}
    return reader_for(comfy_name)(marker, tensors, name)


def test_block_size_inferred_when_marker_lacks_group_size():
    fmt, qw = _read("int8_blockwise", torch.ones(2, 4), (128, 256))
    assert qw.block_size == (64, 64) and fmt.block == 64 and qw.scale.shape == (2, 4)


def test_scalar_scale_also_accepted_as_one_element_vector():
    _, qw = _read("float8_e4m3fn", torch.tensor([0.5]), (8, 16))
    assert qw.block_size == (8, 16) and qw.scale.shape == (1, 1) and qw.scale.item() == 0.5


@pytest.mark.parametrize(
    "comfy_name,scale_shape,group_size,message",
    [
        ("float8_e4m3fn", (64,), None, "does not fit format float8_e4m3fn"),
        ("int8_tensorwise", (64, 2), None, "does not fit format int8_tensorwise"),
        ("float8_e4m3fn_rowwise", (64, 1), None, "does not fit format float8_e4m3fn_rowwise"),
        ("int8_blockwise", (2, 2), 32, "does not match weight"),
        ("float8_e4m3fn_blockwise", (2, 3), None, "not a square tiling"),
    ],
)
def test_misshapen_scale_is_rejected_with_its_name(comfy_name, scale_shape, group_size, message):
    extra = {} if group_size is None else {"group_size": group_size}
    with pytest.raises(ComfyFormatError, match=message) as info:
        _read(comfy_name, torch.ones(scale_shape), (64, 128), extra, name="blk")
    assert "blk.weight_scale" in str(info.value)


def test_integer_scale_is_rejected():
    with pytest.raises(ComfyFormatError, match="not a float scale"):
        _read("float8_e4m3fn", torch.ones((), dtype=torch.int32), (4, 4))


def test_one_dim_int8_row_scale_is_read_as_per_row():
    # Some tools write [out]; stock ComfyUI fails on it in the forward, lrq_ao can still read it.
    fmt, qw = _read("int8_tensorwise", torch.arange(1.0, 5.0), (4, 8))
    assert fmt.name == "int8" and qw.block_size == (1, 8) and torch.equal(qw.scale[:, 0], torch.arange(1.0, 5.0))


# Golden bytes: what ComfyUI's state_dict() and convert-to-quant 1.3.4 write for the same settings
# (json.dumps with default separators; convert-to-quant's key order format, orig_dtype, group_size,
# full_precision_matrix_mult, per_row; orig_dtype spelled "torch.<dtype>").
GOLDEN_MARKERS = [
    ("fp8", {}, b'{"format": "float8_e4m3fn"}'),
    ("fp8", {"orig_dtype": torch.bfloat16}, b'{"format": "float8_e4m3fn", "orig_dtype": "torch.bfloat16"}'),
    (
        "fp8",
        {"full_precision_matrix_mult": True},
        b'{"format": "float8_e4m3fn", "full_precision_matrix_mult": true}',
    ),
    ("int8_tensor", {"orig_dtype": torch.float16}, b'{"format": "int8_tensorwise", "orig_dtype": "torch.float16"}'),
    ("int8", {}, b'{"format": "int8_tensorwise", "per_row": true}'),
    (
        "int8_block",
        {"orig_dtype": torch.bfloat16},
        b'{"format": "int8_blockwise", "orig_dtype": "torch.bfloat16", "group_size": 128}',
    ),
    ("fp8_row", {}, b'{"format": "float8_e4m3fn_rowwise"}'),
    (
        "fp8_block",
        {"orig_dtype": torch.bfloat16, "orig_shape": (256, 128), "full_precision_matrix_mult": True},
        b'{"format": "float8_e4m3fn_blockwise", "orig_dtype": "torch.bfloat16", "orig_shape": [256, 128], '
        b'"group_size": 128, "full_precision_matrix_mult": true}',
    ),
]


@pytest.mark.parametrize("name,kwargs,golden", GOLDEN_MARKERS)
def test_marker_bytes_are_golden(name, kwargs, golden):
    tensor = encode_marker(layer_marker(format_spec(name), SHAPE, **kwargs))
    assert tensor.dtype == torch.uint8 and tensor.dim() == 1
    assert tensor.numpy().tobytes() == golden
    # ComfyUI reads it with json.loads(tensor.numpy().tobytes()).
    assert json.loads(tensor.numpy().tobytes()) == decode_marker(tensor)


# Bytes of .comfy_quant tensors in files convert-to-quant 1.3.4 wrote (``--comfy_quant --simple``; runs with
# ``--full_precision_matrix_mult``, ``--int8 --scaling_mode row``, ``--scaling_mode block --block_size 64``).
REFERENCE_TOOL_MARKERS = [
    (
        "fp8",
        {"orig_dtype": torch.bfloat16, "full_precision_matrix_mult": True},
        b'{"format": "float8_e4m3fn", "orig_dtype": "torch.bfloat16", "full_precision_matrix_mult": true}',
    ),
    (
        "int8",
        {"orig_dtype": torch.bfloat16},
        b'{"format": "int8_tensorwise", "orig_dtype": "torch.bfloat16", "per_row": true}',
    ),
    ("int8_tensor", {"orig_dtype": torch.bfloat16}, b'{"format": "int8_tensorwise", "orig_dtype": "torch.bfloat16"}'),
    ("fp8_row", {"orig_dtype": torch.bfloat16}, b'{"format": "float8_e4m3fn_rowwise", "orig_dtype": "torch.bfloat16"}'),
    (
        "fp8_block",
        {"orig_dtype": torch.bfloat16},
        b'{"format": "float8_e4m3fn_blockwise", "orig_dtype": "torch.bfloat16", "group_size": 64}',
    ),
    (
        "int8_block",
        {"orig_dtype": torch.bfloat16},
        b'{"format": "int8_blockwise", "orig_dtype": "torch.bfloat16", "group_size": 64}',
    ),
]


@pytest.mark.parametrize("name,kwargs,golden", REFERENCE_TOOL_MARKERS)
def test_marker_bytes_match_the_reference_tool(name, kwargs, golden):
    assert encode_marker(layer_marker(format_spec(name, 64), SHAPE, **kwargs)).numpy().tobytes() == golden


def test_header_bytes_are_golden_and_entries_equal_markers():
    markers = {
        "double_blocks.0.img_attn.qkv": layer_marker(format_spec("fp8"), SHAPE, orig_dtype=torch.bfloat16),
        "txt_in": layer_marker(format_spec("int8_block", 64), SHAPE),
    }
    header = metadata_header(markers)
    assert header == (
        '{"format_version": "1.0", "layers": {"double_blocks.0.img_attn.qkv": {"format": "float8_e4m3fn", '
        '"orig_dtype": "torch.bfloat16"}, "txt_in": {"format": "int8_blockwise", "group_size": 64}}}'
    )
    # ComfyUI turns header entries into markers with json.dumps(entry): the same bytes as our per-layer markers.
    for layer, entry in json.loads(header)["layers"].items():
        assert json.dumps(entry).encode() == encode_marker(markers[layer]).numpy().tobytes()
    assert parse_metadata_header(header) == markers


def test_layer_tensors_holds_exactly_the_comfy_keys():
    fmt = format_spec("fp8")
    tensors, marker = layer_tensors("blk.lin", fmt, fmt.quantize(torch.randn(16, 32)), input_scale=1.0)
    assert sorted(tensors) == ["blk.lin.comfy_quant", "blk.lin.input_scale", "blk.lin.weight", "blk.lin.weight_scale"]
    assert tensors["blk.lin.weight"].dtype == torch.float8_e4m3fn
    assert tensors["blk.lin.input_scale"].shape == () and tensors["blk.lin.input_scale"].dtype == torch.float32
    assert marker == {"format": "float8_e4m3fn"}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layer": "blk.lin.weight"}, "without the trailing '.weight'"),
        ({"qdata": torch.zeros(16, 32, dtype=torch.int8)}, "qdata dtype torch.int8 does not match"),
        ({"scale": torch.ones(16, 1)}, "scale grid has shape"),
        ({"input_scale": float("nan")}, "positive finite"),
    ],
)
def test_layer_tensors_rejects_bad_input(kwargs, message):
    fmt = format_spec("fp8")
    qw = fmt.quantize(torch.randn(16, 32))
    args = {"layer": "blk.lin", "qdata": qw.qdata, "scale": qw.scale, **kwargs}
    input_scale = args.pop("input_scale", None)
    bad = QuantizedWeight(args["qdata"], args["scale"], qw.block_size)
    with pytest.raises(ComfyFormatError, match=message):
        layer_tensors(args["layer"], fmt, bad, input_scale=input_scale)


@pytest.mark.parametrize(
    "raw,message",
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"group_size": 128}', "no 'format' key"),
        (b'{"format": 5}', "'format' must be a string"),
        (b'{"format": "int8_blockwise", "group_size": -1}', "group_size"),
        (b'{"format": "int8_blockwise", "group_size": true}', "group_size"),
        (b'{"format": "float8_e4m3fn", "full_precision_matrix_mult": 1}', "full_precision_matrix_mult"),
        (b'{"format": "float8_e4m3fn", "orig_shape": [4]}', "orig_shape"),
        (b'{"format": "float8_e4m3fn", "params": 3}', "params"),
    ],
)
def test_bad_marker_is_rejected_with_its_name(raw, message):
    tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    with pytest.raises(ComfyFormatError, match=message) as info:
        decode_marker(tensor, "blk.comfy_quant")
    assert "blk.comfy_quant" in str(info.value)


def test_marker_must_be_one_dim_uint8():
    with pytest.raises(ComfyFormatError, match="1-D uint8"):
        decode_marker(torch.zeros(2, 3, dtype=torch.uint8), "x.comfy_quant")
    with pytest.raises(ComfyFormatError, match="1-D uint8"):
        decode_marker(torch.zeros(4, dtype=torch.int8), "x.comfy_quant")


def test_nested_params_group_size_is_read():
    raw = b'{"format": "int8_blockwise", "params": {"group_size": 64}}'
    marker = decode_marker(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    assert marker == {"format": "int8_blockwise", "group_size": 64}


def test_convrot_marker_keys_pass_validation():
    # ConvRot markers are int8_tensorwise with two more keys; the int8_tensorwise reader routes them.
    raw = b'{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 16}'
    marker = decode_marker(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    assert marker == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16}


# Every quantization format name ComfyUI core (QUANT_ALGOS) or the ComfyUI-QuantOps node knows (FORMAT.md).
COMFYUI_FORMAT_NAMES = (
    "float8_e4m3fn",
    "float8_e5m2",
    "int8_tensorwise",
    "mxfp8",
    "nvfp4",
    "convrot_w4a4",
    "asym_w4a8_int8",
    "int8_blockwise",
    "float8_e4m3fn_rowwise",
    "float8_e4m3fn_blockwise",
)


def test_unknown_and_unsupported_formats_are_named():
    with pytest.raises(ComfyFormatError, match="layer 'x': unknown quantization format 'int4_magic'"):
        reader_for("int4_magic", "layer 'x'")
    # A name ComfyUI knows is either read by some format file or refused as "not supported", never "unknown".
    for name in COMFYUI_FORMAT_NAMES:
        if name in comfy.READERS:
            continue
        with pytest.raises(ComfyFormatError, match=f"'{name}' is not supported: "):
            reader_for(name)


@pytest.mark.parametrize(
    "text,message",
    [
        ("{", "not valid JSON"),
        ('{"format_version": "1.0"}', "'layers' object"),
        ('{"format_version": "2.0", "layers": {}}', "unsupported format_version"),
        ('{"layers": {"blk.lin.weight": {"format": "float8_e4m3fn"}}}', "ends in '.weight'"),
        ('{"layers": {"blk.lin": {"group_size": 1}}}', "no 'format' key"),
    ],
)
def test_bad_header_is_rejected(text, message):
    with pytest.raises(ComfyFormatError, match=message):
        parse_metadata_header(text, "model.safetensors: header")


def test_writer_refuses_header_names_ending_in_weight():
    with pytest.raises(ComfyFormatError, match="ends in '.weight'"):
        metadata_header({"blk.lin.weight": {"format": "float8_e4m3fn"}})


def test_dtype_names_round_trip():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert parse_dtype_name(str(dtype)) == dtype
    assert parse_dtype_name("bfloat16") == torch.bfloat16
    for bad in ("torch.int8", "torch.nonsense", 3, "__class__"):
        with pytest.raises(ComfyFormatError, match="orig_dtype"):
            parse_dtype_name(bad, "layer 'x'")
