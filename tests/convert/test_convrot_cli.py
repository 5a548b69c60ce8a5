"""``lrq-convert --convrot``: a whole file in ComfyUI's INT8 ConvRot form, read back as ComfyUI reads it.

Each quantized layer is rebuilt the way stock ComfyUI does (``int8_tensorwise`` with ``"convrot": true,
"convrot_groupsize": G`` -> comfy-kitchen 0.2.40's ``TensorWiseINT8Layout`` with ``convrot=True``) and must
dequantize exactly to what lrq_ao's own reader returns; a layer whose input width the group does not divide takes the
largest smaller group that does, and the report and the file's metadata say so.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfy_kitchen.tensor import QuantizedTensor, TensorWiseINT8Layout
from safetensors import safe_open
from safetensors.torch import save_file

from lrq_ao.convert.cli import main
from lrq_ao.convert.reader import read_comfy
from lrq_ao.primitives import sqnr


def _source(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {
        "blocks.0.attn.qkv.weight": (torch.randn(96, 256, generator=g) * 0.02).to(torch.bfloat16),
        "blocks.0.mlp.fc2.weight": (torch.randn(64, 320, generator=g) * 0.02).to(torch.bfloat16),  # 320 = 5 x 64
        "blocks.0.norm.weight": torch.ones(256, dtype=torch.bfloat16),
    }
    path = tmp_path / "in.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def _convert(args):
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code


def _kitchen(state: dict, layer: str, marker: dict) -> QuantizedTensor:
    """What ComfyUI's loader builds for a ConvRot layer (marker keys as ComfyUI reads them)."""
    weight = state[f"{layer}.weight"]
    params = TensorWiseINT8Layout.Params(
        scale=state[f"{layer}.weight_scale"],
        orig_dtype=torch.float32,
        orig_shape=tuple(weight.shape),
        convrot=bool(marker.get("convrot", False)),
        convrot_groupsize=int(marker.get("convrot_groupsize", 256)),
    )
    return QuantizedTensor(weight, "TensorWiseINT8Layout", params)


def test_convrot_file_dequantizes_in_comfy_kitchen_exactly_as_lrq_ao_reads_it(tmp_path):
    src, source = _source(tmp_path)
    out, report = tmp_path / "out.safetensors", tmp_path / "report.json"
    code = _convert(
        ["-i", str(src), "-o", str(out), "--convrot", "--simple", "--quiet", "--verify"] + ["--report", str(report)]
    )
    assert code == 0
    with safe_open(str(out), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        header = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    markers = {
        k[: -len(".comfy_quant")]: json.loads(bytes(v.tolist())) for k, v in state.items() if k.endswith(".comfy_quant")
    }
    assert markers == header
    # 256 = G: the default group; 320 is no multiple of 256, so the layer takes the largest power of 4 dividing it.
    assert json.dumps(markers["blocks.0.attn.qkv"]).encode() == (
        b'{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 256}'
    )
    assert markers["blocks.0.mlp.fc2"]["convrot_groupsize"] == 64
    rep = json.loads(report.read_text())
    fallback = next(r for r in rep["layers"] if r["layer"] == "blocks.0.mlp.fc2")["fallback"]
    assert "64" in fallback
    ckpt = read_comfy(out)
    for layer, marker in markers.items():
        ours = ckpt.load_layer(layer).dequantize(torch.float32)
        theirs = _kitchen(state, layer, marker).dequantize()
        assert torch.equal(theirs, ours), layer
        assert sqnr(source[f"{layer}.weight"], ours) > 38.0, layer  # Gaussian weights, per-row INT8: ~41-42 dB


def test_convrot_group_size_flag_and_conflicts(tmp_path):
    src, _ = _source(tmp_path)
    out = tmp_path / "g64.safetensors"
    assert (
        _convert(
            ["-i", str(src), "-o", str(out), "--int8", "--convrot", "--convrot-group-size", "64", "--simple", "--quiet"]
        )
        == 0
    )
    assert {layer.marker["convrot_groupsize"] for layer in read_comfy(out).layers.values()} == {64}
    assert (
        _convert(["-i", str(src), "-o", str(tmp_path / "x.safetensors"), "--convrot", "--format", "fp8", "--quiet"])
        != 0
    )
