"""Conformance with ComfyUI: files lrq_ao writes load through comfy-kitchen's own layout classes exactly as ComfyUI
loads them (comfy/ops.py and comfy/utils.py on ComfyUI master), and dequantize to exactly lrq_ao's weights.

The ComfyUI steps re-enacted here, each from ComfyUI master:
1. ``load_torch_file`` reads the tensors and the safetensors metadata;
2. ``convert_old_quants`` turns the ``_quantization_metadata`` header into per-layer ``.comfy_quant`` tensors
   with ``json.dumps(entry)``;
3. ``detect_layer_quantization`` switches to mixed-precision ops when a key ends in ``.comfy_quant``;
4. ``_load_from_state_dict`` parses ``json.loads(marker.numpy().tobytes())``, looks the format up in
   ``QUANT_ALGOS``, casts the weight to the format's storage dtype and wraps it as
   ``QuantizedTensor(weight, layout, Params(scale=weight_scale, orig_dtype=compute_dtype, orig_shape=(out, in)))``.
"""

from __future__ import annotations

import json

import comfy_kitchen.tensor as ck_tensor  # a test dependency (pyproject's "test" extra)
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lrq_ao.convert.comfy_format import layer_tensors, metadata_header
from lrq_ao.convert.reader import read_comfy
from lrq_ao.formats import QuantizedWeight
from lrq_ao.primitives import dequantize, expand_scale, format_spec, quantize_rtn, sqnr

# ComfyUI master QUANT_ALGOS for the stock 8-bit formats: storage dtype and comfy-kitchen layout class.
# (ComfyUI registers its own TensorCoreFP8E4M3Layout, a subclass of comfy-kitchen's TensorCoreFP8Layout that only
# changes quantize(); dequantize() is comfy-kitchen's.)
COMFYUI_QUANT_ALGOS = {
    "float8_e4m3fn": (torch.float8_e4m3fn, "TensorCoreFP8Layout"),
    "int8_tensorwise": (torch.int8, "TensorWiseINT8Layout"),
}
STOCK = ["fp8", "int8", "int8_tensor"]
SHAPES = [(64, 96), (9, 41), (1, 128)]


def _write(path, names, shape, header):
    tensors, markers, expected = {}, {}, {}
    for i, name in enumerate(names):
        spec = format_spec(name)
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(i)) * (i + 1)
        qdata, scale, block_size = quantize_rtn(w, spec)
        layer = f"blocks.{i}.proj"
        layer_sd, markers[layer] = layer_tensors(layer, spec, QuantizedWeight(qdata, scale, block_size))
        tensors.update(layer_sd)
        expected[layer] = (w, qdata, scale, block_size)
    save_file(tensors, str(path), metadata={"_quantization_metadata": metadata_header(markers)} if header else None)
    return expected


def _comfyui_load(path, compute_dtype):
    """Steps 1-4 above; returns ``{layer: QuantizedTensor}``."""
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in list(f.keys())}
        metadata = f.metadata() or {}
    if "_quantization_metadata" in metadata:
        for layer, entry in json.loads(metadata["_quantization_metadata"])["layers"].items():
            state[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(entry).encode("utf-8")), dtype=torch.uint8)
    assert any(k.endswith(".comfy_quant") for k in state), "ComfyUI would not switch to mixed-precision ops"
    loaded = {}
    for key in [k for k in state if k.endswith(".comfy_quant")]:
        layer = key[: -len(".comfy_quant")]
        conf = json.loads(state[key].numpy().tobytes())
        storage, layout = COMFYUI_QUANT_ALGOS[conf["format"]]
        weight = state[f"{layer}.weight"]
        # ComfyUI value-casts the weight to the storage dtype; a file must already hold that dtype.
        assert weight.dtype == storage
        scale = state[f"{layer}.weight_scale"]
        params = ck_tensor.get_layout_class(layout).Params(
            scale=scale, orig_dtype=compute_dtype, orig_shape=tuple(weight.shape)
        )
        loaded[layer] = ck_tensor.QuantizedTensor(weight.to(storage), layout, params)
    return loaded


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("header", [True, False])
def test_stock_formats_dequantize_exactly_through_comfy_kitchen(tmp_path, shape, header):
    path = tmp_path / "model.safetensors"
    expected = _write(path, STOCK, shape, header)
    loaded = _comfyui_load(path, torch.float32)
    assert set(loaded) == set(expected)
    for layer, (_, qdata, scale, block_size) in expected.items():
        assert torch.equal(loaded[layer].dequantize(), dequantize(qdata, scale, block_size, torch.float32)), layer


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_int8_dequantizes_exactly_in_half_precision(tmp_path, compute_dtype):
    path = tmp_path / "model.safetensors"
    expected = _write(path, ["int8", "int8_tensor"], (64, 96), header=True)
    loaded = _comfyui_load(path, compute_dtype)
    for layer, (_, qdata, scale, block_size) in expected.items():
        got = loaded[layer].dequantize()
        assert got.dtype == compute_dtype
        assert torch.equal(got, dequantize(qdata, scale, block_size, compute_dtype)), layer


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_fp8_half_precision_dequant_differs_by_at_most_two_roundings(tmp_path, compute_dtype):
    """comfy-kitchen multiplies FP8 data by the scale in the compute dtype (scale rounded first), where lrq_ao
    multiplies in float32 and rounds once; the two agree to within two roundings of the compute dtype."""
    path = tmp_path / "model.safetensors"
    expected = _write(path, ["fp8"], (64, 96), header=True)
    loaded = _comfyui_load(path, compute_dtype)
    _, qdata, scale, block_size = expected["blocks.0.proj"]
    exact = qdata.double() * expand_scale(scale, block_size).double()
    ours = dequantize(qdata, scale, block_size, compute_dtype).double()
    theirs = loaded["blocks.0.proj"].dequantize().double()
    eps = torch.finfo(compute_dtype).eps
    tiny = torch.finfo(compute_dtype).smallest_normal * eps  # spacing of subnormals: absolute error floor
    assert ((ours - exact).abs() <= 0.5 * (eps * exact.abs() + tiny)).all()  # ours: one correctly rounded product
    assert ((theirs - exact).abs() <= 1.5 * (eps * exact.abs() + tiny)).all()


