"""state_dict / torch.save / torch.load(weights_only=True) / meta-device load of quantized models."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lrq_ao.api import quantize_
from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.layouts import ActivationMode, Float8Tensor, Int8Tensor, KernelChoice

FORMATS = ("fp8", "fp8_row", "fp8_block", "int8_tensor", "int8", "int8_block")


def _model():
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32, bias=False)).to(torch.bfloat16)


def _quantized(fmt: str, activation: str = "dynamic", kernel: str = "emulated"):
    torch.manual_seed(0)
    model = _model()
    config = LearnedRoundingConfig(format=fmt, block_size=32, activation=activation, kernel=kernel, objective="rtn")
    quantize_(model, config)
    return model


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_load_weights_only_and_meta_assign(fmt, tmp_path):
    model = _quantized(fmt)
    sd = model.state_dict()
    expected_cls = Float8Tensor if fmt.startswith("fp8") else Int8Tensor
    assert type(sd["0.weight"]) is expected_cls and type(sd["2.weight"]) is expected_cls
    path = tmp_path / "model.pt"
    torch.save(sd, path)
    loaded = torch.load(path, weights_only=True)
    for key in ("0.weight", "2.weight"):
        src, dst = sd[key], loaded[key]
        assert type(dst) is type(src) and dst.block_size == src.block_size and dst.dtype == src.dtype
        assert dst.act == src.act and dst.kernel is src.kernel
        assert torch.equal(dst.qdata.view(torch.uint8), src.qdata.view(torch.uint8))
        assert torch.equal(dst.scale, src.scale)

    with torch.device("meta"):
        fresh = _model()
    fresh.load_state_dict(loaded, assign=True)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert type(fresh[0].weight) is type(model[0].weight) and not fresh[0].weight.is_meta


def test_load_into_quantized_model_copies_in_place():
    source = _quantized("int8_block")
    target = _quantized("int8_block")
    with torch.no_grad():
        target[0].weight.qdata.zero_()
    target.load_state_dict(source.state_dict())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_load_plain_weights_into_quantized_model_refuses_silent_requantization():
    target = _quantized("int8")
    with pytest.raises(RuntimeError, match="does not requantize"):
        target.load_state_dict(_model().state_dict())


def test_weights_only_load_in_fresh_process_after_import_lrq_ao(tmp_path):
    t = Int8Tensor.from_hp(
        torch.randn(64, 64, dtype=torch.bfloat16), "block", block=32, act=ActivationMode("dynamic", "block", 32)
    )
    t = Int8Tensor.from_qdata(t.qdata, t.scale, t.block_size, t.dtype, act=t.act, kernel=KernelChoice.TORCH)
    path = tmp_path / "w.pt"
    torch.save({"w": t}, path)
    expected = t.dequantize(torch.float32)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import lrq_ao
        w = torch.load({str(path)!r}, weights_only=True)["w"]
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        assert type(w).__name__ == "Int8Tensor", type(w)
        assert w.act == lrq_ao.layouts.ActivationMode("dynamic", "block", 32), w.act
        assert w.kernel is lrq_ao.layouts.KernelChoice.TORCH, w.kernel
        assert torch.equal(w.dequantize(torch.float32), expected)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
