"""torch.compile(fullgraph=True) over quantized weights: no graph breaks, the tensor as input and output, and no
recompilation per batch size."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

from lrq_ao.api import quantize_
from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.layouts import ActivationMode, Float8Tensor, Int8Tensor

FORMATS = ("fp8", "fp8_row", "fp8_block", "int8_tensor", "int8", "int8_block")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _quantized_mlp(fmt: str, activation: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(torch.bfloat16)
    quantize_(model, LearnedRoundingConfig(format=fmt, block_size=32, activation=activation, objective="rtn"))
    return model


@pytest.mark.parametrize("activation", ["weight_only", "dynamic"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_mlp_compiles_fullgraph_without_recompiling_per_batch_size(fmt, activation):
    model = _quantized_mlp(fmt, activation)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for i, batch in enumerate((3, 5, 7)):
            x = torch.randn(batch, 64, dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
            if i == 1:
                frames_after_second = counter.frame_count
    # The second size may trigger one dynamic-shape recompile (automatic dynamic); the third must not compile.
    assert counter.frame_count == frames_after_second <= 2


def test_mark_dynamic_compiles_once():
    model = _quantized_mlp("int8_block", "dynamic")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for batch in (4, 9, 17):
            x = torch.randn(2, batch, 64, dtype=torch.bfloat16)
            torch._dynamo.mark_dynamic(x, 1)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert counter.frame_count == 1


@pytest.mark.parametrize("cls", [Float8Tensor, Int8Tensor])
def test_explain_reports_no_graph_break(cls):
    model = _quantized_mlp("fp8_row" if cls is Float8Tensor else "int8", "dynamic")
    explanation = torch._dynamo.explain(model)(torch.randn(3, 64, dtype=torch.bfloat16))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("cls", [Float8Tensor, Int8Tensor])
def test_quantized_tensor_as_compiled_input_and_output(cls):
    act = ActivationMode("dynamic", "block", 32)
    w = cls.from_hp(torch.randn(64, 96, dtype=torch.bfloat16), "block", block=32, act=act)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def fn(x, weight):
        return F.linear(x, weight), weight.t(), weight.to(torch.float16), weight[32:], weight.t()[32:]

    x = torch.randn(4, 96, dtype=torch.bfloat16)
    y, wt, wh, rows, cols = fn(x, w)
    assert type(rows) is cls and torch.equal(rows.dequantize(), w.dequantize()[32:])
    assert type(cols) is cls and torch.equal(cols.dequantize(), w.dequantize().t()[32:])
    torch.testing.assert_close(y, F.linear(x, w), rtol=0, atol=0)
    assert type(wt) is cls and wt.block_size == (32, 32) and wt.scale.shape == (3, 2)
    assert torch.equal(wt.dequantize(), w.dequantize().t())
    assert type(wh) is cls and wh.dtype == torch.float16 and wh.act == act
    assert counter.frame_count == 1


@pytest.mark.slow
def test_inductor_dynamic_mlp():
    model = _quantized_mlp("int8", "dynamic")
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (3, 5, 7):
            x = torch.randn(batch, 64, dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x), model(x), rtol=2e-2, atol=2e-2)
    assert counter.frame_count == 1
