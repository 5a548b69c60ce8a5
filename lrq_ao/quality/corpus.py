"""Plain English paragraphs on varied topics, written for this project, used as calibration and evaluation text.

The text lives in ``data/corpus.txt`` (package data): one paragraph per block, blocks separated by a blank line, a
block's lines joined with one space, ``#`` lines (the topic of each paragraph) left out. ``lrq_ao.quality.texts``
splits the paragraphs into sentences and the sentences into two disjoint splits. Edit freely, but keep every
sentence unique (a test checks it) and ending with ``.``, ``?`` or ``!``; the evaluation split is pinned by
``tests/quality/test_texts.py``, so changing any of its sentences changes every published held-out number.
"""

from __future__ import annotations

from importlib import resources


def read_paragraphs(filename: str) -> tuple[str, ...]:
    """The paragraphs of ``lrq_ao/quality/data/<filename>``, in order (format in the module docstring)."""
    text = resources.files("lrq_ao.quality").joinpath("data", filename).read_text(encoding="utf-8")
    paragraphs = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line and not line.startswith("#")]
        if lines:
            paragraphs.append(" ".join(lines))
    return tuple(paragraphs)


PARAGRAPHS: tuple[str, ...] = read_paragraphs("corpus.txt")
