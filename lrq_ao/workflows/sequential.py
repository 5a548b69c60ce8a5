"""Sequential quantization: each stage of linears is rounded against the float model, on the inputs the already
quantized stages actually produce.

Plain calibration rounds every layer for the float model's inputs. Here the model is quantized stage by stage
(a stage = the linears that read one input tensor, e.g. q/k/v), in forward order; each layer's objective is its
output error against the *float* model's output, ``‖(W + E) x_q − W x_ref‖``, on the inputs ``x_q`` that the
already quantized stages produce — the rounding can compensate part of the error that earlier layers left in its
input. It compensates only as much of that drift as the calibration data pins down: the drift term is scaled per
layer by a James–Stein factor ``γ ∈ [0, 1]`` (``drift_trust_factor``; ``drift_trust=`` fixes it), whose noise
estimate comes from two halves of the calibration calls. Measured on MiniLM-L6 (DEVELOPMENT.md "Learned
rounding"): the best method on FP8 and INT8, ahead of plain calibrated rounding by 0.2–0.5 dB end to end.

    report = lrq_ao.quantize_sequential(model, LearnedRoundingConfig(format="int8"), batches,
                                        forward=lambda m, b: m(**b), token_mask=lambda b: b["attention_mask"])

Cost (``cache_inputs=True``, the default): every batch runs through the model and through a float copy of it
**once**. Each batch's forward pass runs on its own thread and stops at the first linear of every stage; when all
batches stand there, the stage's statistics are complete, the stage is quantized, and the passes go on to the next
stage with the quantized weights. Nothing is re-run. Memory: the float copy of the model plus, for every batch and
both models, the activations a forward pass holds at that point (for a transformer about the residual stream and
the attention mask of each batch, i.e. the calibration set's hidden states twice — what GPTQ-style block caching
holds too), and for the stage being quantized one set of statistics per distinct input: ``E[x xᵀ]``,
``E[d xᵀ]`` over all and over half of the calls, ``E[d dᵀ]``, and the held-out ``E[x xᵀ]`` (five K × K float32
matrices). Requirements: each linear runs at most once per forward pass (both paths: its input is paired with the
float model's once per pass), and the stages run in the order the first batch showed with each stage's linears
reading one tensor (true of feed-forward networks); otherwise a ``ValueError`` says so, and for the second
``cache_inputs=False`` (re-run the model for every stage: one calibration pass per stage) handles the model.
``forward`` runs on those threads under ``torch.no_grad()`` with the caller's current CUDA device; other
thread-local settings around the call (``torch.autocast``, a CUDA stream) do not reach it: set them inside
``forward``.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.rounding.calibration import Calibration, LinearStats, calibrate
from lrq_ao.rounding.objectives import needs_calibration

Forward = Callable[[nn.Module, Any], Any]
TokenMask = Callable[[Any], torch.Tensor | None]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def linear_stages(model: nn.Module, batch: Any, forward: Forward = _default_forward, filter_fn=None) -> list[list[str]]:
    """Names of the (accepted) linears grouped by the input tensor they read, in the order they first run."""
    order: list[str] = []
    by_input: dict[int, list[str]] = {}
    keep_alive: list[torch.Tensor] = []
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (filter_fn is None or filter_fn(mod, name)):

            def hook(mod, args, name=name):
                x = args[0]
                if name in order:
                    return
                order.append(name)
                keep_alive.append(x)
                by_input.setdefault(id(x), []).append(name)

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    stages, placed = [], set()
    for name in order:
        if name in placed:
            continue
        group = next(g for g in by_input.values() if name in g)
        stages.append(group)
        placed.update(group)
    return stages


def quantize_sequential(
    model: nn.Module,
    config: LearnedRoundingConfig,
    batches: Sequence[Any],
    *,
    forward: Forward = _default_forward,
    token_mask: TokenMask | None = None,
    filter_fn=None,
    holdout_every: int = 5,
    cache_inputs: bool = True,
    drift_trust: float | None = None,
):
    """Quantize ``model`` in place, stage by stage, against a float copy of itself; returns the
    ``QuantizationReport`` of ``lrq_ao.quantize_`` for all stages.

    ``forward(model, batch)`` runs one batch (default: ``model(**batch)`` for dicts, ``model(*batch)`` for tuples);
    ``token_mask(batch)`` returns the (B, T) mask of tokens to calibrate on (None: every token); ``holdout_every``
    is ``calibrate``'s held-out split (every k-th batch only measures, 0: none). ``cache_inputs=True`` runs every
    batch once (see the module docstring); ``False`` re-runs the whole model for every stage — the same result, one
    calibration pass per stage, for models the cached path refuses. ``drift_trust``: the fraction ``γ`` of the input
    drift to compensate in every layer (None: ``drift_trust_factor`` per layer; 0: round each layer for its own
    output on the quantized model's inputs; 1: the full drift); with ``config.compensate_drift=False`` no drift is
    compensated. Each report row carries its ``drift_trust``. Linears that never run are quantized without
    calibration statistics, as ``quantize_`` would. Raises ``ValueError`` for an empty ``batches`` or a model the
    sequential passes cannot follow (the message says what to use instead).
    """
    from lrq_ao.api import QuantizationReport, quantize_

    if not batches:
        raise ValueError("quantize_sequential needs at least one calibration batch")
    reference = copy.deepcopy(model).eval()
    stages = linear_stages(model, batches[0], forward, filter_fn)
    total = QuantizationReport()

    modules = dict(model.named_modules())

    def quantize_stage(stage: list[str], calib: Calibration) -> None:
        trust = {}
        if config.compensate_drift:
            trust = {name: _trust_drift(calib, name, modules[name].weight, drift_trust) for name in stage}
            for name, (_, st) in trust.items():
                calib.set_stats(name, st)
        accept = lambda m, n, names=set(stage): n in names  # noqa: E731
        layers = quantize_(model, dataclasses.replace(config, calibration=calib), filter_fn=accept).layers
        for layer in layers:
            layer["drift_trust"] = trust[layer["name"]][0] if layer["name"] in trust else None
        total.layers.extend(layers)

    args = (model, reference, stages, batches, forward, token_mask, holdout_every, quantize_stage)
    if cache_inputs:
        _run_stages_cached(*args)
    else:
        _run_stages_replayed(*args)
    done = {name for stage in stages for name in stage}
    rest = lambda m, n: n not in done and (filter_fn is None or filter_fn(m, n))  # noqa: E731
    # Linears that never ran have no statistics: round them to nearest unless the objective needs no data.
    objective = "rtn" if needs_calibration(config.objective) else config.objective
    part = quantize_(model, dataclasses.replace(config, calibration=None, objective=objective), filter_fn=rest)
    total.layers.extend(part.layers)
    total.skipped.extend((n, r) for n, r in part.skipped if r != "excluded by filter_fn")
    return total


def _run_stages_replayed(model, reference, stages, batches, forward, token_mask, holdout_every, quantize_stage):
    """One full pass of both models over every batch per stage."""
    for stage in stages:
        accept = lambda m, n, names=set(stage): n in names  # noqa: E731
        with calibrate(model, filter_fn=accept, reference=reference, holdout_every=holdout_every) as calib:
            for batch in batches:
                calib.token_mask = token_mask(batch) if token_mask is not None else None
                forward(reference, batch)
                forward(model, batch)
        quantize_stage(stage, calib)


def _run_stages_cached(model, reference, stages, batches, forward, token_mask, holdout_every, quantize_stage):
    """Every batch's forward pass through both models runs once, paused at each stage (module docstring).

    The statistics are accumulated in the same order as ``_run_stages_replayed`` (batch by batch, the reference's
    input paired with the model's), from the same tensors, so both paths give the same rounding."""
    stage_of = {name: i for i, stage in enumerate(stages) for name in stage}
    handles = _install_pause_hooks(model, stage_of) + _install_pause_hooks(reference, stage_of)
    passes = [(_PausedForward(reference, batch, forward), _PausedForward(model, batch, forward)) for batch in batches]
    try:
        for s, stage in enumerate(stages):
            calib = Calibration(holdout_every)
            calib.paired = True
            for batch, (ref_pass, model_pass) in zip(batches, passes, strict=True):
                x_ref, x = ref_pass.input_of_stage(s), model_pass.input_of_stage(s)
                if (x_ref is None) != (x is None):
                    raise ValueError(
                        f"quantize_sequential: stage {stage} ran in only one of the float and the quantized model "
                        f"for a batch; use cache_inputs=False"
                    )
                mask = token_mask(batch) if token_mask is not None else None
                calib.record_call({stage[0]: (x, x_ref)} if x is not None else {}, mask)
            for name in stage[1:]:  # the stage's other linears read the same tensor (checked in the hooks)
                calib.share(name, stage[0])
            quantize_stage(stage, calib)
    finally:
        for pair in passes:
            for p in pair:
                p.stop()
        for h in handles:
            h.remove()


_CURRENT = threading.local()  # the _PausedForward whose thread is running, if any


class _CannotCache(ValueError):
    """The model does something the cached path cannot follow; the message says what, and to use cache_inputs=False."""


class _Stopped(BaseException):
    """Raised inside a paused forward pass to unwind it when its statistics are no longer needed (a BaseException,
    so that a model's own ``except Exception`` does not swallow it)."""


class _PausedForward:
    """``forward(model, batch)`` on its own thread, stopping before the first linear of each stage runs.

    The main thread and the pass never run at the same time (a semaphore hand-off), so every statistic is
    accumulated in a fixed order and the main thread may change the model's weights while the pass waits."""

    def __init__(self, model: nn.Module, batch: Any, forward: Forward) -> None:
        self.stage = -1  # the stage whose first linear the pass stands at; len(stages) or more once finished
        self.finished = False
        self._input: torch.Tensor | None = None
        self._stage_inputs: dict[int, torch.Tensor] = {}
        self._ran: set[str] = set()
        self._error: BaseException | None = None
        self._stop = False
        self._go, self._paused = threading.Semaphore(0), threading.Semaphore(0)
        # The current CUDA device is per thread; carry the caller's over (without initializing CUDA).
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        self._thread = threading.Thread(target=self._main, args=(model, batch, forward), daemon=True)
        self._thread.start()

    def _main(self, model, batch, forward) -> None:
        _CURRENT.forward = self
        self._go.acquire()
        try:
            if not self._stop:
                if self._cuda_device is not None:
                    torch.cuda.set_device(self._cuda_device)
                with torch.no_grad():  # grad mode is per thread
                    forward(model, batch)
        except _Stopped:
            pass
        except BaseException as err:  # handed to the main thread by input_of_stage
            self._error = err
        self.finished, self._input, self._stage_inputs = True, None, {}
        self._paused.release()

    # -- in the pass's thread, from a linear's pre-hook ------------------------------------------------------
    def at_linear(self, name: str, stage: int, x: torch.Tensor, leads: bool) -> None:
        if self._stop:
            raise _Stopped
        if name in self._ran:
            raise _CannotCache(
                f"quantize_sequential: {name!r} ran twice in one forward pass; sequential quantization pairs each "
                f"linear's input with the float model's once per pass, so it cannot take this model: use "
                f"lrq_ao.calibrate(model) and lrq_ao.quantize_ instead"
            )
        self._ran.add(name)
        if not leads:
            if self._stage_inputs.get(stage) is not x:
                raise _CannotCache(
                    f"quantize_sequential: {name!r} did not read the same tensor as the first linear of its stage in "
                    f"this batch (stages come from the first batch); use cache_inputs=False for this model"
                )
            return
        if stage <= self.stage:
            raise _CannotCache(
                f"quantize_sequential: {name!r} (stage {stage}) ran after stage {self.stage} in this batch, not in the "
                f"first batch's order; use cache_inputs=False for this model"
            )
        self.stage, self._input, self._stage_inputs[stage] = stage, x, x
        self._stage_inputs.pop(stage - 1, None)
        self._paused.release()
        self._go.acquire()
        self._input = None
        if self._stop:
            raise _Stopped

    # -- in the main thread --------------------------------------------------------------------------------
    def input_of_stage(self, stage: int) -> torch.Tensor | None:
        """Run the pass until stage ``stage``'s first linear (earlier stages run with their current weights) and
        return that linear's input; None if the pass finished or went past it without running the stage."""
        if not self.finished and self.stage < stage:
            self._go.release()
            self._paused.acquire()
            if isinstance(self._error, _CannotCache):
                raise self._error
            if self._error is not None:
                raise RuntimeError(f"quantize_sequential: the forward pass failed: {self._error}") from self._error
        return self._input if self.stage == stage and not self.finished else None

    def stop(self) -> None:
        if not self.finished:
            self._stop = True
            self._go.release()
            self._paused.acquire()
        self._thread.join()


def _install_pause_hooks(model: nn.Module, stage_of: dict[str, int]) -> list:
    leaders = {}
    for name, stage in stage_of.items():
        leaders.setdefault(stage, name)
    handles = []
    for name, mod in model.named_modules():
        if name not in stage_of:
            continue

        def hook(mod, args, name=name, stage=stage_of[name]):
            current = getattr(_CURRENT, "forward", None)
            if current is not None:  # calls from other threads (the caller's own forward passes) pass through
                current.at_linear(name, stage, args[0], leads=leaders[stage] == name)

        handles.append(mod.register_forward_pre_hook(hook))
    return handles


def drift_trust_factor(w: torch.Tensor, stats: LinearStats, damp: float = 0.01) -> float:
    """How much of the measured input drift the rounding should compensate, ``γ ∈ [0, 1]`` (James–Stein).

    The compensation the drift-aware objective aims at is ``B H⁻¹`` with ``B = W·E[d xᵀ]`` estimated from ``n``
    rows; its size in the objective's metric is ``‖B̂‖²_{H⁻¹} = tr(B̂ H⁻¹ B̂ᵀ)``, and ``γ = 1 − noise / ‖B̂‖²_{H⁻¹}``
    (clamped to [0, 1]) removes the estimation noise's expected share: a drift that the input explains well is
    compensated nearly fully, a small or unpredictable one barely. The noise is measured from the two halves of
    the calibration calls when the statistics have them (``cross_half``): ``‖B̂₁ − B̂₂‖²_{H⁻¹}·n₁n₂/n²``, which
    holds for heavy-tailed inputs and tokens correlated within a batch; otherwise it is taken as
    ``tr(W E[d dᵀ] Wᵀ)·K/n`` (``d`` and ``x`` independent). ``damp`` is the solve's ridge (fraction of mean diag H).
    """
    h = stats.h.to(torch.float64)
    k = h.shape[0]
    w64 = w.detach().to(device=h.device, dtype=torch.float64)
    ridge = damp * h.diagonal().mean().clamp_min(1e-30)
    chol = torch.linalg.cholesky(h + ridge * torch.eye(k, dtype=torch.float64, device=h.device))

    def norm2(c: torch.Tensor) -> float:  # ‖W c‖²_{H⁻¹}
        b = w64 @ c.to(device=h.device, dtype=torch.float64)
        return float((b * torch.cholesky_solve(b.T, chol).T).sum())

    n = max(stats.count, 1)
    signal = norm2(stats.cross)
    if stats.cross_half is not None and 0 < stats.count_half < stats.count:
        n1, n2 = stats.count_half, stats.count - stats.count_half
        cross_other = (n * stats.cross.double() - n1 * stats.cross_half.double()) / n2
        noise = norm2(stats.cross_half.double() - cross_other) * n1 * n2 / n**2
    else:
        noise = float(((w64 @ stats.drift_h.to(torch.float64)) * w64).sum()) * k / n
    if signal <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - noise / signal))


def _trust_drift(
    calib: Calibration, name: str, weight: torch.Tensor, fixed: float | None
) -> tuple[float | None, LinearStats | None]:
    """The layer's statistics with its drift scaled by ``γ`` (``fixed``, else ``drift_trust_factor``): the target
    becomes ``x + γ·d`` instead of ``x_ref = x + d``, so ``cross`` scales by ``γ`` and ``drift_h`` by ``γ²``."""
    st = calib.stats(name)
    if st is None or st.cross is None:
        return None, st
    gamma = fixed if fixed is not None else drift_trust_factor(weight.float(), st)
    scaled = dataclasses.replace(
        st, cross=gamma * st.cross, drift_h=gamma**2 * st.drift_h, drift_mean=gamma * st.drift_mean
    )
    return gamma, scaled
