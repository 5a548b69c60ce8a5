"""Model-family presets: which tensors stay high-precision, which are removed, and how a family is recognized.

Patterns are matched on whole dotted name components, never as loose substrings: the pattern ``norm`` matches
``blocks.0.norm.weight`` but not ``blocks.0.normalizer.weight``, and ``txt_in`` matches ``txt_in.linear.weight`` but
not ``ctxt_in.weight``. A pattern with dots (``img_mod.1``) must match that many consecutive components; a ``*``
component matches any single component. Checkpoint prefixes such as ``model.diffusion_model.`` are harmless because
matching looks at any position.

Detection looks at key names (and a few shapes) and returns the family with the reason it was chosen; a preset flag
given by the user always wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Components that name layers never worth quantizing in any family: normalization, embeddings and positional tables.
# 1-D tensors, biases and conv weights are excluded by shape/suffix rules in plan.py, not by name.
COMMON_KEEP = (
    "norm",
    "norm1",
    "norm2",
    "norm3",
    "q_norm",
    "k_norm",
    "norm_q",
    "norm_k",
    "query_norm",
    "key_norm",
    "layernorm",
    "layer_norm",
    "LayerNorm",
    "final_layer_norm",
    "input_layernorm",
    "post_attention_layernorm",
    "embed_tokens",
    "embeddings",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "pos_embed",
    "relative_attention_bias",
)


@dataclass(frozen=True)
class Preset:
    """A model family's conversion rules.

    keep: name patterns left in high precision (on top of ``COMMON_KEEP``).
    remove: name patterns dropped from the output entirely (e.g. T5's decoder when only the encoder is used).
    markers: name patterns whose presence identifies the family (all must be present), checked in ``PRESETS`` order.
    """

    name: str
    help: str
    keep: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    markers: tuple[str, ...] = field(default=(), compare=False)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "t5xxl",
            "T5-XXL text encoder: keep norms and the shared embedding, remove the decoder and lm_head",
            keep=("shared",),
            remove=("decoder", "lm_head"),
            markers=("encoder.block.*.layer.*.SelfAttention.q",),
        ),
        Preset(
            "flux2",
            "Flux.2: keep modulation, guidance, time, input and final layers high-precision",
            keep=(
                "double_stream_modulation_img",
                "double_stream_modulation_txt",
                "single_stream_modulation",
                "guidance_in",
                "time_in",
                "final_layer",
                "img_in",
                "txt_in",
            ),
            markers=("double_stream_modulation_img",),
        ),
        Preset(
            "distillation_large",
            "Chroma (distilled guidance): keep distilled_guidance_layer, final layer, img_in/txt_in high-precision",
            keep=("distilled_guidance_layer", "final_layer", "img_in", "txt_in"),
            markers=("distilled_guidance_layer", "double_blocks"),
        ),
        Preset(
            "distillation_small",
            "Chroma, lighter: keep only distilled_guidance_layer high-precision",
            keep=("distilled_guidance_layer",),
        ),
        Preset(
            "hunyuan",
            "HunyuanVideo (1.0/1.5): keep attention norms, vision_in, img_in, token refiner norms high-precision",
            keep=(
                "img_attn_q_norm",
                "img_attn_k_norm",
                "txt_attn_q_norm",
                "txt_attn_k_norm",
                "vision_in",
                "img_in",
                "cond_type_embedding",
                "time_in",
                "guidance_in",
                "final_layer",
            ),
            markers=("txt_in.individual_token_refiner", "double_blocks"),
        ),
        Preset(
            "flux",
            "Flux.1 dev/schnell and derivatives: keep img_in, txt_in, time/guidance/vector inputs and final layer",
            keep=("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"),
            markers=("double_blocks.*.img_attn.qkv", "single_blocks"),
        ),
        Preset(
            "wan",
            "Wan 2.x video: keep patch/text/time embeddings, time projection and head high-precision",
            keep=(
                "patch_embedding",
                "text_embedding",
                "time_embedding",
                "time_projection",
                "head",
                "img_emb",
                "modulation",
                "audio_injector",
                "face_adapter",
                "face_encoder",
                "motion_encoder",
                "casual_audio_encoder",
                "cond_encoder",
                "frame_packer",
            ),
            markers=("blocks.*.self_attn.q", "blocks.*.cross_attn.k", "patch_embedding"),
        ),
        Preset(
            "qwen",
            "Qwen-Image: keep time_text_embed, img_in, txt_in, norm_out, proj_out and the first block's img_mod",
            keep=(
                "time_text_embed",
                "img_in",
                "txt_in",
                "norm_out",
                "proj_out",
                "txt_norm",
                "norm_added_q",
                "norm_added_k",
                "transformer_blocks.0.img_mod.1",
            ),
            markers=("transformer_blocks.*.img_mod.1", "txt_norm"),
        ),
        Preset(
            "zimage",
            "Z-Image (Lumina-2 style): keep x_embedder, cap_embedder, t_embedder, adaLN modulation, final layer",
            keep=(
                "x_embedder",
                "cap_embedder",
                "t_embedder",
                "adaLN_modulation",
                "final_layer",
                "cap_pad_token",
                "x_pad_token",
                "attention_norm1",
                "attention_norm2",
                "ffn_norm1",
                "ffn_norm2",
            ),
            markers=("cap_embedder", "noise_refiner"),
        ),
        Preset(
            "ltxv",
            "LTX-Video: keep adaln_single, patchify_proj, proj_out, caption projection and scale-shift tables",
            keep=(
                "adaln_single",
                "patchify_proj",
                "proj_out",
                "caption_projection",
                "scale_shift_table",
                "audio_adaln_single",
                "audio_patchify_proj",
                "audio_proj_out",
                "vae",
                "vocoder",
            ),
            markers=("adaln_single", "patchify_proj"),
        ),
        Preset(
            "hidream",
            "HiDream-I1: keep x/t/p embedders, caption projection, final layer and the MoE gates",
            keep=("x_embedder", "t_embedder", "p_embedder", "caption_projection", "final_layer", "gate"),
            markers=("double_stream_blocks", "caption_projection"),
        ),
        Preset(
            "sd3",
            "SD3 / SD3.5 MMDiT: keep x/t/y embedders, context embedder and final layer",
            keep=("x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer"),
            markers=("joint_blocks.*.context_block.attn.qkv",),
        ),
        Preset(
            "bert",
            "BERT-style text encoders (MiniLM, CLIP-like): keep embeddings, norms and the pooler",
            keep=("pooler",),
            markers=("encoder.layer.*.attention.self.query",),
        ),
        Preset("generic", "No family rules: quantize every eligible 2-D linear weight except norms and embeddings"),
    )
}

# Reference-tool flag names that mean one of our presets.
PRESET_ALIASES = {"chroma": "distillation_large", "flux1": "flux", "lumina2": "zimage", "ltxv2": "ltxv"}


def _split(name: str) -> list[str]:
    return name.split(".")


def component_match(name: str, pattern: str) -> bool:
    """True if ``pattern``'s dotted components appear as consecutive whole components of ``name``."""
    parts = _split(name)
    pat = _split(pattern)
    for start in range(len(parts) - len(pat) + 1):
        if all(p == "*" or p == parts[start + i] for i, p in enumerate(pat)):
            return True
    return False


def first_match(name: str, patterns: Sequence[str]) -> str | None:
    """The first pattern of ``patterns`` that matches ``name`` on component boundaries, or None."""
    for pattern in patterns:
        if component_match(name, pattern):
            return pattern
    return None


def resolve_preset(name: str) -> Preset:
    """Look up a preset by name or reference-tool alias; raise ``ValueError`` listing the known ones."""
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def detect_preset(shapes: Mapping[str, Sequence[int]]) -> tuple[Preset, str]:
    """Guess the model family from tensor names. Returns ``(preset, reason)``; ``generic`` when nothing matches."""
    names = list(shapes)
    for preset in PRESETS.values():
        if not preset.markers:
            continue
        found = []
        for marker in preset.markers:
            hit = next((n for n in names if component_match(n, marker)), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return preset, "found " + ", ".join(repr(h) for h in found)
    return PRESETS["generic"], "no family markers found"
