"""A format the converter has never heard of becomes writable and readable by registering it, with no edit in
``lrq_ao/convert``: this is what the MXFP8 / NVFP4 / ConvRot format files rely on.

The toy format here is deliberately unlike the six 8-bit scaled ones: two-level scales (``.weight_scale`` per row
times a ``.weight_scale_2`` scalar, as NVFP4 stores them), its own ComfyUI name, not stock, and no fallback for the
shapes it refuses. Its dequantization is checked against a float64 one computed from the file's bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors import safe_open

from lrq_ao.config import format_with_block
from lrq_ao.convert.cli import main
from lrq_ao.convert.reader import load_comfy, read_comfy
from lrq_ao.formats import FORMATS, FormatError, QuantizedWeight, WeightFormat, comfy
from lrq_ao.formats.base import MIN_SCALE, blocked_amax, check_2d
from lrq_ao.formats.elements import INT8

TOY = "toy_int8_2level"


@dataclass(frozen=True)
class ToyTwoLevel(WeightFormat):
    """INT8 codes, a float32 scale per row relative to one float32 scalar: ``w = code * scale[row] * scale2``."""

    element = INT8
    comfy_name = TOY
    stock = False

    @property
    def name(self) -> str:
        return "toy"

    def block_size_for(self, shape):
        n, k = check_2d(shape)
        if n % 128:
            raise FormatError(f"toy needs out_features divisible by 128, got {n}")
        return (1, k)

    def compute_scales(self, w, block_size):
        scale2 = (w.abs().amax() / 127).clamp_min(MIN_SCALE).float()
        return (blocked_amax(w.float(), block_size) / 127 / scale2).clamp_min(MIN_SCALE), scale2

    def effective_scale(self, scale, scale2):
        return scale.float() * scale2.float()

    @property
    def _has_scale2(self) -> bool:
        return True

    def comfy_marker_fields(self, block_size, shape) -> dict[str, Any]:
        return {"toy_version": 1}

    def comfy_tensors(self, qw, shape):
        return {
            comfy.WEIGHT_SUFFIX: qw.qdata.contiguous(),
            comfy.SCALE_SUFFIX: qw.scale.float().reshape(shape[0], 1).contiguous(),
            comfy.SCALE2_SUFFIX: qw.scale2.float().reshape(()).contiguous(),
        }


def _read_toy(marker, tensors, where):
    qdata = comfy.require(tensors, comfy.WEIGHT_SUFFIX, where)
    scale = comfy.require(tensors, comfy.SCALE_SUFFIX, where)
    scale2 = comfy.require(tensors, comfy.SCALE2_SUFFIX, where)
    n, k = qdata.shape
    if tuple(scale.shape) != (n, 1):
        raise comfy.ComfyFormatError(f"{where}{comfy.SCALE_SUFFIX}: scale shape {list(scale.shape)}, expected [{n}, 1]")
    return ToyTwoLevel(), QuantizedWeight(qdata, scale.float(), (1, k), scale2.float())


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(FORMATS, "toy", ToyTwoLevel())
    monkeypatch.setitem(comfy.READERS, TOY, _read_toy)
    yield


def _stored_dequant(path, layer):
    """From the file's bytes: codes times the float32 effective scale ``scale * scale2``, in float64 (the product
    of an 8-bit code and a float32 is exact there, so one rounding to float32 must equal the format's)."""
    with safe_open(str(path), "pt") as f:
        q, s, s2 = (f.get_tensor(layer + suffix) for suffix in (".weight", ".weight_scale", ".weight_scale_2"))
    return q.double() * (s.float() * s2.float()).double()


