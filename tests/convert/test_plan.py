import json

import pytest
import torch
from safetensors.torch import save_file

from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.convert import comfy_format as cf
from lrq_ao.convert.plan import ConvertOptions, build_plan, describe_plan, load_layer_config
from lrq_ao.convert.stream import read_source


def _plan(path, **kw):
    return build_plan(read_source(path), ConvertOptions(**kw))


def _by_name(plan):
    return {t.name: t for t in plan.tensors}


def test_flux_plan_keeps_what_must_stay_high_precision(flux_ckpt):
    plan = _plan(flux_ckpt)
    assert plan.preset.name == "flux"
    t = _by_name(plan)
    assert t["img_in.bias"].action == "keep" and "not a .weight" in t["img_in.bias"].reason
    assert t["conv_in.weight"].action == "keep" and "4-D" in t["conv_in.weight"].reason
    assert t["position_ids"].action == "keep"
    assert t["img_in.weight"].action == "keep" and "'img_in'" in t["img_in.weight"].reason
    assert t["final_layer.linear.weight"].action == "keep"
    quantized = {q.layer for q in plan.quantized}
    assert quantized == {
        "double_blocks.0.img_attn.qkv",
        "double_blocks.0.img_mlp.0",
        "double_blocks.0.img_mlp.2",
        "double_blocks.1.img_attn.qkv",
        "double_blocks.1.img_mlp.0",
        "double_blocks.1.img_mlp.2",
        "single_blocks.0.linear1",
    }
    assert all(q.format == "float8_e4m3fn" for q in plan.quantized)


def test_output_layout_is_exact(flux_ckpt):
    plan = _plan(flux_ckpt, format="int8_tensorwise")
    entries = {e.name: e for e in plan.entries}
    e = entries["double_blocks.0.img_attn.qkv.weight"]
    assert (e.dtype, e.shape) == ("I8", (192, 64))
    assert entries["double_blocks.0.img_attn.qkv.weight_scale"].shape == (192, 1)
    marker = cf.marker_json(cf.layer_marker(plan.quantized[0].weight_format, (192, 64))).encode()
    assert entries["double_blocks.0.img_attn.qkv.comfy_quant"].shape == (len(marker),)
    # Contiguous, no holes: each entry starts where the previous ended.
    offset = 0
    for entry in plan.entries:
        assert entry.offset == offset
        offset += entry.nbytes


def test_block_fallback_is_stated_in_plan_and_metadata(flux_ckpt):
    plan = _plan(flux_ckpt, format="int8_blockwise", block_size=64)
    t = _by_name(plan)
    fb = t["single_blocks.0.linear1.weight"]
    assert fb.format == "int8_tensorwise" and fb.weight_format.name == "int8" and fb.spec is fb.weight_format
    assert fb.fallback == (
        "requested int8_blockwise block 64 cannot tile shape [96, 64]; wrote int8_tensorwise (row-wise) instead"
    )
    assert "multiples of 64" in fb.fallback_why  # the format's own explanation
    ok = t["double_blocks.0.img_mlp.0.weight"]
    assert ok.format == "int8_blockwise" and ok.fallback is None
    header = json.loads(plan.metadata[cf.METADATA_KEY])["layers"]
    assert header["single_blocks.0.linear1"]["format"] == "int8_tensorwise"
    assert header["double_blocks.0.img_mlp.0"] == {"format": "int8_blockwise", "group_size": 64}
    assert "single_blocks.0.linear1" in json.loads(plan.metadata["lrq_ao"])["fallbacks"]
    assert "FALLBACK" in describe_plan(plan) and "QuantOps" in describe_plan(plan)


def test_fp8_block_falls_back_to_fp8_rowwise(flux_ckpt):
    t = _by_name(_plan(flux_ckpt, format="float8_e4m3fn_blockwise", block_size=64))
    assert t["single_blocks.0.linear1.weight"].format == "float8_e4m3fn_rowwise"


