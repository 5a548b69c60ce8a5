"""ComfyUI format mapping: names, stored scale shapes, and the exact bytes of the JSON markers and header."""

from __future__ import annotations

import json

import pytest
import torch

from lrq_ao.convert.comfy_format import (
    COMFY_FORMATS,
    ComfyFormatError,
    comfy_format_for,
    decode_marker,
    encode_marker,
    get_comfy_format,
    is_stock,
    layer_tensors,
    make_marker,
    metadata_header,
    parse_dtype_name,
    parse_metadata_header,
    scale_from_comfy,
    scale_to_comfy,
)
from lrq_ao.primitives import FORMATS, format_spec, quantize_rtn

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
    spec = format_spec(name, 32)
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    _, scale, _ = quantize_rtn(w, spec)
    assert comfy_format_for(spec).name == comfy_name
    assert is_stock(spec) is stock
    stored = scale_to_comfy(scale, spec, w.shape)
    assert tuple(stored.shape) == scale_shape
    assert stored.dtype == torch.float32 and stored.is_contiguous()


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("shape", [(96, 64), (1, 64), (64, 32), (9, 41)])
def test_scale_round_trip_is_exact(name, shape):
    spec = format_spec(name, 32)
    if spec.granularity == "block" and (shape[0] % 32 or shape[1] % 32):
        with pytest.raises(ValueError, match="cannot tile"):
            spec.block_size_for(shape)
        return
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    qdata, scale, block_size = quantize_rtn(w, spec)
    _, marker = layer_tensors("m", qdata, scale, spec)
    stored = scale_to_comfy(scale, spec, shape)
    spec_back, grid, block_back = scale_from_comfy(
        stored, COMFY_FORMATS[marker["format"]], shape, marker.get("group_size")
    )
    assert torch.equal(grid, scale)
    assert block_back == block_size
    assert (spec_back.qdtype, spec_back.granularity) == (spec.qdtype, spec.granularity)


def test_block_size_inferred_when_marker_lacks_group_size():
    fmt = COMFY_FORMATS["int8_blockwise"]
    spec, grid, block_size = scale_from_comfy(torch.ones(2, 4), fmt, (128, 256), None)
    assert block_size == (64, 64) and spec.block == 64 and grid.shape == (2, 4)


def test_scalar_scale_also_accepted_as_one_element_vector():
    fmt = COMFY_FORMATS["float8_e4m3fn"]
    _, grid, block_size = scale_from_comfy(torch.tensor([0.5]), fmt, (8, 16))
    assert block_size == (8, 16) and grid.shape == (1, 1) and grid.item() == 0.5


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
    with pytest.raises(ComfyFormatError, match=message) as info:
        scale_from_comfy(torch.ones(scale_shape), COMFY_FORMATS[comfy_name], (64, 128), group_size, "blk.weight_scale")
    assert "blk.weight_scale" in str(info.value)


def test_integer_scale_is_rejected():
    with pytest.raises(ComfyFormatError, match="not a float scale"):
        scale_from_comfy(torch.ones((), dtype=torch.int32), COMFY_FORMATS["float8_e4m3fn"], (4, 4))


def test_one_dim_int8_row_scale_is_read_as_per_row():
    # Some tools write [out]; stock ComfyUI fails on it in the forward, lrq_ao can still read it.
    spec, grid, block_size = scale_from_comfy(torch.arange(1.0, 5.0), COMFY_FORMATS["int8_tensorwise"], (4, 8))
    assert spec.granularity == "row" and block_size == (1, 8) and torch.equal(grid[:, 0], torch.arange(1.0, 5.0))


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
    tensor = encode_marker(make_marker(format_spec(name), **kwargs))
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
    assert encode_marker(make_marker(format_spec(name, 64), **kwargs)).numpy().tobytes() == golden


def test_header_bytes_are_golden_and_entries_equal_markers():
    markers = {
        "double_blocks.0.img_attn.qkv": make_marker(format_spec("fp8"), orig_dtype=torch.bfloat16),
        "txt_in": make_marker(format_spec("int8_block", 64)),
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
    spec = format_spec("fp8")
    qdata, scale, _ = quantize_rtn(torch.randn(16, 32), spec)
    tensors, marker = layer_tensors("blk.lin", qdata, scale, spec, input_scale=1.0)
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
    spec = format_spec("fp8")
    qdata, scale, _ = quantize_rtn(torch.randn(16, 32), spec)
    args = {"layer": "blk.lin", "qdata": qdata, "scale": scale, **kwargs}
    input_scale = args.pop("input_scale", None)
    with pytest.raises(ComfyFormatError, match=message):
        layer_tensors(args["layer"], args["qdata"], args["scale"], spec, input_scale=input_scale)


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
        (b'{"format": "int8_tensorwise", "convrot": true}', "ConvRot"),
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


def test_unknown_and_unsupported_formats_are_named():
    with pytest.raises(ComfyFormatError, match="unknown quantization format 'int4_magic'"):
        get_comfy_format("int4_magic", "layer 'x'")
    with pytest.raises(ComfyFormatError, match="'nvfp4' is not supported"):
        get_comfy_format("nvfp4")


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
