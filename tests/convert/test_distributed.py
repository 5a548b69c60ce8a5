"""Distributed conversion under torchrun (2 CPU processes, gloo, loopback): the output is byte-identical to a
single-process run, a failing rank is reported by rank 0 with nothing left behind, and a killed run resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lrq_ao.convert.cli import build_parser, main, options_from_args
from lrq_ao.convert.distributed import (
    KILL_RANK_ENV,
    assign_ranks,
    journals_beside,
    rank_device,
)
from lrq_ao.convert.engine import KILL_HOOK_ENV
from lrq_ao.convert.plan import build_plan
from lrq_ao.convert.resume import Journal, journal_path, rank_journal_path
from lrq_ao.convert.stream import partial_path, read_source

# Learned rounding (not round-to-nearest), so the determinism of the rounding itself is part of what is checked.
LEARNED = ["--format", "int8_blockwise", "--block_size", "64", "--objective", "svd", "--manual_seed", "5", "--quiet"]


def torchrun(args: list[str], env_extra: dict[str, str] | None = None, nproc: int = 2):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's traffic on loopback
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    cmd += ["-m", "lrq_ao.convert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def single_process(args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code


def plan_for(args: list[str]):
    parsed = build_parser().parse_args(args)
    return build_plan(read_source(parsed.input), options_from_args(parsed))


def leftovers(out: Path) -> list[Path]:
    partial = partial_path(out)
    return [p for p in (out, partial) if p.exists()] + journals_beside(partial)


def test_assignment_is_balanced_deterministic_and_complete(minilm_path):
    plan = plan_for(["-i", str(minilm_path), "--int8"])
    sizes = {t.name: plan.source.tensors[t.name].numel for t in plan.quantized}
    for world in (1, 2, 3, 8):
        owners = assign_ranks(plan, plan.tensors, world)
        assert set(owners) == {t.name for t in plan.tensors}
        assert all(owners[t.name] == 0 for t in plan.tensors if t.action != "quantize")
        loads = [sum(n for name, n in sizes.items() if owners[name] == r) for r in range(world)]
        # Largest-first greedy: no rank exceeds another by more than the largest layer it could have moved.
        assert max(loads) - min(loads) <= max(sizes.values())
        assert sum(loads) == sum(sizes.values())
        # The answer depends on the plan only, not on the order tensors are listed in.
        assert assign_ranks(plan, list(reversed(plan.tensors)), world) == owners
    # MiniLM has 6 identical encoder layers: 2 ranks must split them exactly evenly.
    owners = assign_ranks(plan, plan.tensors, 2)
    assert sum(n for name, n in sizes.items() if owners[name] == 0) * 2 == sum(sizes.values())


def test_a_fresh_single_process_run_drops_rank_journals_of_an_abandoned_torchrun(flux_ckpt, tmp_path):
    # A fresh start truncates the partial file; a later torchrun --resume must not trust the old journals' layers.
    out = tmp_path / "out.safetensors"
    stale = rank_journal_path(journal_path(partial_path(out)), 1)
    Journal.start(stale, plan_for(["-i", str(flux_ckpt)]).plan_hash()).close(delete=False)
    partial_path(out).write_bytes(b"old")
    assert single_process(["-i", str(flux_ckpt), "-o", str(out), "--simple", "--quiet"]) == 0
    assert leftovers(out) == [out]


def test_an_explicit_gpu_index_is_refused_before_any_file_exists(flux_ckpt, tmp_path, monkeypatch, capsys):
    # Environment of rank 0 of a 2-process launch; the flag is checked before the process group starts.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    out = tmp_path / "out.safetensors"
    assert single_process(["-i", str(flux_ckpt), "-o", str(out), "--device", "cuda:1", "--quiet"]) == 1
    assert "pass --device cuda and each rank uses cuda:<LOCAL_RANK>" in capsys.readouterr().err
    assert leftovers(out) == []


def test_each_rank_gets_its_own_gpu():
    assert rank_device("cuda", 3) == "cuda:3"
    assert rank_device("cpu", 3) == "cpu"
    with pytest.raises(ValueError, match="--device cuda"):
        rank_device("cuda:1", 0)


@pytest.mark.slow
def test_two_ranks_write_the_single_process_bytes(flux_ckpt, tmp_path):
    common = ["-i", str(flux_ckpt), *LEARNED]
    reference = tmp_path / "single.safetensors"
    assert single_process([*common, "-o", str(reference)]) == 0

    out, report = tmp_path / "dist.safetensors", tmp_path / "r.json"
    done = torchrun([*common, "-o", str(out), "--verify", "--report", str(report)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == reference.read_bytes()
    assert leftovers(out) == [out]
    rep = json.loads(report.read_text())
    assert rep["verify"]["ok"]
    assert len(rep["layers"]) == len(plan_for(common).quantized)
    assert all(r["objective_after"] <= r["objective_before"] for r in rep["layers"])  # learned rounding ran


@pytest.mark.slow
def test_a_failing_rank_is_reported_by_rank_0_and_leaves_nothing(flux_ckpt, tmp_path):
    tensors = load_file(str(flux_ckpt))
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    args = ["-i", str(path), *LEARNED]
    plan = plan_for(args)
    owners = assign_ranks(plan, plan.tensors, 2)
    victim = next(t.name for t in plan.quantized if owners[t.name] == 1)
    tensors[victim] = tensors[victim].clone()
    tensors[victim][0, 0] = float("nan")
    save_file(tensors, str(path))

    out = tmp_path / "out.safetensors"
    failed = torchrun([*args, "-o", str(out)])
    assert failed.returncode != 0
    rank0_line = next(line for line in failed.stderr.splitlines() if "distributed conversion failed" in line)
    assert "rank 1 failed on tensor" in rank0_line and victim in rank0_line and "NaN" in rank0_line
    assert leftovers(out) == []


@pytest.mark.slow
def test_a_killed_rank_leaves_journals_and_resume_matches(flux_ckpt, tmp_path):
    common = ["-i", str(flux_ckpt), *LEARNED]
    reference = tmp_path / "single.safetensors"
    assert single_process([*common, "-o", str(reference)]) == 0

    out = tmp_path / "dist.safetensors"
    killed = torchrun([*common, "-o", str(out)], {KILL_HOOK_ENV: "1", KILL_RANK_ENV: "1"})
    assert killed.returncode != 0
    partial = partial_path(out)
    assert not out.exists() and partial.exists()
    journal1 = [p for p in journals_beside(partial) if p.name.endswith(".rank1")]
    assert journal1 and len(journal1[0].read_text().splitlines()) == 1 + 1  # header + the one finished layer

    resumed = torchrun([*common, "-o", str(out), "--resume", "--report", str(tmp_path / "r.json")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert out.read_bytes() == reference.read_bytes()
    assert leftovers(out) == [out]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["totals"]["resumed_tensors"] >= 1
    assert len(rep["layers"]) == len(plan_for(common).quantized)
