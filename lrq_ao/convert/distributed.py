"""Distributed conversion: ``torchrun --nproc_per_node=N -m lrq_ao.convert ...`` spreads layers over N processes.

Learned rounding is per layer, so a checkpoint's layers can be quantized in parallel. Every rank builds the same
deterministic plan (``plan.build_plan``), which fixes the whole output layout up front. Layers go to ranks by a
deterministic greedy assignment (``assign_ranks``: largest weight first, to the least-loaded rank; ties by name and
rank number). Each rank quantizes its layers and writes their bytes with ``os.pwrite`` at their known offsets in the
one shared ``<output>.partial`` file: ranges are disjoint, so no weights travel between processes and the result is
byte-identical to a single-process run by construction (the rounding seed is the same for every layer). Rank 0
writes the header and the tensors kept in high precision.

Only small control messages go through ``torch.distributed`` (setup status, the done-set on resume, and one final
exchange of each rank's status and report records), so the process group is always gloo: it carries pickled Python
objects between CPU processes on any device, whereas NCCL would need CUDA tensors and a bound device for no gain.

Failures. A rank whose layer raises (NaN weight, bad option) stops, and the final exchange tells every rank: rank 0
then deletes the partial file and every journal and raises an error naming the failing rank, tensor and cause. A rank
that dies outright (SIGKILL, out of memory) takes the run down through torchrun; the partial file and journals stay
so ``--resume`` continues. Ctrl-C also keeps them.

Resume. Each rank appends finished tensors to its own journal ``<output>.partial.journal.rank<r>``. On ``--resume``
rank 0 reads every journal beside the partial file (of any earlier world size, and the single-process journal),
sends the union to all ranks, and the remaining tensors are assigned afresh, so a resumed run may use a different
``--nproc_per_node``.

Sharded output (``--max-shard-size``) works the same way: rank 0 creates every ``<shard>.partial`` and the index's
partial file, each rank pwrites a tensor into the shard that holds it, and rank 0 renames the set (index last).

Single host only: ranks share the output file through one filesystem (the normal ``torchrun --standalone`` case).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lrq_ao.convert.engine import (
    KILL_HOOK_ENV,
    RunOptions,
    _proc_status_kb,
    _ReadAhead,
    _rss_reset_and_read,
    _run_one,
    check_plan_targets,
    open_plan_output,
    pin_large_allocations_to_mmap,
    plan_report,
)
from lrq_ao.convert.plan import ConversionPlan, TensorPlan
from lrq_ao.convert.report import ConversionReport, LayerRecord
from lrq_ao.convert.resume import Journal, journal_path, rank_journal_path, rank_journals
from lrq_ao.convert.stream import ShardedWriter, StreamingWriter, partial_path

Writer = StreamingWriter | ShardedWriter

# Test-only: with KILL_HOOK_ENV, only this rank SIGKILLs itself (default: every rank that reaches the count).
KILL_RANK_ENV = "LRQ_CONVERT_TEST_KILL_RANK"
# Ranks that finish early wait in the final exchange for the slowest rank, which may quantize for hours; gloo's
# default 30-minute timeout would abort a healthy run. A dead rank is detected by torchrun, not by this timeout.
EXCHANGE_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun launch (from the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> RankInfo:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def launched_distributed() -> bool:
    """True when torchrun started this process as one of several ranks (``WORLD_SIZE`` > 1)."""
    return RankInfo.from_env().world_size > 1


def rank_device(device: str, local_rank: int) -> str:
    """The device a rank quantizes on: ``cuda`` becomes ``cuda:<LOCAL_RANK>``; ``cpu`` stays ``cpu``.

    Raises ``ValueError`` for an explicit ``cuda:N``: under torchrun every rank would use the same GPU.
    """
    if device == "cuda":
        return f"cuda:{local_rank}"
    if device.startswith("cuda:"):
        raise ValueError(
            f"--device {device} under torchrun would put every rank on one GPU; pass --device cuda and each rank "
            f"uses cuda:<LOCAL_RANK> (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    return device


def layer_cost(plan: ConversionPlan, tp: TensorPlan) -> int:
    """The balancing weight of one tensor: its element count (learned rounding time grows with it)."""
    return plan.source.tensors[tp.name].numel


def assign_ranks(plan: ConversionPlan, todo: list[TensorPlan], world_size: int) -> dict[str, int]:
    """Which rank handles each tensor in ``todo``: a deterministic, size-balanced assignment.

    Quantized layers, largest first (ties by name), each go to the rank with the least assigned elements so far
    (ties to the lower rank). Kept and removed tensors (byte copies, no compute) go to rank 0. Every rank computes
    the same answer from the same plan.
    """
    owners = {tp.name: 0 for tp in todo if tp.action != "quantize"}
    load = [0] * world_size
    layers = sorted((tp for tp in todo if tp.action == "quantize"), key=lambda tp: (-layer_cost(plan, tp), tp.name))
    for tp in layers:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[tp.name] = rank
        load[rank] += layer_cost(plan, tp)
    return owners


def journals_beside(partial: Path) -> list[Path]:
    """Every journal of this output: the single-process one and each rank's, from any earlier run."""
    single = journal_path(partial)
    return ([single] if single.is_file() else []) + rank_journals(single)


