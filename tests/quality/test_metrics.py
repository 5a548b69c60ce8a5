"""evaluate() and its metrics against independent float64 computations."""

import copy
import math

import pytest
import torch

from lrq_ao.primitives import dequantize, format_spec, quantize_rtn, sqnr
from lrq_ao.quality.baseline import fake_quantize_rtn
from lrq_ao.quality.metrics import (
    SqnrAccumulator,
    evaluate,
    format_table,
    model_bytes,
    tensor_bytes,
    weight_sqnr,
)
from lrq_ao.quality.minilm import encoder_linear_names, load_minilm
from lrq_ao.quality.texts import evaluation_batches


def sqnr_f64(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return 10 * math.log10(float((ref**2).sum()) / float(((ref - approx) ** 2).sum()))


@pytest.fixture(scope="module")
def model():
    return load_minilm()


@pytest.fixture(scope="module")
def batches():
    return evaluation_batches(batch_size=12)[:2]


def test_accumulator_equals_sqnr_of_the_concatenation():
    g = torch.Generator().manual_seed(0)
    refs = [torch.randn(n, 7, generator=g) for n in (3, 11, 5)]
    approxs = [r + 0.01 * torch.randn(r.shape, generator=g) * (i + 1) for i, r in enumerate(refs)]
    acc = SqnrAccumulator()
    for r, a in zip(refs, approxs):
        acc.add(r, a)
    assert acc.db == pytest.approx(sqnr_f64(torch.cat(refs), torch.cat(approxs)), abs=1e-9)
    assert acc.db == pytest.approx(sqnr(torch.cat(refs), torch.cat(approxs)), abs=1e-9)
    exact = SqnrAccumulator()
    exact.add(refs[0], refs[0])
    assert exact.db == math.inf


def test_weight_sqnr_of_a_plain_tensor(model):
    w = model.encoder.layer[2].intermediate.dense.weight
    qdata, scale, bs = quantize_rtn(w, format_spec("int8"))
    w_dq = dequantize(qdata, scale, bs)
    assert weight_sqnr(w, w_dq) == pytest.approx(sqnr_f64(w, w_dq), abs=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        weight_sqnr(w, w_dq.T)


def test_identical_copy_is_lossless(model, batches):
    report = evaluate(model, copy.deepcopy(model), batches)
    assert len(report.layers) == 36
    assert report.num_tokens == sum(int(b.attention_mask.sum()) for b in batches)
    assert math.isinf(report.end_to_end_sqnr) and math.isinf(report.median_weight_sqnr)
    assert all(math.isinf(layer.output_sqnr_in_context) for layer in report.layers)
    assert report.embedding_cosine_min == pytest.approx(1.0, abs=1e-6)  # float32 normalisation


@torch.no_grad()
def test_rtn_report_against_direct_computation(model, batches):
    fake = fake_quantize_rtn(model, "int8_block")
    report = evaluate(model, fake, batches, label="int8_block")
    names = encoder_linear_names(model)
    assert [layer.name for layer in report.layers] == names
    for layer in report.layers:
        w = model.get_submodule(layer.name).weight
        assert layer.weight_sqnr == pytest.approx(sqnr_f64(w, fake.get_submodule(layer.name).weight), abs=1e-6)
    # End to end over real tokens only, recomputed without hooks.
    ref = torch.cat([model(*b)[b.attention_mask.bool()] for b in batches])
    got = torch.cat([fake(*b)[b.attention_mask.bool()] for b in batches])
    assert report.end_to_end_sqnr == pytest.approx(sqnr_f64(ref, got), abs=1e-6)
    assert 10 < report.end_to_end_sqnr < report.median_weight_sqnr
    # The first layer's q/k/v see the same (embedding) input in both models, so isolated == in context;
    # deeper layers carry upstream error, so in context is worse.
    by_name = {layer.name: layer for layer in report.layers}
    for p in ("query", "key", "value"):
        first = by_name[f"encoder.layer.0.attention.self.{p}"]
        assert first.output_sqnr_in_context == pytest.approx(first.output_sqnr_isolated, abs=1e-9)
    last = by_name["encoder.layer.5.attention.self.query"]
    assert last.output_sqnr_in_context < last.output_sqnr_isolated
    # Isolated output SQNR of one layer, recomputed from its captured float input.
    x = model.embeddings(*batches[0][::2])  # (input_ids, token_type_ids)
    lin_fp, lin_q = model.encoder.layer[0].attention.self.value, fake.encoder.layer[0].attention.self.value
    valid = batches[0].attention_mask.bool()
    acc = SqnrAccumulator()
    acc.add(lin_fp(x)[valid], lin_q(x)[valid])
    partial = evaluate(model, fake, batches[:1])
    assert partial.layers[2].output_sqnr_isolated == pytest.approx(acc.db, abs=1e-6)


def test_report_table_and_summary(model, batches):
    report = evaluate(model, fake_quantize_rtn(model, "fp8"), batches, label="fp8")
    table = format_table(report)
    assert all(name in table for name in encoder_linear_names(model))
    assert f"{report.end_to_end_sqnr:.2f}" in table and table.count("\n") == 37
    summary = report.summary()
    assert summary["min_weight_sqnr"] <= summary["median_weight_sqnr"]
    assert report.worst_layer.weight_sqnr == summary["min_weight_sqnr"]


def test_mismatched_models_are_rejected(model):
    with pytest.raises(ValueError, match="deepcopy"):
        evaluate(model, torch.nn.Sequential(), [])


def test_sizes_count_storage_bytes(model):
    params = sum(p.numel() for p in model.parameters())
    assert model_bytes(model) == 4 * params
    names = encoder_linear_names(model)
    assert model_bytes(model, names) == 4 * 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert tensor_bytes(torch.zeros(3, 5, dtype=torch.float8_e4m3fn)) == 15


@pytest.mark.parametrize("fmt", ["fp8", "int8_block"])
def test_tensor_subclass_weights_match_fake_quantization(model, batches, fmt):
    """Weights held as Float8Tensor/Int8Tensor are dequantized for weight SQNR and sized as qdata + scale."""
    from lrq_ao.layouts import make_weight_tensor

    spec = format_spec(fmt)
    quantized = copy.deepcopy(model)
    expected_bytes = 0
    for name in encoder_linear_names(quantized):
        linear = quantized.get_submodule(name)
        qdata, scale, block_size = quantize_rtn(linear.weight, spec)
        linear.weight = torch.nn.Parameter(make_weight_tensor(qdata, scale, block_size, torch.float32), False)
        expected_bytes += qdata.numel() + 4 * scale.numel()
    assert model_bytes(quantized, encoder_linear_names(quantized)) == expected_bytes
    report = evaluate(model, quantized, batches)
    reference = evaluate(model, fake_quantize_rtn(model, fmt), batches)
    for got, want in zip(report.layers, reference.layers):
        assert got.weight_sqnr == pytest.approx(want.weight_sqnr, abs=1e-6)
        assert got.output_sqnr_isolated == pytest.approx(want.output_sqnr_isolated, abs=0.01)
    assert report.end_to_end_sqnr == pytest.approx(reference.end_to_end_sqnr, abs=0.05)


def test_a_bfloat16_model_is_compared_in_its_own_dtype(model, batches):
    bf16 = load_minilm(torch.bfloat16)
    report = evaluate(model, bf16, batches)
    # Rounding to 8 significant bits leaves a relative error of about 2^-9.3 RMS, i.e. roughly 56 dB.
    assert 53.0 < report.median_weight_sqnr < 58.0
    assert 45.0 < report.median_output_sqnr < report.median_weight_sqnr
    assert 30.0 < report.end_to_end_sqnr < report.median_output_sqnr


@torch.no_grad()
def test_embedding_cosines_against_direct_computation(model, batches):
    from lrq_ao.quality.minilm import sentence_embeddings

    fake = fake_quantize_rtn(model, "int8_tensor")  # the format that hurts most, so cosines are clearly < 1
    report = evaluate(model, fake, batches)
    cos = torch.cat(
        [(sentence_embeddings(model(*b), b[1]) * sentence_embeddings(fake(*b), b[1])).sum(-1) for b in batches]
    ).double()
    assert report.embedding_cosine_mean == pytest.approx(float(cos.mean()), abs=1e-6)
    assert report.embedding_cosine_min == pytest.approx(float(cos.min()), abs=1e-6)
    assert 0.5 < report.embedding_cosine_min < report.embedding_cosine_mean < 1.0