@pytest.mark.parametrize("name", STOCK)
def test_stock_formats_run_a_linear_through_comfy_kitchen(tmp_path, name):
    """The scale shapes we write broadcast in comfy-kitchen's own linear (eager backend on CPU)."""
    path = tmp_path / "model.safetensors"
    expected = _write(path, [name], (64, 96), header=False)
    weight = _comfyui_load(path, torch.bfloat16)["blocks.0.proj"]
    w, qdata, scale, block_size = expected["blocks.0.proj"]
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    y = torch.nn.functional.linear(x, weight)
    reference = x.double() @ dequantize(qdata, scale, block_size, torch.float64).T
    assert y.shape == (7, 64)
    # int8 also quantizes activations per row inside comfy-kitchen; fp8 runs weight-only here.
    assert sqnr(reference, y) > 30.0


def test_files_hold_the_golden_marker_and_header_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    _write(path, ["fp8", "int8", "int8_tensor", "int8_block"], (128, 128), header=True)
    with safe_open(str(path), framework="pt") as f:
        markers = {k: f.get_tensor(k).numpy().tobytes() for k in list(f.keys()) if k.endswith(".comfy_quant")}
        header = f.metadata()["_quantization_metadata"]
        dtypes = {k: f.get_slice(k).get_dtype() for k in list(f.keys())}
    assert markers == {
        "blocks.0.proj.comfy_quant": b'{"format": "float8_e4m3fn"}',
        "blocks.1.proj.comfy_quant": b'{"format": "int8_tensorwise", "per_row": true}',
        "blocks.2.proj.comfy_quant": b'{"format": "int8_tensorwise"}',
        "blocks.3.proj.comfy_quant": b'{"format": "int8_blockwise", "group_size": 128}',
    }
    assert header == (
        '{"format_version": "1.0", "layers": {"blocks.0.proj": {"format": "float8_e4m3fn"}, '
        '"blocks.1.proj": {"format": "int8_tensorwise", "per_row": true}, '
        '"blocks.2.proj": {"format": "int8_tensorwise"}, '
        '"blocks.3.proj": {"format": "int8_blockwise", "group_size": 128}}}'
    )
    assert dtypes["blocks.0.proj.weight"] == "F8_E4M3" and dtypes["blocks.1.proj.weight"] == "I8"
    assert {dtypes[f"blocks.{i}.proj.weight_scale"] for i in range(4)} == {"F32"}
    assert {dtypes[k] for k in markers} == {"U8"}


def _independent_dequant(weight, stored_scale, fmt, group_size):
    """Float64 dequantization straight from the stored tensors, per FORMAT.md's shape rules."""
    w = weight.double()
    s = stored_scale.double()
    if fmt in ("float8_e4m3fn",) or s.dim() == 0:
        return w * s
    if s.dim() == 1:  # [out] row-wise
        return w * s[:, None]
    if s.shape[1] == 1:  # [out, 1] row-wise
        return w * s
    ones = torch.ones(group_size, group_size, dtype=torch.float64)
    return w * torch.kron(s, ones)


