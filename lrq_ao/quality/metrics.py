"""Quality of a quantized MiniLM against its float32 original: per-linear weight SQNR, per-linear output SQNR and
end-to-end final-hidden-state SQNR, all in dB via ``lrq_ao.primitives.sqnr``'s definition.

``evaluate`` does not care how the model was quantized: a linear's weight may be a plain tensor (e.g. fake-quantized
with ``dequantize(quantize_rtn(w))``) or any tensor subclass with a ``dequantize()`` method (``Float8Tensor``,
``Int8Tensor``). Models are matched by module name, so quantize a ``copy.deepcopy`` of the float model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lrq_ao.primitives import sqnr
from lrq_ao.quality.minilm import encoder_linear_names, sentence_embeddings
from lrq_ao.quality.texts import Batch, evaluation_batches


def dequantized_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight as a plain float32 tensor (tensor subclasses are dequantized)."""
    if hasattr(weight, "dequantize") and type(weight) not in (torch.Tensor, nn.Parameter):
        return weight.dequantize(torch.float32)
    return weight.detach().float()


def weight_sqnr(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """SQNR (dB) of a (possibly quantized) weight against the float weight it came from."""
    if tuple(reference.shape) != tuple(quantized.shape):
        raise ValueError(
            f"weight shapes differ: reference {tuple(reference.shape)}, quantized {tuple(quantized.shape)}"
        )
    return sqnr(reference.detach().float(), dequantized_weight(quantized))


class SqnrAccumulator:
    """SQNR of concatenated pairs without keeping them: ``20 log10(‖ref‖ / ‖ref − approx‖)`` over everything added,
    equal to ``primitives.sqnr`` on the concatenation. Energies are summed in float64."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference: torch.Tensor, approx: torch.Tensor) -> None:
        ref = reference.double()
        self.signal += float(ref.square().sum())
        self.noise += float((ref - approx.double()).square().sum())

    @property
    def db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(self.signal / self.noise)


@dataclass
class LayerQuality:
    """One linear: weight SQNR; output SQNR with the float model's input (``isolated``: this layer's error alone);
    output SQNR inside the quantized model (``in_context``: all upstream errors included)."""

    name: str
    shape: tuple[int, int]
    weight_sqnr: float
    output_sqnr_isolated: float
    output_sqnr_in_context: float


@dataclass
class QualityReport:
    """Per-layer qualities, the end-to-end SQNR of the final hidden state over non-padding tokens, and the cosine
    similarity between the float and quantized sentence embeddings (mean-pooled, normalised), mean and worst over
    the evaluation sentences."""

    layers: list[LayerQuality]
    end_to_end_sqnr: float
    num_tokens: int
    label: str = ""
    embedding_cosine_mean: float = math.nan
    embedding_cosine_min: float = math.nan
    extra: dict = field(default_factory=dict)

    def _values(self, attr: str) -> list[float]:
        return [getattr(layer, attr) for layer in self.layers]

    @property
    def median_weight_sqnr(self) -> float:
        return statistics.median(self._values("weight_sqnr"))

    @property
    def min_weight_sqnr(self) -> float:
        return min(self._values("weight_sqnr"))

    @property
    def median_output_sqnr(self) -> float:
        return statistics.median(self._values("output_sqnr_isolated"))

    @property
    def worst_layer(self) -> LayerQuality:
        return min(self.layers, key=lambda layer: layer.weight_sqnr)

    def summary(self) -> dict[str, float]:
        return {
            "median_weight_sqnr": self.median_weight_sqnr,
            "min_weight_sqnr": self.min_weight_sqnr,
            "median_output_sqnr": self.median_output_sqnr,
            "end_to_end_sqnr": self.end_to_end_sqnr,
            "embedding_cosine_mean": self.embedding_cosine_mean,
            "embedding_cosine_min": self.embedding_cosine_min,
        }


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor; for a tensor subclass (``__tensor_flatten__``), the sum of its inner tensors
    (``qdata`` + ``scale``)."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        inner_names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in inner_names)
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module, names: Iterable[str] | None = None) -> int:
    """Bytes of all parameters and buffers of ``model``, or only of the weights of the modules in ``names``."""
    if names is not None:
        return sum(tensor_bytes(model.get_submodule(name).weight) for name in names)
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(tensor_bytes(t) for t in tensors.values())


def format_table(report: QualityReport) -> str:
    """A per-layer table followed by the medians and the end-to-end SQNR."""
    width = max(len(layer.name) for layer in report.layers)
    lines = [f"{'layer':<{width}}  {'shape':>10}  {'weight dB':>9}  {'out dB':>7}  {'in-ctx dB':>9}"]
    for layer in report.layers:
        shape = f"{layer.shape[0]}x{layer.shape[1]}"
        lines.append(
            f"{layer.name:<{width}}  {shape:>10}  {layer.weight_sqnr:9.2f}  {layer.output_sqnr_isolated:7.2f}"
            f"  {layer.output_sqnr_in_context:9.2f}"
        )
    lines.append(
        f"{report.label or 'model'}: median weight {report.median_weight_sqnr:.2f} dB (min "
        f"{report.min_weight_sqnr:.2f} at {report.worst_layer.name}), median output {report.median_output_sqnr:.2f} "
        f"dB, end-to-end {report.end_to_end_sqnr:.2f} dB over {report.num_tokens} tokens; sentence embedding cosine "
        f"mean {report.embedding_cosine_mean:.5f}, min {report.embedding_cosine_min:.5f}"
    )
    return "\n".join(lines)


@contextmanager
def _capture_linears(model: nn.Module, names: list[str], inputs: dict | None, outputs: dict):
    """Record each named linear's output (and input, if ``inputs`` is a dict) during forwards inside the block."""

    def hook_for(name: str) -> Callable:
        def hook(module, args, output):
            if inputs is not None:
                inputs[name] = args[0].detach()
            outputs[name] = output.detach()

        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _linears_to_compare(model_fp: nn.Module, model_q: nn.Module) -> list[str]:
    names = encoder_linear_names(model_fp)
    if not names:
        raise ValueError("the float model has no encoder.* nn.Linear modules to compare; pass a MiniLM model")
    q_modules = dict(model_q.named_modules())
    missing = [n for n in names if n not in q_modules]
    if missing:
        raise ValueError(
            f"the quantized model lacks modules {missing[:3]}...; quantize a copy.deepcopy of the float model so "
            f"module names match"
        )
    return names


