import pytest

from lrq_ao.convert.presets import PRESETS, component_match, detect_preset, first_match, resolve_preset


@pytest.mark.parametrize(
    "name, pattern, expected",
    [
        ("blocks.0.norm.weight", "norm", True),
        ("blocks.0.normalizer.weight", "norm", False),
        ("blocks.0.layernorm_x.weight", "norm", False),
        ("txt_in.linear.weight", "txt_in", True),
        ("ctxt_in.weight", "txt_in", False),
        ("model.diffusion_model.img_in.weight", "img_in", True),
        ("transformer_blocks.0.img_mod.1.weight", "transformer_blocks.0.img_mod.1", True),
        ("transformer_blocks.10.img_mod.1.weight", "transformer_blocks.0.img_mod.1", False),
        ("transformer_blocks.0.img_mod.10.weight", "transformer_blocks.0.img_mod.1", False),
        ("encoder.block.3.layer.0.SelfAttention.q.weight", "encoder.block.*.layer.*.SelfAttention.q", True),
        ("decoder.block.3.layer.0.SelfAttention.q.weight", "encoder.block.*.layer.*.SelfAttention.q", False),
    ],
)
def test_component_match_is_on_whole_components(name, pattern, expected):
    assert component_match(name, pattern) is expected


def _keys(*names):
    return {n: (64, 64) for n in names}


# Minimal, real key names of each family (as found in the public checkpoints and ComfyUI's model detection).
FAMILIES = {
    "t5xxl": _keys("shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.0.x"),
    "flux2": _keys("double_blocks.0.img_attn.qkv.weight", "double_stream_modulation_img.lin.weight", "single_blocks"),
    "distillation_large": _keys(
        "distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.w"
    ),
    "hunyuan": _keys(
        "double_blocks.0.img_attn.qkv.weight", "txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight", "img_in.proj"
    ),
    "flux": _keys("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"),
    "wan": _keys("blocks.0.self_attn.q.weight", "blocks.0.cross_attn.k.weight", "patch_embedding.weight"),
    "qwen": _keys("transformer_blocks.0.img_mod.1.weight", "txt_norm.weight", "img_in.weight"),
    "zimage": _keys("cap_embedder.1.weight", "noise_refiner.0.attention.qkv.weight", "layers.0.attention.qkv.weight"),
    "ltxv": _keys("adaln_single.linear.weight", "patchify_proj.weight", "transformer_blocks.0.attn1.to_q.weight"),
    "hidream": _keys("double_stream_blocks.0.block.ff_i.gate.weight", "caption_projection.0.linear.weight"),
    "sd3": _keys("joint_blocks.0.context_block.attn.qkv.weight", "x_embedder.proj.weight"),
    "bert": _keys("encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_detection_recognizes_each_family(family):
    preset, reason = detect_preset(FAMILIES[family])
    assert preset.name == family, reason
    assert "found" in reason


def test_detection_falls_back_to_generic_with_reason():
    preset, reason = detect_preset(_keys("fc1.weight", "fc2.weight"))
    assert preset.name == "generic"
    assert "no family markers" in reason


def test_t5_preset_removes_decoder_and_lm_head_only_on_components():
    t5 = PRESETS["t5xxl"]
    assert first_match("decoder.block.0.layer.0.SelfAttention.q.weight", t5.remove) == "decoder"
    assert first_match("lm_head.weight", t5.remove) == "lm_head"
    assert first_match("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", t5.remove) is None
    assert first_match("encoder.final_decoder_ish.weight", t5.remove) is None


def test_resolve_preset_aliases_and_unknown_names():
    assert resolve_preset("chroma").name == "distillation_large"
    with pytest.raises(ValueError, match="unknown model preset 'sdxl'.*known presets"):
        resolve_preset("sdxl")