@pytest.mark.parametrize("name", ["fp8", "int8", "int8_tensor", "fp8_row", "fp8_block", "int8_block"])
def test_every_format_we_write_reads_back_as_the_independent_dequantization(tmp_path, name):
    """The QuantOps-only formats have no comfy-kitchen layout; check them (and the stock ones) against a float64
    dequantization computed directly from the file's tensors."""
    path = tmp_path / "model.safetensors"
    spec = format_spec(name, 32)
    qw = spec.quantize(torch.randn(64, 96, generator=torch.Generator().manual_seed(3)))
    tensors, marker = layer_tensors("lin", spec, qw)
    save_file(tensors, str(path))
    layer = read_comfy(path).load_layer("lin")
    assert layer.comfy_name == marker["format"] == spec.comfy_name and layer.weight_format == spec
    reference = _independent_dequant(tensors["lin.weight"], tensors["lin.weight_scale"], marker["format"], 32)
    # Products of an 8-bit value and a float32 scale are exact in float64, so one rounding to float32 must agree.
    assert torch.equal(layer.dequantize(torch.float32), reference.float())


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8_tensorwise", "int8_tensorwise_tensor"])
def test_converter_output_loads_through_comfy_kitchen(tmp_path, fmt):
    """End to end: lrq-convert's own output (round-to-nearest, in process) loads as ComfyUI loads it and
    dequantizes exactly to what lrq_ao's reader returns."""
    from lrq_ao.convert.cli import main

    g = torch.Generator().manual_seed(11)
    source = {
        "blocks.0.attn.qkv.weight": torch.randn(96, 64, generator=g).to(torch.bfloat16),
        "blocks.0.attn.qkv.bias": torch.randn(96, generator=g).to(torch.bfloat16),
        "blocks.0.mlp.fc1.weight": torch.randn(128, 64, generator=g).to(torch.bfloat16),
        "blocks.0.norm.weight": torch.ones(64, dtype=torch.bfloat16),
    }
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(source, str(src))
    with pytest.raises(SystemExit) as info:
        main(["-i", str(src), "-o", str(out), "--format", fmt, "--simple", "--quiet"])
    assert info.value.code == 0
    loaded = _comfyui_load(out, torch.float32)
    ckpt = read_comfy(out)
    assert set(loaded) == set(ckpt.layers) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc1"}
    for layer, weight in loaded.items():
        ours = ckpt.load_layer(layer).dequantize(torch.float32)
        assert torch.equal(weight.dequantize(), ours), layer
        floor = 15.0 if fmt == "int8_tensorwise_tensor" else 25.0  # Gaussian weights: RTN gives ~19 / ~31+ dB
        assert sqnr(source[f"{layer}.weight"], ours) > floor, layer


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8_tensorwise"])
def test_converted_minilm_runs_from_the_comfy_file(tmp_path, fmt):
    """Real weights end to end: lrq-convert MiniLM-L6 into a stock ComfyUI file, fill a meta-device MiniLM from it with
    load_comfy_into, and check its sentence embeddings against the float model and against the same weights
    dequantized by comfy-kitchen."""
    from lrq_ao.convert.cli import main
    from lrq_ao.convert.reader import load_comfy_into
    from lrq_ao.quality.minilm import MiniLM, MiniLMConfig, load_minilm, minilm_dir, sentence_embeddings
    from lrq_ao.quality.texts import evaluation_batches

    out = tmp_path / "minilm.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["-i", str(minilm_dir() / "model.safetensors"), "-o", str(out), "--format", fmt, "--simple", "--quiet"])
    assert info.value.code == 0
    with torch.device("meta"):
        model = MiniLM(MiniLMConfig.from_json_file(minilm_dir() / "config.json"))
    result = load_comfy_into(model, out, strict=False, dtype=torch.float32)
    assert len(result.quantized) == 36 and result.missing_keys == []
    assert all("pooler" in k or "position_ids" in k for k in result.unexpected_keys)
    model.eval()

    # The same checkpoint as ComfyUI sees it: every linear dequantized by comfy-kitchen (float32 compute).
    comfy = load_minilm()
    for layer, weight in _comfyui_load(out, torch.float32).items():
        comfy.get_submodule(layer).weight.copy_(weight.dequantize())
    reference = load_minilm()

    batch = evaluation_batches(batch_size=8)[0]
    with torch.no_grad():
        ours = sentence_embeddings(model(*batch), batch.attention_mask)
        theirs = sentence_embeddings(comfy(*batch), batch.attention_mask)
        exact = sentence_embeddings(reference(*batch), batch.attention_mask)
    assert sqnr(theirs, ours) > 60.0  # identical weights (measured: bit-identical embeddings)
    assert (ours * exact).sum(-1).min() > 0.99  # cosine to the float model (measured 0.998 FP8, 0.9996 INT8)


def test_one_dim_int8_row_scale_breaks_comfy_kitchen_dequantize():
    """Why the writer stores per-row INT8 scales as [out, 1], never [out]: comfy-kitchen's int8 linear reshapes the
    scale, but its dequantize() (used by every fallback op and by LoRA patching) broadcasts a 1-D scale along the
    input dimension: a shape error for a non-square weight, silently wrong values for a square one."""
    layout = "TensorWiseINT8Layout"
    for shape in [(64, 96), (64, 64)]:
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(12))
        qdata, scale, block_size = quantize_rtn(w, format_spec("int8"))
        params = ck_tensor.get_layout_class(layout).Params(
            scale=scale.reshape(-1), orig_dtype=torch.float32, orig_shape=shape
        )
        weight = ck_tensor.QuantizedTensor(qdata, layout, params)
        if shape[0] != shape[1]:
            with pytest.raises(RuntimeError, match="must match the size"):
                weight.dequantize()
        else:
            assert not torch.equal(weight.dequantize(), dequantize(qdata, scale, block_size))