@torch.no_grad()
def evaluate(
    model_fp: nn.Module, model_q: nn.Module, batches: Iterable[Batch] | None = None, label: str = ""
) -> QualityReport:
    """Compare ``model_q`` to ``model_fp`` (the float32 MiniLM) on ``batches`` (default: the evaluation split).

    Output SQNRs and the end-to-end SQNR count only non-padding tokens. Raises ``ValueError`` if the models'
    linear names or shapes do not match.
    """
    names = _linears_to_compare(model_fp, model_q)
    batches = evaluation_batches() if batches is None else list(batches)
    isolated = {n: SqnrAccumulator() for n in names}
    in_context = {n: SqnrAccumulator() for n in names}
    final_fp: list[torch.Tensor] = []
    final_q: list[torch.Tensor] = []
    cosines: list[torch.Tensor] = []
    for batch in batches:
        valid = batch.attention_mask.bool()
        fp_in: dict[str, torch.Tensor] = {}
        fp_out: dict[str, torch.Tensor] = {}
        q_out: dict[str, torch.Tensor] = {}
        with _capture_linears(model_fp, names, fp_in, fp_out):
            y_fp = model_fp(*batch)
        with _capture_linears(model_q, names, None, q_out):
            y_q = model_q(*batch)
        for name in names:
            linear_q = model_q.get_submodule(name)
            # The float input, in the quantized layer's activation dtype (a bf16 model takes bf16 inputs).
            alone = linear_q(fp_in[name].to(linear_q.weight.dtype))
            isolated[name].add(fp_out[name][valid], alone[valid])
            in_context[name].add(fp_out[name][valid], q_out[name][valid])
        emb_fp, emb_q = (sentence_embeddings(y, batch.attention_mask) for y in (y_fp, y_q))
        cosines.append((emb_fp.double() * emb_q.double()).sum(dim=-1))
        final_fp.append(y_fp[valid])
        final_q.append(y_q[valid])
    if not final_fp:
        raise ValueError("evaluate() got no batches")
    layers = [
        LayerQuality(
            name=name,
            shape=tuple(model_fp.get_submodule(name).weight.shape),
            weight_sqnr=weight_sqnr(model_fp.get_submodule(name).weight, model_q.get_submodule(name).weight),
            output_sqnr_isolated=isolated[name].db,
            output_sqnr_in_context=in_context[name].db,
        )
        for name in names
    ]
    y_fp_all, y_q_all = torch.cat(final_fp), torch.cat(final_q)
    cos = torch.cat(cosines)
    return QualityReport(
        layers,
        sqnr(y_fp_all, y_q_all),
        y_fp_all.shape[0],
        label,
        embedding_cosine_mean=float(cos.mean()),
        embedding_cosine_min=float(cos.min()),
    )
