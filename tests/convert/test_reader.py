"""Reading ComfyUI checkpoints: our files, reference-tool layouts, legacy scaled_fp8, and every malformed case."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lrq_ao.convert.comfy_format import ComfyFormatError, layer_tensors, metadata_header
from lrq_ao.convert.reader import load_comfy, load_comfy_into, read_comfy
from lrq_ao.formats import QuantizedWeight
from lrq_ao.primitives import dequantize, format_spec, quantize_rtn, sqnr

ALL_FORMATS = ["fp8", "fp8_row", "fp8_block", "int8", "int8_tensor", "int8_block"]


def _weight(shape=(64, 96), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ours(path, formats=ALL_FORMATS, header=True, block=32):
    """A file as lrq_ao's writer lays it out: one layer per format, a bias, a norm, and the optional header."""
    tensors, markers, expected = {}, {}, {}
    for i, name in enumerate(formats):
        spec = format_spec(name, block)
        qdata, scale, block_size = quantize_rtn(_weight(seed=i), spec)
        layer_sd, markers[f"blocks.{i}.lin"] = layer_tensors(
            f"blocks.{i}.lin", spec, QuantizedWeight(qdata, scale, block_size)
        )
        tensors.update(layer_sd)
        tensors[f"blocks.{i}.lin.bias"] = torch.randn(64)
        expected[f"blocks.{i}.lin"] = (qdata, scale, block_size)
    tensors["norm.weight"] = torch.ones(96, dtype=torch.bfloat16)
    save_file(tensors, str(path), metadata={"_quantization_metadata": metadata_header(markers)} if header else None)
    return expected


def _marker(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


@pytest.mark.parametrize("header", [True, False])
def test_our_files_read_back_exactly(tmp_path, header):
    path = tmp_path / "ours.safetensors"
    expected = _ours(path, header=header)
    ckpt = read_comfy(path)
    assert set(ckpt.layers) == set(expected)
    assert sorted(ckpt.plain_keys()) == sorted([f"{n}.bias" for n in expected] + ["norm.weight"])
    assert ckpt.formats()["blocks.0.lin"] == "float8_e4m3fn" and ckpt.formats()["blocks.5.lin"] == "int8_blockwise"
    for name, (qdata, scale, block_size) in expected.items():
        layer = ckpt.load_layer(name)
        assert torch.equal(layer.qdata.view(torch.uint8), qdata.view(torch.uint8))
        assert torch.equal(layer.scale, scale) and layer.block_size == block_size
        assert torch.equal(layer.dequantize(torch.bfloat16), dequantize(qdata, scale, block_size, torch.bfloat16))
    assert "blocks.3.lin" in ckpt.describe() and "6 quantized layers" in ckpt.describe()


def test_header_only_file_is_read(tmp_path):
    """ComfyUI builds markers from the header; a file holding only the header must read the same."""
    path = tmp_path / "ours.safetensors"
    expected = _ours(path, formats=["int8_block", "fp8"])
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".comfy_quant")}
    markers = {
        "blocks.0.lin": {"format": "int8_blockwise", "group_size": 32},
        "blocks.1.lin": {"format": "float8_e4m3fn"},
    }
    save_file(tensors, str(path), metadata={"_quantization_metadata": metadata_header(markers)})
    ckpt = read_comfy(path)
    assert {n: layer.source for n, layer in ckpt.layers.items()} == {"blocks.0.lin": "header", "blocks.1.lin": "header"}
    assert torch.equal(ckpt.layers["blocks.0.lin"].scale, expected["blocks.0.lin"][1])


