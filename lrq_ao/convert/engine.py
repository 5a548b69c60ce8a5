"""Running a conversion plan: quantize layer by layer, stream the output, journal progress for ``--resume``.

``quantize_layer`` (one input weight -> its ComfyUI tensors and report record) is the separable step a distributed
run will hand out; ``convert`` drives it over a whole plan with bounded host memory.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.convert import comfy_format as cf
from lrq_ao.convert.plan import ConversionPlan, TensorPlan
from lrq_ao.convert.report import ConversionReport, LayerRecord
from lrq_ao.convert.resume import Journal, journal_path, rank_journals
from lrq_ao.convert.stream import ShardedWriter, StreamingWriter, TensorInfo, open_output, partial_path, read_tensor
from lrq_ao.formats import QuantizedWeight, WeightFormat

# Test-only hook: SIGKILL this process after N journal entries (used to test --resume with a real killed run).
KILL_HOOK_ENV = "LRQ_CONVERT_TEST_KILL_AFTER"
SQNR_CHUNK_ELEMENTS = 1 << 20
SPACE_MARGIN = 16 * 2**20  # free space kept beyond the output's own size (journal, filesystem metadata)
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@dataclass
class RunOptions:
    """How to run a plan (none of this changes the output bytes)."""

    device: str = "cpu"
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    calibration: Any = None  # lrq_ao.rounding.calibration.Calibration, or None


def chunked_sqnr(w: torch.Tensor, fmt: WeightFormat, qw: QuantizedWeight) -> float:
    """``primitives.sqnr(w, fmt.dequantize_original(qw))``, summed in float64 over row chunks so memory stays
    bounded: the scale grid is first spread to one row per weight row, so a chunk of rows is a weight of its own
    with ``block_size`` ``(1, bk)`` (exact for every format whose dequantization is per-block, as the base's is).
    A weight with ``extra`` tensors (laid out as only its format knows) is measured whole."""
    n, k = w.shape
    bn, bk = qw.block_size
    if qw.extra:
        return _sqnr_db(w.double(), fmt.dequantize_original(qw, torch.float32).double())
    row_scale = qw.scale.repeat_interleave(bn, dim=0)  # (N, K // bk): small for every layout
    rows = max(1, SQNR_CHUNK_ELEMENTS // max(k, 1))
    sig = err = 0.0
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        part = QuantizedWeight(qw.qdata[r0:r1], row_scale[r0:r1], (1, bk), qw.scale2)
        ref = w[r0:r1].double()
        approx = fmt.dequantize_original(part, torch.float32).double()
        sig += float(ref.square().sum())
        err += float((ref - approx).square().sum())
    return _db(sig, err)


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return _db(float(ref.square().sum()), float((ref - approx).square().sum()))


def _db(sig: float, err: float) -> float:
    if err == 0:
        return math.inf
    return 10 * math.log10(sig / err) if sig > 0 else -math.inf


def _on_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    scale2 = None if qw.scale2 is None else qw.scale2.cpu()
    extra = {k: v.cpu() for k, v in qw.extra.items()}
    return QuantizedWeight(qw.qdata.cpu(), qw.scale.cpu(), qw.block_size, scale2, extra)


@dataclass
class RoundedWeight:
    """What ``layer_output`` needs of a rounding result: the quantized weight, the rounding's report and any bias
    correction (``lrq_ao.rounding``'s results carry these as ``qdata``/``scale``/``block_size``/``report``)."""

    qw: QuantizedWeight
    report: dict[str, Any]
    bias_delta: torch.Tensor | None = None

    @classmethod
    def of(cls, result: Any) -> RoundedWeight:
        if isinstance(result, RoundedWeight):
            return result
        return cls(result.quantized_weight(), dict(result.report or {}), getattr(result, "bias_delta", None))


def round_weight(w: torch.Tensor, fmt: WeightFormat, config: LearnedRoundingConfig, name: str, stats: Any):
    """One weight rounded as ``config`` says (``lrq_ao.rounding.quantize_weight``; a format learned rounding cannot
    choose codes for is rounded to nearest and its report says why)."""
    from lrq_ao.rounding import quantize_weight

    return RoundedWeight.of(quantize_weight(w, config, name=name, stats=stats))


def quantize_layer(
    info: TensorInfo,
    tp: TensorPlan,
    config: LearnedRoundingConfig,
    *,
    device: str = "cpu",
    stats: Any = None,
    full_precision_matrix_mult: bool = False,
    weight: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], LayerRecord]:
    """Read one weight, quantize it on ``device`` as ``config`` says, and return its ComfyUI tensors and record.

    ``weight`` is the tensor already read from ``info`` (the engine reads one layer ahead), else it is read here.
    Raises ``ValueError`` naming the tensor for NaN/Inf values (from ``quantize_weight`` or the format).
    """
    t0 = time.perf_counter()
    w = (weight if weight is not None else read_tensor(info)).to(device)
    result = round_weight(w, tp.weight_format, config, info.name, stats)
    return layer_output(info, tp, w, result, full_precision_matrix_mult, time.perf_counter() - t0)


def layer_output(
    info: TensorInfo, tp: TensorPlan, w: torch.Tensor, result: Any, full_precision_matrix_mult: bool, seconds: float
) -> tuple[dict[str, torch.Tensor], LayerRecord]:
    """One rounded weight (``result`` of ``quantize_weight(s)`` for ``w``, or a ``RoundedWeight``) -> its ComfyUI
    tensors and record. ``seconds`` is the rounding's share of time; the SQNR check here is added to it."""
    t0 = time.perf_counter()
    result = RoundedWeight.of(result)
    if result.bias_delta is not None:
        raise ValueError(
            f"{info.name}: the converter does not apply bias correction (it would change the bias tensors' layout); "
            f"run without bias correction"
        )
    fmt, qw = tp.weight_format, result.qw
    sqnr_db = chunked_sqnr(w, fmt, qw)
    qw = _on_cpu(qw)
    tensors, _ = cf.layer_tensors(tp.layer, fmt, qw, full_precision_matrix_mult=full_precision_matrix_mult)
    rep = result.report
    record = LayerRecord(
        layer=tp.layer,
        format=tp.format,
        shape=list(info.shape),
        sqnr_db=sqnr_db,
        objective_before=_float_or_none(rep.get("objective_rtn")),
        objective_after=_float_or_none(rep.get("objective_final")),
        seconds=seconds + time.perf_counter() - t0,
        fallback=tp.full_fallback,
        rounding={k: v for k, v in rep.items() if isinstance(v, (int, float, str, bool)) and k != "name"},
    )
    return tensors, record


def _float_or_none(x: Any) -> float | None:
    return None if x is None else float(x)


def check_output_target(target: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an existing output without ``--overwrite`` and an unwritable folder, before any work is done."""
    if target.exists() and not overwrite:
        raise FileExistsError(f"output {target} already exists; pass --overwrite to replace it or choose another -o")
    if target.is_dir():
        raise IsADirectoryError(f"output {target} is a folder; give a .safetensors file path")
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {folder} is not writable; choose another -o")


def check_plan_targets(plan: ConversionPlan, target: str | Path, *, overwrite: bool, resume: bool) -> Path:
    """``check_output_target`` for every file ``plan`` writes for ``-o target`` (each shard and the index when
    sharded), then ``check_free_space``. Returns the final path: ``target`` itself, or the index of a sharded
    output."""
    final, files, index = plan.output_files(target)
    for path in [f.path for f in files] + ([final] if index is not None else []):
        check_output_target(path, overwrite=overwrite, resume=resume)
    check_free_space(plan, final, [f.path for f in files], resume=resume)
    return final


def check_free_space(plan: ConversionPlan, final: Path, paths: list[Path], *, resume: bool) -> None:
    """Refuse to start when the output folder has less free space than the output needs (less the blocks a partial
    output being resumed already holds), plus ``SPACE_MARGIN``. ``OSError`` (ENOSPC) saying how much is missing."""
    import errno
    import shutil

    needed = plan.output_bytes + SPACE_MARGIN
    if resume:
        needed -= sum(_allocated(partial_path(p)) for p in paths)
    free = shutil.disk_usage(final.parent).free
    if free < needed:
        from lrq_ao.convert.report import human_bytes

        error = OSError(
            f"not enough free space in {final.parent}: the output needs {human_bytes(needed)}, "
            f"{human_bytes(free)} are free; free {human_bytes(needed - free)} or choose another -o"
        )
        error.errno = errno.ENOSPC
        raise error


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def input_mode(plan: ConversionPlan) -> int:
    """The permission bits the output gets: the input's (its first file's), so a private checkpoint stays private."""
    import stat

    return stat.S_IMODE(os.stat(plan.source.files[0]).st_mode)


def output_size(writer: StreamingWriter | ShardedWriter) -> int:
    """Bytes of the finished output files (every shard and the index when sharded)."""
    return sum(p.stat().st_size for p in writer.paths)


def plan_report(
    plan: ConversionPlan,
    writer: StreamingWriter | ShardedWriter,
    records: dict[str, LayerRecord],
    *,
    seconds: float,
    resumed: int,
    peak: int | None,
) -> ConversionReport:
    """The report of a finished run (single-process or torchrun): one record per quantized layer in plan order,
    every kept or removed tensor with its reason, sizes of the finished output."""
    files = plan.source.files
    return ConversionReport(
        input=files[0] if len(files) == 1 else os.path.dirname(files[0]),
        output=str(writer.target),
        preset=plan.preset.name,
        layers=[records[t.name] for t in plan.quantized],
        kept={t.name: t.reason for t in plan.tensors if t.action == "keep"},
        removed={t.name: t.reason for t in plan.tensors if t.action == "remove"},
        input_bytes=plan.input_bytes,
        output_bytes=output_size(writer),
        seconds=seconds,
        resumed_tensors=resumed,
        peak_rss_bytes=peak,
    )


def open_plan_output(
    plan: ConversionPlan, target: str | Path, *, resume: bool, lock: bool = True
) -> StreamingWriter | ShardedWriter:
    """The writer for ``plan``'s output to ``-o target`` (``stream.open_output``), new or reopened for resume,
    locked against a second writer unless ``lock`` is False, finishing with the input's permission bits."""
    final, files, index = plan.output_files(target)
    return open_output(final, files, index, resume=resume, lock=lock, mode=input_mode(plan))


def _kill_hook() -> int | None:
    value = os.environ.get(KILL_HOOK_ENV)
    return int(value) if value else None


def _stats_for(calibration: Any, layer: str) -> Any:
    if calibration is None:
        return None
    from lrq_ao.rounding import stats_for

    return stats_for(calibration, layer, None)


def pin_large_allocations_to_mmap() -> bool:
    """Make glibc serve every allocation over 1 MiB with its own mmap, returned to the OS on free.

    By default glibc raises its mmap threshold after the first large free, so later multi-MiB tensors come from the
    heap, whose freed space is kept: RSS then drifts up to the sum of differently sized temporaries. Streaming one
    layer at a time only bounds memory if freed layers really leave. Returns False where mallopt is unavailable
    (non-glibc platforms), which costs memory headroom, not correctness.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 20))


def _rss_reset_and_read() -> int:
    """Reset the peak-RSS counter (Linux clear_refs) and return the current RSS in bytes (0 if unknown)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # without the reset the measured peak can only be higher (a conservative number)
    return _proc_status_kb("VmRSS") * 1024


def _proc_status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


class _Progress:
    def __init__(self, plan: ConversionPlan, quiet: bool):
        self.bars = []
        if quiet:
            return
        from tqdm import tqdm

        self.layers = tqdm(total=len(plan.tensors), desc="tensors", unit="t", position=0)
        self.bytes = tqdm(total=plan.input_bytes, desc="read", unit="B", unit_scale=True, position=1)
        self.bars = [self.layers, self.bytes]

    def step(self, nbytes: int, name: str) -> None:
        if self.bars:
            self.layers.set_postfix_str(name[-40:], refresh=False)
            self.layers.update(1)
            self.bytes.update(nbytes)

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def convert(plan: ConversionPlan, target: str | Path, run: RunOptions | None = None) -> ConversionReport:
    """Write ``plan``'s output to ``target`` (via ``<target>.partial`` and a rename). Returns the report.

    A sharded plan writes ``<stem>-0000i-of-0000N.safetensors`` and ``<stem>.safetensors.index.json`` beside
    ``target`` (each via its ``.partial``; the index is renamed last) and the report's ``output`` is the index.
    On an exception the partial files and journal are deleted (no partial output is left behind); on Ctrl-C they are
    kept so ``--resume`` can continue. Raises ``FileExistsError``/``PermissionError`` for an unusable target and
    ``ValueError`` naming the tensor for bad weights.
    """
    run = run or RunOptions()
    target = Path(target)
    final = check_plan_targets(plan, target, overwrite=run.overwrite, resume=run.resume)
    t_start = time.perf_counter()
    plan_hash = plan.plan_hash()
    partial = partial_path(final)
    jpath = journal_path(partial)
    resuming = run.resume and partial.exists() and jpath.exists()
    writer = open_plan_output(plan, target, resume=resuming)  # first: it locks out a second writer
    if not resuming:
        # A fresh start truncates the partial file, so journals of an earlier torchrun run no longer describe it.
        for stale in rank_journals(jpath):
            stale.unlink(missing_ok=True)
    try:
        journal = Journal.reopen(jpath, plan_hash) if resuming else Journal.start(jpath, plan_hash)
    except Exception:
        writer.abort(keep_partial=True)
        raise
    resumed = len(journal.done)
    try:
        records = _run_plan(plan, writer, journal, run)
    except KeyboardInterrupt:
        writer.abort(keep_partial=True)
        journal.close(delete=False)
        raise
    except BaseException:
        writer.abort(keep_partial=False)
        journal.close(delete=True)
        raise
    peak = records.pop("__peak__")
    writer.finish()
    journal.close(delete=True)
    return plan_report(plan, writer, records, seconds=time.perf_counter() - t_start, resumed=resumed, peak=peak)


class _ReadAhead:
    """Reads the next weight to quantize on a background thread while the current one is quantized and written,
    so disk reads overlap compute (file reads release the GIL). Holds at most one extra tensor."""

    def __init__(self, plan: ConversionPlan, todo: list[TensorPlan]):
        self.plan = plan
        self.queue = [tp for tp in todo if tp.action == "quantize"]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrq-read")
        self.pending: tuple[str, Future] | None = None
        self._schedule()

    def _schedule(self) -> None:
        if self.queue:
            tp = self.queue.pop(0)
            self.pending = (tp.name, self.pool.submit(read_tensor, self.plan.source.tensors[tp.name]))
        else:
            self.pending = None

    def take(self, name: str) -> torch.Tensor:
        if self.pending is None or self.pending[0] != name:
            raise RuntimeError(f"read-ahead out of order at {name!r}")
        tensor = self.pending[1].result()
        self._schedule()
        return tensor

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# Same-shape weights rounded together (issue 4): the quantized weights, in file order, are cut into windows of this
# many, and the same-shape weights of a window are rounded in one batch. The engine then holds one window of read
# weights plus the one read ahead -- five input tensors, the streaming bound the converter already had
# (tests/convert/test_memory.py). Layers whose same-shape partners sit further apart in the file (most of Flux, whose
# names sort by block) go one at a time.
BATCH_WINDOW = 4


def _run_plan(
    plan: ConversionPlan, writer: StreamingWriter | ShardedWriter, journal: Journal, run: RunOptions
) -> dict[str, Any]:
    kill_after = _kill_hook()
    pin_large_allocations_to_mmap()
    progress = _Progress(plan, run.quiet)
    records: dict[str, Any] = {}
    base_rss = _rss_reset_and_read()
    written = 0
    windows = _Windows(plan, journal, BATCH_WINDOW if batches_same_shapes(plan, run) else 1)
    ahead = _ReadAhead(plan, windows.to_read)
    waiting: list[tuple[TensorPlan, torch.Tensor]] = []  # read weights of the current window, in file order

    def finish(tp: TensorPlan, record: LayerRecord | None) -> None:
        nonlocal written
        if tp.name in journal.done:  # rounded again only because its window was unfinished: bytes are the same
            records[tp.name] = LayerRecord.from_json(journal.done[tp.name])
            progress.step(plan.source.tensors[tp.name].nbytes, tp.name)
            return
        if record is not None:
            records[tp.name] = record
        journal.mark_done(tp.name, record.to_json() if record is not None else None)
        progress.step(plan.source.tensors[tp.name].nbytes, tp.name)
        written += 1
        if kill_after is not None and written >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        for tp in plan.tensors:
            info = plan.source.tensors[tp.name]
            if windows.size > 1 and tp.name in windows.redo:
                waiting.append((tp, ahead.take(tp.name).to(run.device)))
                if windows.closes(tp):
                    _round_waiting(plan, waiting, writer, finish)
                continue
            if tp.name in journal.done:
                if tp.action == "quantize":
                    records[tp.name] = LayerRecord.from_json(journal.done[tp.name])
                progress.step(info.nbytes, tp.name)
                continue
            weight = ahead.take(tp.name) if tp.action == "quantize" else None
            record = _run_one(plan, tp, info, writer, run, weight)
            del weight
            finish(tp, record)
    finally:
        ahead.close()
        progress.close()
    peak = _proc_status_kb("VmHWM") * 1024
    records["__peak__"] = peak - base_rss if peak and base_rss else None
    return records


class _Windows:
    """The quantized weights in file order, cut into windows of ``size``. A window with any weight left undone is
    rounded again whole (``redo``), so that ``--resume`` batches exactly as an uninterrupted run did and writes the
    same bytes; with ``size`` 1 that is just the undone weights."""

    def __init__(self, plan: ConversionPlan, journal: Journal, size: int):
        self.size = size
        quantized = [tp for tp in plan.tensors if tp.action == "quantize"]
        windows = [quantized[i : i + size] for i in range(0, len(quantized), size)]
        redo = [w for w in windows if any(tp.name not in journal.done for tp in w)]
        self.redo = {tp.name for w in redo for tp in w}
        self.last = {w[-1].name for w in redo}
        self.to_read = [tp for w in redo for tp in w]

    def closes(self, tp: TensorPlan) -> bool:
        return tp.name in self.last


def batches_same_shapes(plan: ConversionPlan, run: RunOptions) -> bool:
    """Whether this run rounds same-shape weights together: only the svd objective with the parallel relaxation
    batches (``quantize_weights``), and only without calibration data (each layer then has its own statistics)."""
    from lrq_ao.rounding import rounds_same_shapes_together

    return rounds_same_shapes_together(plan.options.rounding, has_stats=run.calibration is not None)


def _round_waiting(
    plan: ConversionPlan,
    waiting: list[tuple[TensorPlan, torch.Tensor]],
    writer: StreamingWriter | ShardedWriter,
    finish: Callable[[TensorPlan, LayerRecord | None], None],
) -> None:
    """Round the waiting weights, same shape and format together, and write and journal each group as it is done
    (the output layout is fixed by the plan, so the order of writes does not change the file).

    Each batch's random SVD probes depend on its members, so a window is always rounded whole (``_Windows``).
    """
    from lrq_ao.rounding import quantize_weights

    groups: dict[tuple, list[tuple[TensorPlan, torch.Tensor]]] = {}
    for tp, w in waiting:
        groups.setdefault((tuple(w.shape), tp.format, tp.weight_format), []).append((tp, w))
    waiting.clear()
    for members in groups.values():
        t0 = time.perf_counter()
        config = plan.layer_config(members[0][0])
        results = quantize_weights([w for _, w in members], config, names=[tp.name for tp, _ in members])
        seconds = (time.perf_counter() - t0) / len(members)
        for (tp, w), result in zip(members, results):
            info = plan.source.tensors[tp.name]
            tensors, record = layer_output(info, tp, w, result, plan.options.full_precision_matrix_mult, seconds)
            for name, t in tensors.items():
                writer.write(name, t)
            finish(tp, record)


def _run_one(
    plan: ConversionPlan,
    tp: TensorPlan,
    info: TensorInfo,
    writer: StreamingWriter | ShardedWriter,
    run: RunOptions,
    weight: torch.Tensor | None,
) -> LayerRecord | None:
    if tp.action == "remove":
        return None
    if tp.action == "keep":
        writer.copy_from(tp.name, info)
        return None
    tensors, record = quantize_layer(
        info,
        tp,
        plan.layer_config(tp),
        device=run.device,
        stats=_stats_for(run.calibration, tp.layer),
        full_precision_matrix_mult=plan.options.full_precision_matrix_mult,
        weight=weight,
    )
    for name, t in tensors.items():
        writer.write(name, t)
    return record