def read_done(partial: Path, plan_hash: str) -> dict[str, dict[str, Any]]:
    """The union of finished tensors over every journal beside ``partial`` (``ValueError`` for a foreign plan)."""
    done: dict[str, dict[str, Any]] = {}
    for path in journals_beside(partial):
        journal = Journal.reopen(path, plan_hash)  # also drops a torn last line; nobody else writes yet
        journal.close(delete=False)
        done.update(journal.done)
    return done


def remove_journals(partial: Path) -> None:
    for path in journals_beside(partial):
        path.unlink(missing_ok=True)


class RankFailed(RuntimeError):
    """The distributed conversion failed; the message names the rank, tensor and cause."""


def convert_distributed(
    plan: ConversionPlan, target: str | Path, run: RunOptions | None = None
) -> ConversionReport | None:
    """Write ``plan``'s output to ``target`` with every torchrun rank quantizing its share of the layers.

    Call it on every rank with the same plan. Returns the ``ConversionReport`` on rank 0 and None on the others.
    Raises ``RankFailed`` (on every rank; on rank 0 naming the failing rank, tensor and cause) when any rank's layer
    fails, after deleting the partial file and journals; the same ``FileExistsError``/``PermissionError`` as
    ``engine.convert`` for an unusable target.
    """
    run = run or RunOptions()
    me = RankInfo.from_env()
    run = replace(run, device=rank_device(run.device, me.local_rank))  # before any file exists: a bad flag leaves none
    target = Path(target)
    check_plan_targets(plan, target, overwrite=run.overwrite, resume=run.resume)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", timeout=EXCHANGE_TIMEOUT)
    try:
        return _convert_in_group(plan, target, run, me)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _convert_in_group(plan: ConversionPlan, target: Path, run: RunOptions, me: RankInfo) -> ConversionReport | None:
    t_start = time.perf_counter()
    plan_hash = plan.plan_hash()
    final = plan.output_files(target)[0]  # the index when sharded: its partial file and journals mark the run
    partial = partial_path(final)
    writer, done, resuming = _open_output(plan, target, run, me, plan_hash)
    todo = [tp for tp in plan.tensors if tp.name not in done]
    owners = assign_ranks(plan, todo, me.world_size)
    mine = [tp for tp in todo if owners[tp.name] == me.rank]
    jpath = rank_journal_path(journal_path(partial), me.rank)
    journal = Journal.reopen(jpath, plan_hash) if resuming and jpath.exists() else Journal.start(jpath, plan_hash)
    if not run.quiet:
        print(_assignment_summary(plan, todo, owners, me.world_size, run.device), file=sys.stderr, flush=True)
    try:
        error, records, peak = _run_share(plan, mine, writer, journal, run, me.rank)
    except KeyboardInterrupt:
        writer.abort(keep_partial=True)
        journal.close(delete=False)
        raise
    if me.rank != 0:
        writer.abort(keep_partial=True)  # only closes this rank's descriptor; rank 0 finishes or deletes the file
    journal.close(delete=False)
    outcomes = _exchange(writer if me.rank == 0 else None, (error, records, peak))
    failures = [(rank, err) for rank, (err, _, _) in enumerate(outcomes) if err is not None]
    if failures:
        if me.rank == 0:
            writer.abort(keep_partial=False)
            remove_journals(partial)
        raise RankFailed(_failure_message(failures, me.rank))
    if me.rank != 0:
        return None
    writer.finish()
    remove_journals(partial)
    return _report(plan, writer, outcomes, done, time.perf_counter() - t_start)


