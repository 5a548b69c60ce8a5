"""Calibration-only English text for the MiniLM harness, written for this project.

These paragraphs (package data ``data/corpus_calibration.txt``, in the format of ``corpus.py``) only ever feed the
calibration split (``lrq_ao.quality.texts.calibration_sentences``); the evaluation split stays exactly the
every-third-sentence slice of ``lrq_ao.quality.corpus``. They cover topics and registers the main corpus does not
(emails, dialogue, instructions, news reports, memories, law, accounting...).

Rules as for ``corpus.py``: every sentence unique, starting with a capital letter and ending with ``.``, ``?`` or
``!``; no abbreviations with a full stop followed by a space (the splitter would cut there).
"""

from __future__ import annotations

from lrq_ao.quality.corpus import read_paragraphs

CALIBRATION_PARAGRAPHS: tuple[str, ...] = read_paragraphs("corpus_calibration.txt")