def test_exclude_custom_and_layer_config_rules(flux_ckpt, tmp_path):
    plan = _plan(
        flux_ckpt,
        exclude_layers=r"img_mlp\.2$",
        custom_layers=r"^double_blocks\.1\.img_attn",
        custom_format="int8_tensorwise",
    )
    t = _by_name(plan)
    assert t["double_blocks.0.img_mlp.2.weight"].action == "keep"
    assert "--exclude-layers" in t["double_blocks.0.img_mlp.2.weight"].reason
    assert t["double_blocks.1.img_attn.qkv.weight"].format == "int8_tensorwise"
    assert t["double_blocks.0.img_attn.qkv.weight"].format == "float8_e4m3fn"

    config = tmp_path / "layers.json"
    config.write_text(
        json.dumps(
            {"img_mlp": {"format": "int8_tensorwise"}, r"img_mlp\.0": {"skip": True}, "_default": {"format": "fp8"}}
        )
    )
    t = _by_name(_plan(flux_ckpt, layer_rules=load_layer_config(config)))
    assert t["double_blocks.0.img_mlp.0.weight"].action == "keep"  # the longer pattern wins
    assert t["double_blocks.0.img_mlp.2.weight"].format == "int8_tensorwise"
    assert t["double_blocks.0.img_attn.qkv.weight"].format == "float8_e4m3fn"


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "cannot read JSON"),
        ('{"a": {"format": "fp4"}}', 'needs "skip": true or a format'),
        ('{"(": {"format": "fp8"}}', "not a valid regex"),
        ('{"a": {"format": "int8_blockwise", "block_size": 48}}', "block_size must be"),
    ],
)
def test_bad_layer_config_is_rejected(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_layer_config(path)


def test_plan_hash_is_deterministic_and_sensitive(flux_ckpt):
    a = _plan(flux_ckpt).plan_hash()
    assert a == _plan(flux_ckpt).plan_hash()
    assert a != _plan(flux_ckpt, format="int8_tensorwise").plan_hash()
    other = LearnedRoundingConfig(objective="svd", seed=3)
    assert a != _plan(flux_ckpt, rounding=other).plan_hash()


def test_already_quantized_or_integer_only_input_is_refused(tmp_path):
    path = tmp_path / "q.safetensors"
    save_file(
        {"a.weight": torch.zeros(4, 4, dtype=torch.int8), "a.comfy_quant": torch.zeros(3, dtype=torch.uint8)}, str(path)
    )
    with pytest.raises(ValueError, match="already a quantized ComfyUI checkpoint"):
        _plan(path)
    path2 = tmp_path / "i.safetensors"
    save_file({"ids": torch.arange(4)}, str(path2))
    with pytest.raises(ValueError, match="no floating-point tensors"):
        _plan(path2)


def test_t5_plan_removes_decoder(tmp_path):
    path = tmp_path / "t5.safetensors"
    save_file(
        {
            "shared.weight": torch.randn(64, 32),
            "encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(32, 32),
            "encoder.block.0.layer.0.layer_norm.weight": torch.randn(32),
            "decoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(32, 32),
            "lm_head.weight": torch.randn(64, 32),
        },
        str(path),
    )
    plan = _plan(path)
    assert plan.preset.name == "t5xxl"
    t = _by_name(plan)
    assert t["decoder.block.0.layer.0.SelfAttention.q.weight"].action == "remove"
    assert t["lm_head.weight"].action == "remove"
    assert t["shared.weight"].action == "keep"
    assert [q.layer for q in plan.quantized] == ["encoder.block.0.layer.0.SelfAttention.q"]
    assert all(not e.name.startswith("decoder") for e in plan.entries)


def test_estimated_size_is_the_exact_output_size(flux_ckpt, tmp_path):
    from lrq_ao.convert.engine import RunOptions, convert

    plan = _plan(flux_ckpt, format="int8_blockwise", block_size=64, rounding=LearnedRoundingConfig(objective="rtn"))
    report = convert(plan, tmp_path / "o.safetensors", RunOptions(quiet=True))
    assert plan.output_bytes == (tmp_path / "o.safetensors").stat().st_size == report.output_bytes


def test_metadata_header_is_optional(flux_ckpt):
    plan = _plan(flux_ckpt, metadata_header=False)
    assert cf.METADATA_KEY not in plan.metadata
    assert "lrq_ao" in plan.metadata  # our own provenance entry is always written