def _open_output(
    plan: ConversionPlan, target: Path, run: RunOptions, me: RankInfo, plan_hash: str
) -> tuple[Writer, dict[str, dict[str, Any]], bool]:
    """Rank 0 creates (or reopens, for ``--resume``) the partial file(s) and reads the journals; then every other
    rank opens the same files. Returns this rank's writer, the tensors already done, and whether this is a resume."""
    partial = partial_path(plan.output_files(target)[0])
    setup: list[Any] = [None, {}, False]  # error message, done set, resuming
    writer = None
    if me.rank == 0:
        try:
            resuming = run.resume and partial.exists() and bool(journals_beside(partial))
            done = read_done(partial, plan_hash) if resuming else {}
            if not resuming:
                remove_journals(partial)  # stale journals of an abandoned run would be merged by a later --resume
            writer = open_plan_output(plan, target, resume=resuming)
            setup = [None, done, resuming]
        except Exception as e:
            setup = [f"rank 0 could not prepare {partial}: {e}", {}, False]
    dist.broadcast_object_list(setup, src=0)
    error, done, resuming = setup
    if error is None and me.rank != 0:
        try:
            writer = open_plan_output(plan, target, resume=True, lock=False)  # rank 0 holds the lock
        except Exception as e:
            error = f"rank {me.rank} could not open {partial}: {e}"
    errors = [None] * me.world_size
    dist.all_gather_object(errors, error)
    problems = [e for e in errors if e is not None]
    if problems:
        if writer is not None:
            writer.abort(keep_partial=me.rank != 0 or resuming)
        raise RankFailed("; ".join(problems))
    return writer, done, resuming


def _assignment_summary(
    plan: ConversionPlan, todo: list[TensorPlan], owners: dict[str, int], world_size: int, device: str
) -> str:
    layers, elements = [0] * world_size, [0] * world_size
    for tp in todo:
        if tp.action == "quantize":
            layers[owners[tp.name]] += 1
            elements[owners[tp.name]] += layer_cost(plan, tp)
    shares = ", ".join(f"rank {r}: {layers[r]} layers, {elements[r] / 1e6:.1f}M weights" for r in range(world_size))
    return f"torchrun: {world_size} ranks (rank 0 on {device}); {shares}"


def _run_share(
    plan: ConversionPlan, mine: list[TensorPlan], writer: Writer, journal: Journal, run: RunOptions, rank: int
) -> tuple[str | None, dict[str, LayerRecord], int | None]:
    """Quantize and write this rank's tensors. Returns (error message or None, records, peak RSS growth)."""
    kill_after = _kill_after(rank)
    pin_large_allocations_to_mmap()
    base_rss = _rss_reset_and_read()
    records: dict[str, LayerRecord] = {}
    ahead = _ReadAhead(plan, mine)
    tp = None
    try:
        for written, tp in enumerate(mine, start=1):
            weight = ahead.take(tp.name) if tp.action == "quantize" else None
            record = _run_one(plan, tp, plan.source.tensors[tp.name], writer, run, weight)
            del weight
            if record is not None:
                records[tp.name] = record
            journal.mark_done(tp.name, record.to_json() if record is not None else None)
            if kill_after is not None and written >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        error = None
    except Exception as e:
        where = f"tensor {tp.name!r}" if tp is not None else "setup"
        error = f"{where}: {type(e).__name__}: {e}"
    finally:
        ahead.close()
    peak = _proc_status_kb("VmHWM") * 1024
    return error, records, (peak - base_rss if peak and base_rss else None)


def _kill_after(rank: int) -> int | None:
    value = os.environ.get(KILL_HOOK_ENV)
    only = os.environ.get(KILL_RANK_ENV)
    if not value or (only is not None and int(only) != rank):
        return None
    return int(value)


def _exchange(writer0: Writer | None, outcome: tuple) -> list[tuple]:
    """Every rank's (error, records, peak). If a peer died the collective raises: keep the work for ``--resume``."""
    outcomes: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(outcomes, outcome)
    except Exception as e:
        if writer0 is not None:
            writer0.abort(keep_partial=True)
        raise RankFailed(
            f"lost contact with another rank ({e}); finished layers are kept: rerun the same command with --resume"
        ) from e
    return outcomes


def _failure_message(failures: list[tuple[int, str]], rank: int) -> str:
    if rank != 0:
        return f"rank {rank}: conversion stopped because a rank failed (rank 0 reports the cause)"
    causes = "; ".join(f"rank {r} failed on {err}" for r, err in failures)
    return f"distributed conversion failed: {causes}. No output was written (partial file and journals deleted)."


def _report(
    plan: ConversionPlan,
    writer: Writer,
    outcomes: list[tuple],
    done: dict[str, dict[str, Any]],
    seconds: float,
) -> ConversionReport:
    records: dict[str, LayerRecord] = {}
    for _, rank_records, _ in outcomes:
        records.update(rank_records)
    for name, rec in done.items():
        if name not in records and rec:
            records[name] = LayerRecord.from_json(rec)
    peaks = [p for _, _, p in outcomes if p is not None]
    peak = max(peaks) if peaks else None  # the largest single rank's growth
    return plan_report(plan, writer, records, seconds=seconds, resumed=len(done), peak=peak)
