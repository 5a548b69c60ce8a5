"""Choosing the rounding of a weight with fixed scales: round-to-nearest, or learned rounding under an objective.

``quantize_weights`` is the entry point the API (``quantize_``) and the converter call: it rounds each weight as
below and decides by itself which same-shape weights to round together in one batch (``quantize_weight`` is the
same for one weight). The scales are always the format's round-to-nearest scales (``WeightFormat.compute_scales``);
only the per-element choice among the element's values changes. A format that rotates its input (ConvRot) is
rounded in its rotated basis, with the calibration statistics rotated alike (``rotate_stats``). Pipeline (all on
``config.device`` or the weight's device):

1. round-to-nearest (exactly ``WeightFormat.quantize``);
2. the objective (``svd``, ``output``, ``act_svd``; the table ``objectives.OBJECTIVE_KINDS``);
3. the start (RTN, or GPTQ error feedback for calibration-aware objectives; the better of the two is kept);
4. the relaxation (``greedy`` coordinate descent, or the gradient loop with ``ste`` / ``sigmoid`` /
   ``continuous``);
5. RTN is kept if the result is not strictly better on the objective (``fallback_to_rtn``), and reported.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.formats import QuantizedWeight, WeightFormat
from lrq_ao.primitives import sqnr
from lrq_ao.rounding.calibration import Calibration, LinearStats, calibrate, stats_for
from lrq_ao.rounding.gptq import gptq_indices
from lrq_ao.rounding.greedy import greedy_refine, parallel_refine
from lrq_ao.rounding.grid import Grid, full_scale
from lrq_ao.rounding.loop import LoopSettings, default_lr, optimize_rounding
from lrq_ao.rounding.objectives import OBJECTIVE_KINDS, Objective, svd_rank, truncated_svd

__all__ = [
    "Calibration",
    "LinearStats",
    "RoundedWeight",
    "calibrate",
    "quantize_weight",
    "quantize_weights",
    "resolve_method",
    "stats_for",
]


@dataclass
class RoundedWeight:
    """A weight quantized with fixed scales: ``qdata`` (the format's stored codes), float32 ``scale`` grid
    ``(N // bn, K // bk)``, the ``block_size`` (bn, bk), a per-layer ``report`` dict, ``bias_delta``
    ``(W_dq − W)·E[x]`` (N,) when bias correction was asked for (the caller sets ``bias ← bias − bias_delta``),
    and the format's ``scale2`` / ``extra`` tensors and the format itself (``fmt``)."""

    qdata: torch.Tensor
    scale: torch.Tensor
    block_size: tuple[int, int]
    report: dict = field(default_factory=dict)
    bias_delta: torch.Tensor | None = None
    scale2: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    fmt: WeightFormat | None = None

    def quantized_weight(self) -> QuantizedWeight:
        """The format-level weight (what ``lrq_ao.layouts.weight_tensor`` and the ComfyUI writer take)."""
        return QuantizedWeight(self.qdata, self.scale, self.block_size, self.scale2, dict(self.extra))


def _rounded(qw: QuantizedWeight, fmt: WeightFormat, report: dict, bias_delta=None, qdata=None) -> RoundedWeight:
    q = qw.qdata if qdata is None else qdata
    return RoundedWeight(q, qw.scale, qw.block_size, report, bias_delta, qw.scale2, dict(qw.extra), fmt)


def rotate_stats(fmt: WeightFormat, stats: LinearStats | None) -> LinearStats | None:
    """The statistics of the inputs in the basis the format stores codes in (identity unless it rotates): every
    ``K x K`` moment becomes ``Rᵀ Σ R`` and every mean ``μ R``, so objectives, GPTQ and bias correction apply
    unchanged to the rotated weight (the rotation is orthogonal: ``x Wᵀ = (x R)(W R)ᵀ``)."""
    if stats is None or not fmt.rotates:
        return stats
    moment = lambda m: None if m is None else fmt.rotate_hessian(m.float())  # noqa: E731
    mean = lambda v: None if v is None else fmt.rotate_mean(v.float())  # noqa: E731
    return dataclasses.replace(
        stats,
        h=moment(stats.h),
        mean=mean(stats.mean),
        cross=moment(stats.cross),
        drift_h=moment(stats.drift_h),
        drift_mean=mean(stats.drift_mean),
        h_holdout=moment(stats.h_holdout),
        cross_half=moment(stats.cross_half),
    )


def resolve_method(config: LearnedRoundingConfig, has_stats: bool) -> tuple[str, str, str]:
    """``(objective, init, relaxation)`` after resolving ``auto``."""
    objective = config.objective
    if objective == "auto":
        # Without calibration data nothing we measured beats round-to-nearest end to end (the reference's svd
        # objective loses; see DEVELOPMENT.md "Learned rounding"), so auto means RTN there.
        objective = "output" if has_stats else "rtn"
    kind = OBJECTIVE_KINDS[objective]
    init = kind.default_init if config.init == "auto" else config.init
    relaxation = kind.default_relaxation if config.relaxation == "auto" else config.relaxation
    return objective, init, relaxation


def _build_objective(objective: str, w: torch.Tensor, stats: LinearStats | None, cfg, name: str) -> Objective:
    kind = OBJECTIVE_KINDS[objective]
    h = None
    if kind.needs_calibration:
        if stats is None:
            raise ValueError(
                f"objective {objective!r} for layer {name!r} needs calibration statistics, but none were given for "
                f"it: run lrq_ao.calibrate(model) over real inputs and pass calibration=..., or use objective='svd'"
            )
        h = shrunk_h(stats.h.to(device=w.device, dtype=torch.float32), shrinkage_for(cfg, stats))
        if h.shape != (w.shape[1], w.shape[1]):
            raise ValueError(
                f"calibration statistics for {name!r} are {tuple(h.shape)}, expected K×K with K={w.shape[1]}"
            )
    return kind.build(w, h, stats, cfg)


def shrinkage_for(config: LearnedRoundingConfig, stats: LinearStats) -> float:
    """``config.shrinkage``, or when negative the data-size rule ``K / (K + count)``: the fewer calibration rows per
    input feature, the less the off-diagonal of ``H`` is trusted."""
    if config.shrinkage >= 0:
        return config.shrinkage
    k = stats.h.shape[0]
    return k / (k + max(stats.count, 1))


def shrunk_h(h: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 − α)·H + α·diag(H)``: shrink the calibration second moment towards its diagonal.

    A few thousand calibration tokens estimate the K² off-diagonal entries of ``H`` poorly; rounding that trusts them
    fully fits the calibration text (see DEVELOPMENT.md "Learned rounding"). ``α = 1`` makes the objective
    separable, whose optimum is round-to-nearest; ``α = 0`` is plain GPTQ.
    """
    if alpha <= 0:
        return h
    return (1 - alpha) * h + alpha * torch.diag(h.diagonal())


def quantize_weight(
    weight: torch.Tensor, config: LearnedRoundingConfig, *, name: str = "weight", stats: LinearStats | None = None
) -> RoundedWeight:
    """Quantize one 2-D weight as ``config`` says: ``quantize_weights`` for a single weight. ``stats`` are the
    layer's calibration statistics, if any.

    Returns a ``RoundedWeight`` on the weight's device. Raises ``ValueError`` naming ``name`` for NaN/Inf, a
    non-2-D weight, a shape the block layout cannot tile, or a calibration-aware objective without statistics.
    """
    return quantize_weights([weight], config, names=[name], stats=[stats])[0]


def _round_one(
    weight: torch.Tensor, config: LearnedRoundingConfig, name: str, stats: LinearStats | None
) -> RoundedWeight:
    """The rounding of one weight on its own (the module docstring's pipeline)."""
    t0 = time.perf_counter()
    fmt = config.spec
    qw = fmt.quantize(weight, name)  # round-to-nearest, in the basis the format stores (rotated where it rotates)
    objective, init, relaxation = resolve_method(config, stats is not None)
    report = {"name": name, "format": config.format, "objective": objective, "shape": tuple(weight.shape)}
    w_cpu_dev = weight.device
    dev = torch.device(config.device) if config.device is not None else weight.device
    w = fmt.rotate_weight(weight.detach().to(device=dev, dtype=torch.float32))
    stats = rotate_stats(fmt, stats)
    no_grid = fmt.rounding_refusal()
    if no_grid is not None and OBJECTIVE_KINDS[objective].build is not None:
        report["note"] = f"round-to-nearest: {no_grid}"
    # An all-zero weight quantizes to zeros exactly.
    if OBJECTIVE_KINDS[objective].build is None or no_grid is not None or not bool(w.any()):
        w_dq = fmt.dequantize(_on(qw, dev))
        report.update(weight_sqnr_db=sqnr(w, w_dq), objective_rtn=None, objective_final=None, kept_rtn=True)
        report.update(_heldout_report(w, w_dq, w_dq, stats))
        report.update(moved_fraction=0.0, init="rtn", relaxation="none", seconds=time.perf_counter() - t0)
        return _rounded(qw, fmt, report, _bias_delta(config, stats, w, w_dq - w, dev, w_cpu_dev))

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(config.seed)  # svd_lowrank and the relaxations draw random numbers
        return _learned_rounding(w, fmt, qw, config, objective, init, relaxation, stats, report, t0)


def _on(qw: QuantizedWeight, dev: torch.device) -> QuantizedWeight:
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    return QuantizedWeight(
        qw.qdata.to(dev), qw.scale.to(dev), qw.block_size, to(qw.scale2), {k: v.to(dev) for k, v in qw.extra.items()}
    )


def _grid_of(fmt: WeightFormat, qw: QuantizedWeight, dev: torch.device):
    """The format's grid, the effective scale broadcast to the weight and the RTN indices, on ``dev``."""
    grid = Grid(fmt.element, dev)
    scale2 = None if qw.scale2 is None else qw.scale2.to(dev)
    s_full = full_scale(fmt.effective_scale(qw.scale.to(dev), scale2), qw.block_size)
    return grid, s_full, grid.index_of_codes(fmt.codes(qw).to(dev))


def _learned_rounding(w, fmt, qw, config, objective, init, relaxation, stats, report, t0):
    dev, out_device = w.device, qw.qdata.device
    grid, s_full, idx_rtn = _grid_of(fmt, qw, dev)
    obj = _build_objective(objective, w, stats, config, report["name"])

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return obj.loss(grid.values[idx] * s_full - w)

    with torch.no_grad():
        loss_rtn = loss_of(idx_rtn)
        idx = idx_rtn
        if init == "gptq":
            if stats is None:
                raise ValueError(f"init='gptq' for layer {report['name']!r} needs calibration statistics")
            # GPTQ starts from the calibration H as is; only the refinement, which is what overfits a small
            # calibration set, sees the shrunk H. Measured with 15.5k calibration tokens (DEVELOPMENT.md "Learned
            # rounding"): INT8 per-row 35.70 → 35.92 dB end to end, FP8 per-tensor 29.59 → 29.56 (noise).
            h = stats.h.to(device=dev, dtype=torch.float32)
            idx_g = gptq_indices(
                w, s_full, grid, h, damp=config.damp, act_order=config.act_order, neighbours_only=config.neighbours_only
            )
            loss_g = loss_of(idx_g)
            report["objective_gptq"] = float(loss_g)
            if loss_g < loss_rtn:
                idx = idx_g
        if relaxation == "parallel":
            idx = parallel_refine(idx, w, s_full, grid, obj, iterations=config.num_iter, check_every=config.check_every)
            steps = config.num_iter
        if relaxation == "greedy":
            if config.greedy_passes > 0:
                idx = greedy_refine(
                    idx, w, s_full, grid, obj, passes=config.greedy_passes, neighbours_only=config.neighbours_only
                )
            steps = config.greedy_passes
    if relaxation not in ("greedy", "parallel"):
        lr = config.lr if config.lr is not None else default_lr(relaxation, config.optimizer)
        settings = LoopSettings(
            relaxation, config.optimizer, lr, config.lr_schedule, config.num_iter, config.check_every, config.patience
        )
        idx, info = optimize_rounding(idx, w, s_full, grid, obj, settings)
        steps = info["steps"]

    with torch.no_grad():
        loss_final = loss_of(idx)
        kept_rtn = config.fallback_to_rtn and not bool(loss_final < loss_rtn)
        if kept_rtn:
            idx, loss_final = idx_rtn, loss_rtn
            q_out = qw.qdata
        else:
            q_out = fmt.from_codes(grid.to_codes(idx), qw).qdata.to(out_device)
        moved = float((idx != idx_rtn).float().mean())
        w_dq = grid.values[idx] * s_full
    report.update(
        weight_sqnr_db=sqnr(w, w_dq),
        objective_rtn=float(loss_rtn),
        objective_final=float(loss_final),
        moved_fraction=moved,
        kept_rtn=kept_rtn,
        init=init,
        relaxation=relaxation,
        optimizer=config.optimizer if relaxation not in ("greedy", "parallel") else "none",
        steps=steps,
        rank=obj.rank,
    )
    if OBJECTIVE_KINDS[objective].needs_calibration:
        report["output_sqnr_db"] = _output_sqnr(w, w_dq, stats.h.to(dev))
    report.update(_heldout_report(w, grid.values[idx_rtn] * s_full, w_dq, stats))
    bias_delta = _bias_delta(config, stats, w, w_dq - w, dev, out_device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    report["seconds"] = time.perf_counter() - t0
    return _rounded(qw, fmt, report, bias_delta, q_out)


BATCH_BYTES_PER_ELEMENT = 64  # what one weight element costs in a batched parallel refinement (float32 + index state)


def rounds_same_shapes_together(config: LearnedRoundingConfig, has_stats: bool) -> bool:
    """Whether ``quantize_weights`` rounds same-shape weights together under ``config``: only the svd objective
    with the parallel relaxation, for weights without calibration statistics (each layer would have its own) and
    without bias correction (it needs them). ``quantize_weights`` applies this itself; the converter asks it only
    to decide whether holding a window of weights in memory is worth it."""
    objective, _, relaxation = resolve_method(config, has_stats=has_stats)
    batchable = objective == "svd" and relaxation == "parallel" and config.spec.rounding_refusal() is None
    return not has_stats and batchable and not config.bias_correction


def quantize_weights(
    weights: Sequence[torch.Tensor],
    config: LearnedRoundingConfig,
    *,
    names: Sequence[str] | None = None,
    stats: Sequence[LinearStats | None] | None = None,
    max_batch: int | None = None,
) -> list[RoundedWeight]:
    """Quantize several weights as ``config`` says; returns one ``RoundedWeight`` per weight, in order.

    ``names`` name the weights in reports and errors (default ``weight0``, ``weight1``...); ``stats`` are their
    calibration statistics (default: none for any). Where ``rounds_same_shapes_together`` holds (the ``svd``
    objective with the ``parallel`` relaxation), same-shape weights without statistics are rounded together, as
    many per batch as fit in half the free GPU memory (or ``max_batch``): one batched truncated SVD and one batched
    refinement, each layer with its own step scale, accept test and fallback to round-to-nearest. Every other
    weight (every other method, a weight alone of its shape, an all-zero one) is rounded on its own: GPTQ and the
    greedy sweep depend on each layer's own calibration ``H``. Batched results match the one-at-a-time rounding in
    kind, not bit for bit (the random probes of the SVD differ). Raises ``ValueError`` naming the weight for
    NaN/Inf, a non-2-D weight, a shape the block layout cannot tile, or a calibration-aware objective without
    statistics, and for ``names`` / ``stats`` of another length than ``weights``.
    """
    n = len(weights)
    names = [f"weight{i}" for i in range(n)] if names is None else list(names)
    stats = [None] * n if stats is None else list(stats)
    if len(names) != n or len(stats) != n:
        raise ValueError(f"quantize_weights got {n} weights but {len(names)} names and {len(stats)} stats")
    together = rounds_same_shapes_together(config, has_stats=False)
    results: list[RoundedWeight | None] = [None] * n
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        if together and stats[i] is None and w.dim() == 2 and bool(w.detach().any()):
            groups.setdefault((tuple(w.shape), str(w.device)), []).append(i)
        else:  # (bias correction without statistics raises here, as it should)
            results[i] = _round_one(w, config, names[i], stats[i])
    for (shape, _), members in groups.items():
        batch = max(max_batch or _batch_that_fits(shape, _device_of(config, weights[members[0]])), 1)
        for c0 in range(0, len(members), batch):
            chunk = members[c0 : c0 + batch]
            if len(chunk) == 1:
                results[chunk[0]] = _round_one(weights[chunk[0]], config, names[chunk[0]], None)
                continue
            rounded = _svd_parallel_batch([weights[i] for i in chunk], [names[i] for i in chunk], config)
            for i, r in zip(chunk, rounded):
                results[i] = r
    return results


def _device_of(config: LearnedRoundingConfig, w: torch.Tensor) -> torch.device:
    return torch.device(config.device) if config.device is not None else w.device


def _batch_that_fits(shape: tuple[int, ...], device: torch.device) -> int:
    """Layers of ``shape`` per batch: half the free GPU memory (the driver's free memory plus what PyTorch's caching
    allocator holds unused) over ``BATCH_BYTES_PER_ELEMENT`` per element; 1 GiB on the CPU, where batching saves
    little."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = (torch.cuda.mem_get_info(device)[0] + cached) // 2
    else:
        budget = 1 << 30
    return max(1, budget // (BATCH_BYTES_PER_ELEMENT * math.prod(shape)))


def _svd_parallel_batch(weights: list[torch.Tensor], names: list[str], config: LearnedRoundingConfig):
    """``_round_one`` with objective ``svd`` and relaxation ``parallel`` for B same-shape weights at once."""
    t0 = time.perf_counter()
    fmt = config.spec
    rtn = [fmt.quantize(w, name) for w, name in zip(weights, names)]
    out_device = rtn[0].qdata.device
    dev = _device_of(config, weights[0])
    w = torch.stack([fmt.rotate_weight(x.detach().to(device=dev, dtype=torch.float32)) for x in weights])
    grids = [_grid_of(fmt, qw, dev) for qw in rtn]
    grid = grids[0][0]
    s_full = torch.stack([g[1] for g in grids])
    idx_rtn = torch.stack([g[2] for g in grids])
    rank = svd_rank(*w.shape[-2:], config.top_p, config.min_k, config.max_k)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(config.seed)
        u, v = truncated_svd(w, rank)
        obj = Objective("svd", right=v, left=u, rank=rank)

        def loss_of(idx: torch.Tensor) -> torch.Tensor:  # per layer, (B,)
            return torch.linalg.vector_norm(u.mT @ (grid.values[idx] * s_full - w) @ v, dim=(-2, -1))

        loss_rtn = loss_of(idx_rtn)
        idx = parallel_refine(idx_rtn, w, s_full, grid, obj, iterations=config.num_iter, check_every=config.check_every)
        loss_final = loss_of(idx)
        kept = ~(loss_final < loss_rtn) if config.fallback_to_rtn else torch.zeros_like(loss_rtn, dtype=torch.bool)
        idx = torch.where(kept[:, None, None], idx_rtn, idx)
        loss_final = torch.where(kept, loss_rtn, loss_final)
        moved = (idx != idx_rtn).float().mean(dim=(-2, -1))
        w_dq = grid.values[idx] * s_full
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = (time.perf_counter() - t0) / len(weights)
    results = []
    for i, qw in enumerate(rtn):
        kept_i = bool(kept[i])
        report = {"name": names[i], "format": config.format, "objective": "svd", "shape": tuple(weights[i].shape)}
        report.update(
            weight_sqnr_db=sqnr(w[i], w_dq[i]),
            objective_rtn=float(loss_rtn[i]),
            objective_final=float(loss_final[i]),
            moved_fraction=float(moved[i]),
            kept_rtn=kept_i,
            init="rtn",
            relaxation="parallel",
            optimizer="none",
            steps=config.num_iter,
            rank=rank,
            output_sqnr_heldout_rtn_db=None,
            output_sqnr_heldout_db=None,
            seconds=seconds,
            batch=len(weights),
        )
        q_out = qw.qdata if kept_i else fmt.from_codes(grid.to_codes(idx[i]), qw).qdata.to(out_device)
        results.append(_rounded(qw, fmt, report, None, q_out))
    return results


def _output_sqnr(w: torch.Tensor, w_dq: torch.Tensor, h: torch.Tensor) -> float:
    """Output SQNR (bias left out) on the inputs whose second moment is ``h``: ``10 log10(tr(W H Wᵀ) / tr(E H Eᵀ))``,
    ``E = W_dq − W``; float64, since ``tr(E H Eᵀ)`` is a small difference-driven number."""
    h = h.to(device=w.device, dtype=torch.float64)
    w64 = w.double()
    e = w_dq.double() - w64
    sig = float(((w64 @ h) * w64).sum())
    err = float(((e @ h) * e).sum())
    return float("inf") if err <= 0 else 10.0 * math.log10(sig / err)


def _heldout_report(w, w_rtn_dq, w_dq, stats: LinearStats | None) -> dict:
    """Output SQNR of round-to-nearest and of the result on the held-out calibration calls, which the rounding never
    saw (the fitted ``output_sqnr_db`` flatters it). None for both when there are no held-out statistics."""
    if stats is None or stats.h_holdout is None:
        return {"output_sqnr_heldout_rtn_db": None, "output_sqnr_heldout_db": None}
    return {
        "output_sqnr_heldout_rtn_db": _output_sqnr(w, w_rtn_dq, stats.h_holdout),
        "output_sqnr_heldout_db": _output_sqnr(w, w_dq, stats.h_holdout),
    }


def _bias_delta(config, stats, w, err, dev, out_device) -> torch.Tensor | None:
    """``(W_dq − W) · E[x]``: the mean output shift the rounding causes, which the caller subtracts from the bias."""
    if not config.bias_correction:
        return None
    if stats is None:
        raise ValueError(
            "bias_correction=True needs calibration statistics (the real input mean); run lrq_ao.calibrate first "
            "or turn bias_correction off"
        )
    shift = err @ stats.mean.to(device=dev, dtype=torch.float32)
    if stats.drift_mean is not None and config.compensate_drift:
        # Against the float model the mean output error is E·E[x] − W·E[x_ref − x].
        shift = shift - w @ stats.drift_mean.to(device=dev, dtype=torch.float32)
    return shift.to(out_device)
