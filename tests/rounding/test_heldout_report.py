"""The report's held-out output SQNR on a real MiniLM layer: it equals the layer's output SQNR computed in float64 on
exactly the held-out calibration inputs, and the rounding itself never sees those inputs."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from lrq_ao import LearnedRoundingConfig, calibrate, quantize_
from lrq_ao.quality.minilm import load_minilm
from lrq_ao.quality.texts import calibration_batches

LAYER = "encoder.layer.0.attention.output.dense"  # 384 × 384, real attention outputs as input
BATCHES = 10
EVERY = 5  # calls 5 and 10 are held out


def _only_layer(module: nn.Module, name: str) -> bool:
    return name == LAYER


@functools.lru_cache(maxsize=1)
def _model_and_layer_inputs() -> tuple[nn.Module, list[torch.Tensor]]:
    """The float MiniLM and, per calibration call, the non-padding inputs ``LAYER`` received (float32)."""
    model = load_minilm()
    inputs: list[torch.Tensor] = []
    batches = calibration_batches()[:BATCHES]
    hook = model.get_submodule(LAYER).register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(*batch)
    hook.remove()
    return model, [x[b.attention_mask.bool()] for x, b in zip(inputs, batches)]


def _calibrate(model: nn.Module, batches, holdout_every: int):
    with torch.no_grad(), calibrate(model, filter_fn=_only_layer, holdout_every=holdout_every) as calib:
        for batch in batches:
            calib.token_mask = batch.attention_mask
            model(*batch)
    return calib


def _quantize(model: nn.Module, config: LearnedRoundingConfig) -> tuple[nn.Linear, dict]:
    copy_ = copy.deepcopy(model)
    report = quantize_(copy_, config, filter_fn=_only_layer)
    return copy_.get_submodule(LAYER), report.layers[0]


def _layer_output_sqnr_float64(float_layer: nn.Linear, quantized: nn.Linear, x: torch.Tensor) -> float:
    """Run the real layer in float64 with the float and with the dequantized weight; SQNR of its output minus the
    bias (the bias is the same in both and is not what the rounding changes)."""
    reference = copy.deepcopy(float_layer).double()
    dequantized = copy.deepcopy(float_layer).double()
    with torch.no_grad():
        dequantized.weight.copy_(quantized.weight.dequantize(torch.float64))
        y_ref, y_q = reference(x.double()), dequantized(x.double())
        signal = y_ref - reference.bias
        return 10 * math.log10(float(signal.pow(2).sum()) / float((y_q - y_ref).pow(2).sum()))


def test_heldout_output_sqnr_matches_the_real_layer_on_the_heldout_inputs():
    model, per_call = _model_and_layer_inputs()
    calib = _calibrate(model, calibration_batches()[:BATCHES], EVERY)
    heldout = torch.cat([x for i, x in enumerate(per_call, start=1) if i % EVERY == 0])
    assert calib.stats(LAYER).count_holdout == heldout.shape[0]

    layer = model.get_submodule(LAYER)
    ours, report = _quantize(model, LearnedRoundingConfig(format="int8", calibration=calib))
    rtn, rtn_report = _quantize(model, LearnedRoundingConfig(format="int8", objective="rtn", calibration=calib))
    assert report["objective"] == "output" and rtn_report["objective"] == "rtn"
    ours_db = _layer_output_sqnr_float64(layer, ours, heldout)
    rtn_db = _layer_output_sqnr_float64(layer, rtn, heldout)
    assert report["output_sqnr_heldout_db"] == pytest.approx(ours_db, abs=1e-3)
    assert report["output_sqnr_heldout_rtn_db"] == pytest.approx(rtn_db, abs=1e-3)
    assert rtn_report["output_sqnr_heldout_db"] == rtn_report["output_sqnr_heldout_rtn_db"]
    assert rtn_report["output_sqnr_heldout_db"] == pytest.approx(rtn_db, abs=1e-3)
    # The fitted number is a different measurement (other tokens), not the held-out one under another name.
    fitting = torch.cat([x for i, x in enumerate(per_call, start=1) if i % EVERY != 0])
    assert report["output_sqnr_db"] == pytest.approx(_layer_output_sqnr_float64(layer, ours, fitting), abs=1e-3)
    assert abs(report["output_sqnr_db"] - report["output_sqnr_heldout_db"]) > 0.01


def test_rounding_never_sees_the_heldout_calls():
    model, _ = _model_and_layer_inputs()
    batches = calibration_batches()[:BATCHES]
    with_holdout = _calibrate(model, batches, EVERY)
    fitting_only = _calibrate(model, [b for i, b in enumerate(batches, start=1) if i % EVERY != 0], 0)
    a, report_a = _quantize(model, LearnedRoundingConfig(format="int8", calibration=with_holdout))
    b, report_b = _quantize(model, LearnedRoundingConfig(format="int8", calibration=fitting_only))
    assert torch.equal(a.weight.qdata, b.weight.qdata)
    assert report_a["objective_final"] == report_b["objective_final"] and report_a["moved_fraction"] > 0
    assert report_a["output_sqnr_heldout_db"] is not None
    assert report_b["output_sqnr_heldout_db"] is None and report_b["output_sqnr_heldout_rtn_db"] is None


def test_without_calibration_the_heldout_columns_say_none():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    report = quantize_(model, LearnedRoundingConfig(format="int8", objective="rtn"))
    assert report.layers[0]["output_sqnr_heldout_db"] is None
    assert report.layers[0]["output_sqnr_heldout_rtn_db"] is None