def test_a_registered_format_is_written_by_the_cli_and_read_back(toy_registered, flux_ckpt, tmp_path, capsys):
    out, report = tmp_path / "toy.safetensors", tmp_path / "r.json"
    with pytest.raises(SystemExit) as info:
        main(
            [
                str(a)
                for a in ["-i", flux_ckpt, "-o", out, "--format", "toy", "--simple", "--quiet"]
                + ["--verify", "--report", report]
            ]
        )
    err = capsys.readouterr().err
    assert info.value.code == 0, err
    assert TOY in err and "QuantOps" in err  # not stock: the user is told
    rep = json.loads(report.read_text())
    assert rep["verify"]["ok"], rep["verify"]["problems"]
    ckpt = read_comfy(out)
    # 256-row weights are toy layers; 192- and 64-row ones are refused by the format (no fallback): kept, with why.
    assert sorted(ckpt.layers) == ["double_blocks.0.img_mlp.0", "double_blocks.1.img_mlp.0"]
    kept = rep["kept"]["double_blocks.0.img_attn.qkv.weight"]
    assert "toy needs out_features divisible by 128, got 192" in kept and "no fallback" in kept
    for name, layer in ckpt.layers.items():
        assert layer.comfy_name == TOY and layer.weight_format == ToyTwoLevel() and layer.scale2 is not None
        assert layer.marker == {"format": TOY, "toy_version": 1}
        ckpt.load_layer(name)
        assert torch.equal(layer.dequantize(torch.float32), _stored_dequant(out, name).float())
    record = next(r for r in rep["layers"] if r["layer"] == "double_blocks.0.img_mlp.0")
    assert record["rounding"]["objective"] == "rtn"  # no --calib: round-to-nearest, through the same rounding engine


def test_load_comfy_hands_the_format_and_its_weight_to_layouts(toy_registered, flux_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "toy.safetensors"
    with pytest.raises(SystemExit):
        main([str(a) for a in ["-i", flux_ckpt, "-o", out, "--format", TOY, "--simple", "--quiet"]])
    calls = []

    def weight_tensor(fmt, qw, dtype, act=None, kernel=None, *, name="weight"):
        calls.append((fmt, qw, dtype, name))
        return fmt.dequantize_original(qw, dtype)

    monkeypatch.setattr("lrq_ao.layouts.weight_tensor", weight_tensor)
    state = load_comfy(out, dtype=torch.float32)
    assert sorted(c[3] for c in calls) == ["double_blocks.0.img_mlp.0.weight", "double_blocks.1.img_mlp.0.weight"]
    for fmt, qw, dtype, name in calls:
        assert fmt == ToyTwoLevel() and qw.scale2 is not None and dtype == torch.float32
        assert torch.equal(state[name], _stored_dequant(out, name[: -len(".weight")]).float())


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_registered_format_converts_and_verifies(name, flux_ckpt, tmp_path, capsys):
    """Each format of the registry, by its lrq_ao name: the CLI writes it, --verify reloads every layer through the
    format's own reader and matches the SQNR the converter recorded (float64, against the input weight), every
    fallback the report states is also in the file's metadata, and load_comfy's tensors dequantize exactly as the
    reader does."""
    out, report = tmp_path / "out.safetensors", tmp_path / "r.json"
    with pytest.raises(SystemExit) as info:
        main(
            [
                str(a)
                for a in ["-i", flux_ckpt, "-o", out, "--format", name, "--simple", "--quiet", "--verify"]
                + ["--block-size", 64, "--report", report]
            ]
        )
    assert info.value.code == 0, capsys.readouterr().err
    rep = json.loads(report.read_text())
    assert rep["verify"]["ok"], rep["verify"]["problems"]
    assert all(r["sqnr_db"] > 15 for r in rep["layers"]), [(r["layer"], r["sqnr_db"]) for r in rep["layers"]]
    with safe_open(str(out), "pt") as f:
        stated = json.loads(f.metadata()["lrq_ao"])["fallbacks"]
    assert set(stated) == {r["layer"] for r in rep["layers"] if r["fallback"]}
    ckpt = read_comfy(out)
    written = {n for n, layer in ckpt.layers.items() if layer.weight_format == format_with_block(FORMATS[name], 64)}
    assert written and written == set(ckpt.layers) - set(stated)
    # load_comfy builds each layer's lrq_ao tensor from the same (format, QuantizedWeight) the reader returns.
    state = load_comfy(out, dtype=torch.float32)
    for layer in ckpt.load_layers():
        assert torch.equal(state[layer.name + ".weight"].dequantize().float(), layer.dequantize(torch.float32))
