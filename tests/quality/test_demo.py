"""The demo: its compiled forward agrees with eager, and its argument checks."""

import dataclasses

import pytest
import torch

from lrq_ao.demo import compiled_forward, parse_args
from lrq_ao.primitives import format_spec, quantize_rtn
from lrq_ao.quality.minilm import MiniLM, MiniLMConfig, encoder_linear_names, load_state_dict_from_package, minilm_dir
from lrq_ao.quality.texts import evaluation_batches


def one_layer_minilm() -> MiniLM:
    """The real embeddings and first encoder layer only (compiles in seconds on a CPU)."""
    cfg = dataclasses.replace(MiniLMConfig.from_json_file(minilm_dir() / "config.json"), num_hidden_layers=1)
    model = MiniLM(cfg)
    state = load_state_dict_from_package()
    model.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("encoder.layer.") or k.startswith("encoder.layer.0.")}
    )
    return model.eval().requires_grad_(False)


@pytest.mark.slow
def test_compiled_forward_matches_eager_on_int8_weights():
    from lrq_ao.layouts import make_weight_tensor

    fp = one_layer_minilm()
    quantized = one_layer_minilm()
    for name in encoder_linear_names(quantized):
        linear = quantized.get_submodule(name)
        qdata, scale, block_size = quantize_rtn(linear.weight, format_spec("int8"))
        linear.weight = torch.nn.Parameter(make_weight_tensor(qdata, scale, block_size, torch.float32), False)
    run = compiled_forward(quantized, fp, evaluation_batches(batch_size=4)[0])
    assert run.shape[0] == 4
    assert run.sqnr_vs_eager >= 60.0  # same arithmetic, only fusion/reduction order may differ
    assert 30.0 <= run.sqnr_vs_float32 < run.sqnr_vs_eager
    assert "compiled forward" in str(run)


def test_learned_objectives_that_need_statistics_ask_for_calibration():
    with pytest.raises(SystemExit):
        parse_args(["--objective", "output"])
    args = parse_args(["--objective", "output", "--calibrate", "--formats", "int8", "fp8_block"])
    assert args.formats == ["int8", "fp8_block"] and args.calibrate


def test_unknown_format_is_rejected():
    with pytest.raises(SystemExit):
        parse_args(["--formats", "int4"])


@pytest.mark.slow
def test_demo_table_matches_the_primitives_reference(capsys):
    """``main`` quantizes with lrq_ao.quantize_; its numbers must equal the primitives-only RTN reference."""
    from lrq_ao.demo import main
    from lrq_ao.quality.baseline import fake_quantize_rtn, rtn_weight_sqnrs
    from lrq_ao.quality.metrics import evaluate
    from lrq_ao.quality.minilm import load_minilm

    rows = main(["--formats", "int8", "fp8_block", "--no-compile", "--no-comfy", "--learned-formats"])
    printed = capsys.readouterr().out
    fp = load_minilm()
    batches = evaluation_batches(batch_size=16)
    assert [row.format for row in rows] == ["int8", "fp8_block"]
    for row in rows:
        sqnrs = sorted(rtn_weight_sqnrs(fp, row.format).values())
        assert row.report.min_weight_sqnr == pytest.approx(sqnrs[0], abs=1e-6)
        assert row.report.median_weight_sqnr == pytest.approx((sqnrs[17] + sqnrs[18]) / 2, abs=1e-6)
        reference = evaluate(fp, fake_quantize_rtn(fp, row.format), batches)
        assert row.report.end_to_end_sqnr == pytest.approx(reference.end_to_end_sqnr, abs=0.05)
        assert f"{row.report.end_to_end_sqnr:13.2f}" in printed
    # One byte per weight element plus float32 scales: per-row 384 or 1536 scales, 128-blocks 9 or 36.
    elements = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    per_row_scales = 6 * (5 * 384 + 1536)
    block_scales = 6 * (4 * 9 + 2 * 36)
    assert rows[0].linear_mb * 1e6 == elements + 4 * per_row_scales
    assert rows[1].linear_mb * 1e6 == pytest.approx(elements + 4 * block_scales)
    assert "bfloat16" in printed and "float32" in printed


def test_table_adds_the_rtn_column_only_for_other_objectives():
    from lrq_ao.demo import DemoRow, format_rows
    from lrq_ao.quality.metrics import LayerQuality, QualityReport

    layers = [LayerQuality("encoder.layer.0.output.dense", (384, 1536), 30.0 + i, 40.0, 35.0) for i in range(3)]
    report = QualityReport(layers, end_to_end_sqnr=27.5, num_tokens=10)
    bf16 = QualityReport(layers, end_to_end_sqnr=49.0, num_tokens=10)
    plain = format_rows([DemoRow("fp8", report, 10.6, 58.4, 1.0, None)], bf16, 42.5, 90.3)
    assert "RTN" not in plain and "fp8" in plain and "27.50" in plain and "31.00" in plain
    compared = format_rows([DemoRow("fp8", report, 10.6, 58.4, 1.0, None, 25.12)], bf16, 42.5, 90.3)
    assert "RTN end-to-end dB" in compared.splitlines()[0] and compared.splitlines()[-1].endswith("25.12")


@pytest.mark.slow
def test_comfy_round_trip_matches_quantize_in_memory():
    """The demo's ComfyUI step (convert → verify → load_comfy_into) must give the model quantize_ gives in memory:
    round-to-nearest in the converter and in quantize_ are the same arithmetic, so the end-to-end SQNR matches."""
    from lrq_ao.demo import comfy_round_trip
    from lrq_ao.quality.baseline import fake_quantize_rtn
    from lrq_ao.quality.metrics import evaluate
    from lrq_ao.quality.minilm import load_minilm

    fp = load_minilm()
    batches = evaluation_batches(batch_size=16)[:2]
    lines = comfy_round_trip(fp, batches, formats=("int8_tensorwise",))
    fmt, _, verify, quantized, e2e = lines[1].split()
    assert (fmt, verify, quantized) == ("int8_tensorwise", "ok", "36")
    reference = evaluate(fp, fake_quantize_rtn(fp, "int8"), batches)
    assert float(e2e) == pytest.approx(reference.end_to_end_sqnr, abs=0.01)


def test_learned_rounding_rows_show_a_gain_over_rtn_on_held_out_text():
    """The demo's learned-rounding table: calibrated on calibration sentences only, measured on evaluation ones;
    the RTN column must equal an independent fake-quantized RTN model and learned rounding must beat it."""
    from lrq_ao.demo import learned_rounding_rows
    from lrq_ao.quality.baseline import fake_quantize_rtn
    from lrq_ao.quality.metrics import evaluate
    from lrq_ao.quality.texts import calibrate_on_text, calibration_sentences

    model = one_layer_minilm()
    batches = evaluation_batches(batch_size=16)[:2]
    calib = calibrate_on_text(model, calibration_sentences()[:200])
    lines = learned_rounding_rows(model, batches, ("int8",), calib)
    fmt, rtn, learned, gain, _ = lines[1].split()
    assert fmt == "int8"
    assert float(rtn) == pytest.approx(
        evaluate(model, fake_quantize_rtn(model, "int8"), batches).end_to_end_sqnr, abs=0.01
    )
    assert float(learned) > float(rtn) + 1.0 and float(gain) == pytest.approx(float(learned) - float(rtn), abs=0.02)