def _reference_tool_file(path):
    """Tensors laid out exactly as convert-to-quant 1.3.4 writes them (fp8_conversion.py, comfy_quant.py)."""
    t = {}
    w = _weight((64, 128))
    # float8_e4m3fn, per-tensor: scalar scale, orig_dtype "torch.bfloat16", input_scale for text encoders.
    q, s, _ = quantize_rtn(w, format_spec("fp8"))
    t |= {"te.q.weight": q, "te.q.weight_scale": s.reshape(()), "te.q.input_scale": s.reshape(()).clone()}
    t["te.q.comfy_quant"] = _marker({"format": "float8_e4m3fn", "orig_dtype": "torch.bfloat16"})
    # float8_e4m3fn_rowwise: 1-D [out] scale.
    q, s, _ = quantize_rtn(w, format_spec("fp8_row"))
    t |= {"a.weight": q, "a.weight_scale": s.reshape(64), "a.comfy_quant": _marker({"format": "float8_e4m3fn_rowwise"})}
    # float8_e4m3fn_blockwise with group_size.
    q, s, _ = quantize_rtn(w, format_spec("fp8_block", 64))
    t |= {"b.weight": q, "b.weight_scale": s}
    t["b.comfy_quant"] = _marker({"format": "float8_e4m3fn_blockwise", "orig_dtype": "torch.float16", "group_size": 64})
    # int8_tensorwise per-row: [out, 1] scale and per_row flag.
    q, s, _ = quantize_rtn(w, format_spec("int8"))
    t |= {"c.weight": q, "c.weight_scale": s, "c.comfy_quant": _marker({"format": "int8_tensorwise", "per_row": True})}
    # int8_blockwise: grid scale, group_size and a unit input_scale.
    q, s, _ = quantize_rtn(w, format_spec("int8_block", 32))
    t |= {"d.weight": q, "d.weight_scale": s, "d.input_scale": torch.tensor(1.0)}
    t["d.comfy_quant"] = _marker({"format": "int8_blockwise", "orig_dtype": "torch.bfloat16", "group_size": 32})
    # The header's entries omit per_row (convert-to-quant builds them separately from the markers).
    header = {
        "te.q": {"format": "float8_e4m3fn", "orig_dtype": "torch.bfloat16"},
        "c": {"format": "int8_tensorwise", "orig_dtype": "torch.bfloat16"},
        "d": {"format": "int8_blockwise", "orig_dtype": "torch.bfloat16", "group_size": 32},
    }
    save_file(
        t, str(path), metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": header})}
    )
    return w


def test_reference_tool_layouts_are_read(tmp_path):
    path = tmp_path / "ref.safetensors"
    w = _reference_tool_file(path)
    ckpt = read_comfy(path)
    assert ckpt.formats() == {
        "te.q": "float8_e4m3fn",
        "a": "float8_e4m3fn_rowwise",
        "b": "float8_e4m3fn_blockwise",
        "c": "int8_tensorwise",
        "d": "int8_blockwise",
    }
    assert ckpt.plain_keys() == []
    expected_blocks = {"te.q": (64, 128), "a": (1, 128), "b": (64, 64), "c": (1, 128), "d": (32, 32)}
    assert {n: layer.block_size for n, layer in ckpt.layers.items()} == expected_blocks
    assert ckpt.layers["te.q"].orig_dtype == torch.bfloat16 and ckpt.layers["b"].orig_dtype == torch.float16
    assert ckpt.layers["te.q"].input_scale is not None and ckpt.layers["d"].input_scale.item() == 1.0
    for name in ckpt.layers:
        layer = ckpt.load_layer(name)
        assert layer.dequantize().shape == (64, 128)
        assert (layer.dequantize() - w).abs().max() < 0.1 * w.abs().max()


def test_legacy_scaled_fp8_file_is_migrated(tmp_path):
    path = tmp_path / "legacy.safetensors"
    q, s, _ = quantize_rtn(_weight(), format_spec("fp8"))
    tensors = {
        "model.diffusion_model.scaled_fp8": torch.empty(2, dtype=torch.float8_e4m3fn),
        "model.diffusion_model.x.weight": q,
        "model.diffusion_model.x.scale_weight": s.reshape(1),
        "model.diffusion_model.x.scale_input": torch.tensor([1.0]),
        "model.diffusion_model.y.weight": q.clone(),
        "model.diffusion_model.y.scale_weight": s.reshape(()).clone(),
        "model.diffusion_model.y.scale_input": torch.tensor(0.25),
        "model.diffusion_model.y.bias": torch.zeros(64),
    }
    save_file(tensors, str(path))
    ckpt = read_comfy(path)
    assert ckpt.formats() == {"model.diffusion_model.x": "float8_e4m3fn", "model.diffusion_model.y": "float8_e4m3fn"}
    x, y = ckpt.layers["model.diffusion_model.x"], ckpt.layers["model.diffusion_model.y"]
    assert x.source == "legacy" and x.full_precision_matrix_mult  # a 2-element scaled_fp8 means full-precision matmul
    assert x.input_scale is None and y.input_scale.item() == 0.25  # ComfyUI drops a unit input scale
    assert torch.equal(ckpt.load_layer("model.diffusion_model.x").dequantize(), dequantize(q, s, (64, 96)))
    assert ckpt.plain_keys() == ["model.diffusion_model.y.bias"]


