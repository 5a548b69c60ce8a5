"""LearnedRoundingConfig: validation with clear errors, JSON round trip, defaults that match the reference tool."""

import json

import pytest

from lrq_ao.config import CONFIG_VERSION, LearnedRoundingConfig


def test_json_round_trip_keeps_every_field_but_calibration():
    cfg = LearnedRoundingConfig(
        format="int8_block",
        block_size=64,
        objective="output",
        init="gptq",
        relaxation="ste",
        optimizer="radam",
        lr=0.02,
        lr_schedule="cosine",
        num_iter=7,
        shrinkage=0.1,
        seed=5,
        bias_correction=True,
        calibration=object(),
    )
    data = json.loads(cfg.to_json())
    assert "calibration" not in data and data["version"] == CONFIG_VERSION
    back = LearnedRoundingConfig.from_json(cfg.to_json())
    assert back == cfg and back.calibration is None


def test_reference_tool_rank_defaults():
    cfg = LearnedRoundingConfig()
    assert (cfg.top_p, cfg.min_k, cfg.max_k) == (0.2, 256, 1280)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("format", "int4", "format"),
        ("objective", "l1", "objective"),
        ("optimizer", "sgd", "optimizer"),
        ("relaxation", "anneal", "relaxation"),
        ("init", "svd", "init"),
        ("lr_schedule", "step", "lr_schedule"),
        ("block_size", 100, "block_size"),
        ("top_p", 1.5, "top_p"),
        ("lr", 0.0, "lr"),
        ("shrinkage", 2.0, "shrinkage"),
        ("damp", 0.0, "damp"),
        ("greedy_passes", -1, "greedy_passes"),
    ],
)
def test_invalid_values_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        LearnedRoundingConfig(**{field: value})


def test_unknown_json_fields_and_versions_are_rejected():
    with pytest.raises(ValueError, match="unknown"):
        LearnedRoundingConfig.from_json('{"format": "fp8", "learning_rate": 1}')
    with pytest.raises(ValueError, match="version"):
        LearnedRoundingConfig.from_json(json.dumps({"version": CONFIG_VERSION + 1}))


def test_every_registered_format_is_accepted_with_the_default_block_size():
    from lrq_ao.formats import FORMATS

    for name, fmt in FORMATS.items():
        cfg = LearnedRoundingConfig(format=name)
        assert cfg.weight_format.name == name and cfg.spec is not None
        if not fmt.has_blocks:
            assert cfg.weight_format is fmt  # block_size does not touch a format without blocks


def test_block_size_applies_only_to_formats_with_blocks():
    from lrq_ao.formats import FORMATS

    blocked = LearnedRoundingConfig(format="int8_block", block_size=64)
    assert blocked.weight_format.block == 64 and blocked.weight_format.block_size_for((128, 192)) == (64, 64)
    assert blocked.spec == blocked.weight_format
    # A config written before for a format without blocks carried one too (the CLI set it); it still loads.
    old = LearnedRoundingConfig(format="fp8", block_size=64)
    assert old.weight_format is FORMATS["fp8"]
    with pytest.raises(
        ValueError, match=r"block_size must be one of \(16, 32, 64, 128, 256, 1024\) for format int8_block"
    ):
        LearnedRoundingConfig(format="int8_block", block_size=48)
    with pytest.raises(ValueError, match="format fp8 has no blocks"):
        LearnedRoundingConfig(format="fp8", block_size=48)


def test_json_written_before_formats_became_objects_still_loads():
    text = (
        '{"act_order": true, "activation": "weight_only", "activation_quant": "exact", "bias_correction": false, '
        '"block_size": 256, "check_every": 25, "compensate_drift": true, "damp": 0.01, "device": null, '
        '"fallback_to_rtn": true, "format": "int8", "greedy_passes": 2, "init": "auto", "kernel": "auto", '
        '"lr": null, "lr_schedule": "plateau", "max_k": 1280, "min_k": 256, "neighbours_only": false, '
        '"num_iter": 200, "objective": "auto", "objective_damp": 0.0, "optimizer": "adamw", "patience": 4, '
        '"relaxation": "auto", "seed": 0, "shrinkage": -1.0, "top_p": 0.2, "version": 1}'
    )
    cfg = LearnedRoundingConfig.from_json(text)
    assert cfg.weight_format.name == "int8" and cfg.weight_format.block_size_for((4, 8)) == (1, 8)
    assert json.loads(cfg.to_json()) == json.loads(text)
