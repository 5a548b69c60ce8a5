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