# ---------------------------------------------------------------------------------------------------------------
# Malformed files: each case is rejected with ComfyFormatError naming the file and the tensor.
# ---------------------------------------------------------------------------------------------------------------


def _one_layer(fmt="fp8"):
    spec = format_spec(fmt, 32)
    tensors, _ = layer_tensors("blk.lin", spec, spec.quantize(_weight()))
    return tensors


def _expect_error(path, *needles):
    with pytest.raises(ComfyFormatError) as info:
        read_comfy(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    return message


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, this is text")
    _expect_error(path, "not a safetensors file")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    _expect_error(tmp_path / "tiny.safetensors", "not a safetensors file")
    _expect_error(tmp_path / "missing.safetensors", "cannot read file")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(_one_layer(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    _expect_error(path, "truncated", "blk.lin.weight")
    path.write_bytes(data[:20])
    _expect_error(path, "truncated")


def _raw_file(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_invalid_safetensors_header_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    _raw_file(path, b'{"blk.lin.weight": {"dtype": "F8_E4M3", ')
    _expect_error(path, "header is not valid JSON")


def test_invalid_quantization_metadata_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file(_one_layer(), str(path), metadata={"_quantization_metadata": '{"layers": {"blk.lin": '})
    _expect_error(path, "_quantization_metadata", "not valid JSON")


def test_invalid_marker_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    tensors = _one_layer()
    tensors["blk.lin.comfy_quant"] = torch.tensor(list(b'{"format": float8}'), dtype=torch.uint8)
    save_file(tensors, str(path))
    _expect_error(path, "blk.lin.comfy_quant", "not valid UTF-8 JSON")


@pytest.mark.parametrize(
    "fmt,stored",
    [
        ("fp8", lambda q: q.view(torch.uint8)),  # FP8 saved as raw bytes: ComfyUI would value-cast it into garbage
        ("fp8", lambda q: q.to(torch.bfloat16)),
        ("int8", lambda q: q.to(torch.float8_e4m3fn)),
        ("int8_block", lambda q: q.view(torch.uint8)),
    ],
)
def test_wrong_dtype_for_format(tmp_path, fmt, stored):
    path = tmp_path / "bad.safetensors"
    tensors = _one_layer(fmt)
    tensors["blk.lin.weight"] = stored(tensors["blk.lin.weight"])
    save_file(tensors, str(path))
    _expect_error(path, "'blk.lin.weight'", "is wrong for format")


def test_missing_scale(tmp_path):
    path = tmp_path / "bad.safetensors"
    tensors = _one_layer("int8")
    del tensors["blk.lin.weight_scale"]
    save_file(tensors, str(path))
    _expect_error(path, "'blk.lin.weight_scale'", "missing")


def test_missing_weight(tmp_path):
    path = tmp_path / "bad.safetensors"
    tensors = _one_layer("int8")
    del tensors["blk.lin.weight"]
    save_file(tensors, str(path))
    _expect_error(path, "'blk.lin.weight'", "missing")


@pytest.mark.parametrize(
    "fmt,scale",
    [
        ("fp8", torch.ones(64)),
        ("int8", torch.ones(1, 96)),
        ("int8_block", torch.ones(2, 2)),
        ("fp8_row", torch.ones(3)),
    ],
)
def test_misshapen_scale(tmp_path, fmt, scale):
    path = tmp_path / "bad.safetensors"
    tensors = _one_layer(fmt)
    tensors["blk.lin.weight_scale"] = scale
    save_file(tensors, str(path))
    _expect_error(path, "'blk.lin.weight_scale'", "scale shape")


def test_one_dim_int8_row_scale_is_read_with_a_warning(tmp_path):
    path = tmp_path / "odd.safetensors"
    tensors = _one_layer("int8")
    qdata, scale = tensors["blk.lin.weight"], tensors["blk.lin.weight_scale"]
    tensors["blk.lin.weight_scale"] = scale.reshape(-1)
    save_file(tensors, str(path))
    with pytest.warns(UserWarning, match=r"'blk.lin.weight_scale': 1-D per-row int8 scale"):
        layer = read_comfy(path).load_layer("blk.lin")
    assert layer.block_size == (1, 96)
    assert torch.equal(layer.dequantize(), dequantize(qdata, scale, (1, 96)))


def test_nonfinite_scale(tmp_path):
    path = tmp_path / "bad.safetensors"
    tensors = _one_layer("int8")
    tensors["blk.lin.weight_scale"][3] = float("nan")
    save_file(tensors, str(path))
    _expect_error(path, "'blk.lin.weight_scale'", "finite")


@pytest.mark.parametrize("name", ["int4_magic", "float8_e5m2"])
def test_unknown_format(tmp_path, name):
    path = tmp_path / "bad.safetensors"
    tensors = _one_layer()
    tensors["blk.lin.comfy_quant"] = _marker({"format": name})
    save_file(tensors, str(path))
    _expect_error(path, "'blk.lin'", repr(name))


def test_header_layer_names_ending_in_weight(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = json.dumps({"format_version": "1.0", "layers": {"blk.lin.weight": {"format": "float8_e4m3fn"}}})
    save_file(_one_layer(), str(path), metadata={"_quantization_metadata": header})
    _expect_error(path, "'blk.lin.weight'", "ends in '.weight'")


def test_header_disagreeing_with_marker(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = metadata_header({"blk.lin": {"format": "int8_tensorwise"}})
    save_file(_one_layer("fp8"), str(path), metadata={"_quantization_metadata": header})
    _expect_error(path, "'blk.lin'", "int8_tensorwise", "float8_e4m3fn")


def test_scale_without_marker(tmp_path):
    path = tmp_path / "bad.safetensors"
    tensors = _one_layer()
    del tensors["blk.lin.comfy_quant"]
    save_file(tensors, str(path))
    _expect_error(path, "'blk.lin.weight_scale'", "no quantization marker")


def test_orig_shape_mismatch(tmp_path):
    path = tmp_path / "bad.safetensors"
    tensors = _one_layer()
    tensors["blk.lin.comfy_quant"] = _marker({"format": "float8_e4m3fn", "orig_shape": [96, 64]})
    save_file(tensors, str(path))
    _expect_error(path, "'blk.lin'", "orig_shape")


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: arbitrary headers, metadata and markers give either a checkpoint or a ComfyFormatError, nothing else.
# ---------------------------------------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
format_names = st.sampled_from(
    ["float8_e4m3fn", "int8_tensorwise", "int8_blockwise", "float8_e4m3fn_rowwise", "float8_e4m3fn_blockwise", "nvfp4"]
)
markers = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"format": format_names | json_values},
        optional={
            "group_size": st.integers(-2, 200) | json_values,
            "orig_dtype": st.sampled_from(["torch.bfloat16", "float16", "torch.int8", "x"]) | json_values,
            "orig_shape": st.lists(st.integers(-1, 200), max_size=3) | json_values,
            "full_precision_matrix_mult": json_values,
            "params": json_values,
        },
    ),
)
dtype_names = st.sampled_from(["F8_E4M3", "I8", "U8", "F32", "BF16", "F8_E5M2", "F4", "I64"]) | json_values
entries = st.fixed_dictionaries(
    {"dtype": dtype_names, "shape": st.lists(st.integers(-1, 70), max_size=3) | json_values},
    optional={"data_offsets": st.lists(st.integers(-5, 20000), min_size=0, max_size=3) | json_values},
)
keys = st.sampled_from(
    ["blk.lin.weight", "blk.lin.weight_scale", "blk.lin.comfy_quant", "blk.lin.input_scale", "scaled_fp8", "x.bias"]
)


quant_metadata = st.builds(
    lambda layers, version: json.dumps({"format_version": version, "layers": layers}),
    st.dictionaries(st.sampled_from(["blk.lin", "blk.lin.weight", "other"]), markers, max_size=2) | json_values,
    st.sampled_from(["1.0", "1.1", "2.0"]) | json_values,
)
file_metadata = st.one_of(
    st.fixed_dictionaries({"_quantization_metadata": quant_metadata | st.text(max_size=12)}),
    json_values,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.dictionaries(keys, entries, max_size=4) | json_values,
    metadata=file_metadata,
    data=st.binary(max_size=64),
    tail=st.integers(0, 12000),
)
def test_fuzzed_headers_and_metadata_only_raise_comfy_format_error(tmp_path, header, metadata, data, tail):
    if isinstance(header, dict):
        header = {**header, "__metadata__": metadata}
    path = tmp_path / "fuzz.safetensors"
    _raw_file(path, json.dumps(header).encode(), data + bytes(tail))
    try:
        read_comfy(path)
    except ComfyFormatError as exc:
        assert str(path) in str(exc)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(marker=markers, scale_shape=st.lists(st.integers(0, 70), max_size=3), fmt=st.sampled_from(ALL_FORMATS))
def test_fuzzed_markers_and_scales_in_valid_files_only_raise_comfy_format_error(tmp_path, marker, scale_shape, fmt):
    path = tmp_path / "fuzz.safetensors"
    tensors = _one_layer(fmt)
    tensors["blk.lin.comfy_quant"] = torch.tensor(list(json.dumps(marker).encode()), dtype=torch.uint8)
    if scale_shape:
        tensors["blk.lin.weight_scale"] = torch.ones(scale_shape)
    save_file(tensors, str(path))
    try:
        read_comfy(path)
    except ComfyFormatError as exc:
        assert str(path) in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10_000), flip=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_fuzzed_bytes_of_a_valid_file_only_raise_comfy_format_error(tmp_path, cut, flip, byte):
    path = tmp_path / "fuzz.safetensors"
    save_file(_one_layer("int8_block"), str(path))
    data = bytearray(path.read_bytes())
    data[flip % len(data)] = byte
    path.write_bytes(bytes(data[: len(data) - cut % len(data)]))
    try:
        read_comfy(path)
    except ComfyFormatError as exc:
        assert str(path) in str(exc)


# ---------------------------------------------------------------------------------------------------------------
# load_comfy / load_comfy_into: lrq_ao tensors and a meta-device model filled from a ComfyUI file
# ---------------------------------------------------------------------------------------------------------------


class TinyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Linear(96, 64)
        self.proj_out = torch.nn.Linear(64, 32, bias=False)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(self.proj_out(torch.nn.functional.gelu(self.proj_in(x))))


def _block_file(path, prefix="", formats=("int8", "fp8"), header=True):
    """A ComfyUI file for TinyBlock; returns a float reference block holding the dequantized weights."""
    reference = TinyBlock().requires_grad_(False)
    tensors, markers = {}, {}
    for layer, fmt in zip(("proj_in", "proj_out"), formats):
        linear = getattr(reference, layer)
        spec = format_spec(fmt, 32)
        qdata, scale, block_size = quantize_rtn(linear.weight, spec)
        qw = QuantizedWeight(qdata, scale, block_size)
        layer_sd, markers[prefix + layer] = layer_tensors(prefix + layer, spec, qw, orig_dtype=torch.float32)
        tensors.update(layer_sd)
        linear.weight.copy_(dequantize(qdata, scale, block_size))
    for key in ("proj_in.bias", "norm.weight", "norm.bias"):
        tensors[prefix + key] = reference.state_dict()[key].clone()
    save_file(tensors, str(path), metadata={"_quantization_metadata": metadata_header(markers)} if header else None)
    return reference


def test_load_comfy_returns_lrq_ao_tensors(tmp_path):
    from lrq_ao.layouts import Float8Tensor, Int8Tensor

    path = tmp_path / "ours.safetensors"
    expected = _ours(path)
    state = load_comfy(path)
    assert sorted(state) == sorted(
        [f"{n}.weight" for n in expected] + [f"{n}.bias" for n in expected] + ["norm.weight"]
    )
    for name, (qdata, scale, block_size) in expected.items():
        weight = state[f"{name}.weight"]
        assert isinstance(weight, Float8Tensor if qdata.dtype == torch.float8_e4m3fn else Int8Tensor)
        assert weight.dtype == torch.bfloat16 and weight.block_size == block_size  # no orig_dtype: bfloat16
        assert torch.equal(weight.dequantize(torch.float32), dequantize(qdata, scale, block_size))
    assert state["norm.weight"].dtype == torch.bfloat16
    as_half = load_comfy(path, dtype=torch.float16)
    assert as_half["blocks.0.lin.weight"].dtype == torch.float16 and as_half["norm.weight"].dtype == torch.float16


def test_load_comfy_uses_the_markers_orig_dtype(tmp_path):
    path = tmp_path / "ref.safetensors"
    _reference_tool_file(path)
    state = load_comfy(path)
    assert state["te.q.weight"].dtype == torch.bfloat16 and state["b.weight"].dtype == torch.float16
    assert "te.q.input_scale" not in state and "d.weight_scale" not in state and "d.comfy_quant" not in state


@pytest.mark.parametrize("formats", [("int8", "fp8"), ("int8_block", "fp8_block"), ("int8_tensor", "fp8_row")])
def test_load_comfy_into_fills_a_meta_model(tmp_path, formats):
    path = tmp_path / "block.safetensors"
    reference = _block_file(path, formats=formats)
    with torch.device("meta"):
        model = TinyBlock()
    result = load_comfy_into(model, path)
    assert result.quantized == ["proj_in.weight", "proj_out.weight"]
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not any(t.is_meta for t in model.state_dict().values())
    assert type(model.proj_in.weight).__name__ in ("Int8Tensor", "Float8Tensor")
    assert not model.proj_in.weight.requires_grad
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert sqnr(reference(x), model(x)) > 80.0  # weight-only: the same weights, only op order differs


def test_load_comfy_into_strips_a_prefix_and_reads_legacy_files(tmp_path):
    path = tmp_path / "legacy.safetensors"
    reference = TinyBlock().requires_grad_(False)
    prefix = "model.diffusion_model."
    tensors = {prefix + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "cond.weight": torch.ones(3)}
    for layer in ("proj_in", "proj_out"):
        linear = getattr(reference, layer)
        qdata, scale, block_size = quantize_rtn(linear.weight, format_spec("fp8"))
        tensors[f"{prefix}{layer}.weight"] = qdata
        tensors[f"{prefix}{layer}.scale_weight"] = scale.reshape(())
        linear.weight.copy_(dequantize(qdata, scale, block_size))
    for key in ("proj_in.bias", "norm.weight", "norm.bias"):
        tensors[prefix + key] = reference.state_dict()[key].clone()
    save_file(tensors, str(path))
    with torch.device("meta"):
        model = TinyBlock()
    result = load_comfy_into(model, path, prefix=prefix, dtype=torch.float32)
    assert result.ignored_keys == ["cond.weight"]
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert sqnr(reference(x), model(x)) > 80.0


def test_load_comfy_into_casts_plain_tensors_to_the_requested_dtype(tmp_path):
    path = tmp_path / "block.safetensors"
    _block_file(path)
    with torch.device("meta"):
        model = TinyBlock()
    load_comfy_into(model, path, dtype=torch.bfloat16)
    assert model.proj_in.weight.dtype == torch.bfloat16 and model.norm.weight.dtype == torch.bfloat16
    assert model.proj_in.bias.dtype == torch.bfloat16
    with torch.device("meta"):
        model = TinyBlock()
    load_comfy_into(model, path)  # no dtype: plain tensors as stored, quantized ones report the marker's orig_dtype
    assert model.norm.weight.dtype == torch.float32 and model.proj_out.weight.dtype == torch.float32


def test_load_comfy_into_reports_key_mismatches(tmp_path):
    path = tmp_path / "block.safetensors"
    _block_file(path)

    class Bigger(TinyBlock):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(4, 4)
            del self.norm

    with torch.device("meta"):
        model = Bigger()
    with pytest.raises(ComfyFormatError, match=r"2 missing key\(s\).*extra.bias.*2 unexpected key\(s\).*norm.bias"):
        load_comfy_into(model, path)
    assert model.proj_in.weight.is_meta  # a failed strict load leaves the model untouched
    with torch.device("meta"):
        model = Bigger()
    result = load_comfy_into(model, path, strict=False)
    assert result.missing_keys == ["extra.bias", "extra.weight"]
    assert result.unexpected_keys == ["norm.bias", "norm.weight"]
    assert result.quantized == ["proj_in.weight", "proj_out.weight"]


def test_load_comfy_into_rejects_shape_mismatch(tmp_path):
    path = tmp_path / "block.safetensors"
    _block_file(path)
    model = TinyBlock()
    model.proj_out = torch.nn.Linear(64, 16, bias=False)
    model.norm = torch.nn.LayerNorm(16)
    with pytest.raises(
        ComfyFormatError, match=r"'proj_out.weight' has shape \[32, 64\] but the model expects \[16, 64\]"
    ):
        load_comfy_into(model, path)
    assert not any(type(p).__name__.endswith("8Tensor") for p in model.parameters())  # nothing was changed


def test_load_comfy_into_with_a_wrong_prefix_names_the_prefix(tmp_path):
    path = tmp_path / "block.safetensors"
    _block_file(path, prefix="model.diffusion_model.")
    with torch.device("meta"):
        model = TinyBlock()
    with pytest.raises(ComfyFormatError, match="check `prefix`"):
        load_comfy_into(model, path)


@pytest.mark.slow
def test_loaded_model_runs_under_torch_compile_fullgraph(tmp_path):
    """The point of reading ComfyUI files back: run them with lrq_ao's tensors under torch.compile."""
    path = tmp_path / "block.safetensors"
    reference = _block_file(path, formats=("int8", "fp8"))
    with torch.device("meta"):
        model = TinyBlock()
    load_comfy_into(model, path)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert sqnr(reference(x), compiled(x)) > 80.0
