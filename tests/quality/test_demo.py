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
