"""The MiniLM quality harness: real all-MiniLM-L6-v2 weights, real text, SQNR reports.

Typical use (quantize a copy, then compare it to the float model)::

    import copy
    from lrq_ao.quality import evaluate, format_table, load_minilm

    fp = load_minilm()
    q = copy.deepcopy(fp)
    lrq_ao.quantize_(q, LearnedRoundingConfig(format="int8"))
    print(format_table(evaluate(fp, q)))

``import lrq_ao`` does not import this subpackage.
"""

from lrq_ao.quality.baseline import Floor, fake_quantize_rtn, format_floors, measure_rtn_floors, rtn_weight_sqnrs
from lrq_ao.quality.metrics import (
    LayerQuality,
    QualityReport,
    SqnrAccumulator,
    evaluate,
    format_table,
    model_bytes,
    tensor_bytes,
    weight_sqnr,
)
from lrq_ao.quality.minilm import (
    MiniLM,
    MiniLMConfig,
    encoder_linear_names,
    load_minilm,
    minilm_dir,
    sentence_embeddings,
)
from lrq_ao.quality.texts import (
    Batch,
    calibrate_on_text,
    calibration_batches,
    calibration_sentences,
    evaluation_batches,
    evaluation_sentences,
    tokenize,
)

__all__ = [
    "Batch",
    "calibrate_on_text",
    "Floor",
    "LayerQuality",
    "MiniLM",
    "MiniLMConfig",
    "QualityReport",
    "SqnrAccumulator",
    "calibration_batches",
    "calibration_sentences",
    "encoder_linear_names",
    "evaluate",
    "evaluation_batches",
    "evaluation_sentences",
    "fake_quantize_rtn",
    "format_floors",
    "format_table",
    "load_minilm",
    "measure_rtn_floors",
    "minilm_dir",
    "model_bytes",
    "rtn_weight_sqnrs",
    "sentence_embeddings",
    "tensor_bytes",
    "tokenize",
    "weight_sqnr",
]
