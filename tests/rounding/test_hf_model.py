"""One line on a Hugging Face model: calibrate MiniLM (transformers AutoModel, packaged weights) on a few real
sentences, quantize_ with the calibration-aware objective, and run it under torch.compile."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF check needs transformers (pip install '.[test]')")


@pytest.mark.slow
def test_quantize_hf_minilm_with_calibration_and_compile():
    from lrq_ao import LearnedRoundingConfig, calibrate, quantize_
    from lrq_ao.primitives import sqnr
    from lrq_ao.quality.minilm import minilm_dir
    from lrq_ao.quality.texts import calibration_sentences, evaluation_sentences

    folder = minilm_dir()
    model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="[PAD]")
    calib_inputs = tok(calibration_sentences()[:16], padding=True, return_tensors="pt")
    eval_inputs = tok(evaluation_sentences()[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(**eval_inputs).last_hidden_state
        with calibrate(model) as calib:
            calib.token_mask = calib_inputs["attention_mask"]
            model(**calib_inputs)

    report = quantize_(model, LearnedRoundingConfig(format="int8", objective="output", calibration=calib))
    assert len(report.layers) >= 36 and all(layer["objective"] == "output" for layer in report.layers[:36])
    assert all(layer["objective_final"] <= layer["objective_rtn"] for layer in report.layers[:36])

    compiled = torch.compile(model)
    with torch.no_grad():
        out = compiled(**eval_inputs).last_hidden_state
    keep = eval_inputs["attention_mask"].bool()
    assert sqnr(reference[keep], out[keep]) > 25.0  # INT8 per-row RTN on MiniLM is ~31 dB end to end
