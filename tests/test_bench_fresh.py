"""benchmarks/fresh.py: scheduling, merging and statistics over fresh processes, and crash / timeout handling.

The module imports only the standard library and is loaded by path (benchmarks/ is not a package)."""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "fresh.py"
_spec = importlib.util.spec_from_file_location("bench_fresh", _PATH)
fresh = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fresh  # dataclasses look their module up there
_spec.loader.exec_module(fresh)

LINEAR = fresh.BENCHES["linear"]


def _row(m, method, us, ratio, sqnr=""):
    return {"K": "96", "N": "64", "M": str(m), "method": method, "median_us": str(us), "ratio_vs_bf16": str(ratio)} | {
        "sqnr_db": str(sqnr)
    }


def _process(selection, repeat, rows, returncode=0):
    return fresh.Process(selection, repeat, f"/nonexistent/r{repeat}_{selection}", returncode, False, 1.0, rows)


def test_schedule_interleaves_repeats_and_rotates_the_order():
    order = fresh.schedule(["a", "b", "c"], 4)
    assert order[:3] == [(0, "a"), (0, "b"), (0, "c")] and order[3:6] == [(1, "b"), (1, "c"), (1, "a")]
    assert order[9:] == [(3, "a"), (3, "b"), (3, "c")]
    assert sorted(order) == sorted((r, v) for r in range(4) for v in "abc")


def test_ratios_are_per_process_samples_and_baselines_pool_over_every_process():
    processes = []
    # each process: its own baseline (drifting by process) and a ratio against it, as the scripts write them
    for repeat, (bf16, ours, theirs) in enumerate([(10.0, 8.0, 9.0), (12.0, 9.0, 11.0), (11.0, 8.5, 10.5)]):
        base = [_row(1, "bf16_eager", bf16 * 1.1, 1 / 1.1), _row(1, "bf16_compiled", bf16, 1.0)]
        processes.append(_process("lrq", repeat, [*base, _row(1, "lrq", ours, round(bf16 / ours, 4), 30.5)]))
        processes.append(_process("ao", repeat, [*base, _row(1, "ao", theirs, round(bf16 / theirs, 4), "inf")]))
    [(key, lines)] = fresh.summarize(processes, LINEAR)
    assert key == ("96", "64", "1") and [line["name"] for line in lines] == ["bf16_eager", "bf16_compiled", "lrq", "ao"]
    by_name = {line["name"]: line for line in lines}
    assert (by_name["bf16_compiled"]["n"], by_name["bf16_compiled"]["of"]) == (6, 6)
    assert by_name["bf16_compiled"]["median_us"] == (11.0, 10.0, 12.0)
    assert by_name["lrq"]["ratio_vs_bf16"] == (1.2941, 1.25, 1.3333)  # samples 1.25, 1.3333, 1.2941
    assert by_name["lrq"]["median_us"] == (8.5, 8.0, 9.0) and by_name["lrq"]["sqnr_db"] == (30.5, 30.5, 30.5)
    assert by_name["ao"]["sqnr_db"] == (float("inf"),) * 3
    assert by_name["bf16_eager"]["sqnr_db"] is None  # an empty column is no number


def test_a_short_variant_shows_n_of_launched_and_a_silent_one_still_has_its_line():
    base = [_row(1, "bf16_compiled", 10.0, 1.0), _row(16, "bf16_compiled", 11.0, 1.0)]
    processes = [_process("lrq", r, [*base, _row(1, "lrq", 8.0, 1.25), _row(16, "lrq", 9.0, 1.22)]) for r in (0, 1)]
    processes.append(_process("lrq", 2, [*base, _row(1, "lrq", 8.2, 1.22)]))  # failed timing at M = 16
    processes += [_process("broken", r, [], returncode=1) for r in range(3)]
    ceilings = [_row(1, "scaled_mm_ceiling", 6.0, 1.6), _row(16, "scaled_mm_ceiling", 7.0, 1.5)]
    ceilings.append(_row(16, "int_mm_ceiling", 5.0, 2.0))  # the script times it at M > 16 only
    processes += [_process("ceilings", r, [*base, *ceilings]) for r in range(3)]
    tables = dict(fresh.summarize(processes, LINEAR))
    m1 = {line["name"]: line for line in tables[("96", "64", "1")]}
    m16 = {line["name"]: line for line in tables[("96", "64", "16")]}
    assert (m1["lrq"]["n"], m16["lrq"]["n"], m16["lrq"]["of"]) == (3, 2, 3)
    assert (m1["broken"]["n"], m1["broken"]["of"], m1["broken"]["median_us"]) == (0, 3, None)
    assert (m16["int_mm_ceiling"]["n"], m16["int_mm_ceiling"]["of"]) == (3, 3) and "ceilings" not in m16
    assert m16["bf16_compiled"]["of"] == 9
    text = fresh.format_tables([(("96", "64", "16"), tables[("96", "64", "16")])], LINEAR, "")
    assert "K=96  N=64  M=16" in text
    assert any(line.split()[:1] == ["lrq"] and line.endswith("2/3") for line in text.splitlines())
    assert "9.0 [9.0-9.0]" in text and "1.220 [1.220-1.220]" in text
    assert processes[2].problem(LINEAR) == "exit 0 but no row for the variant at K=96 N=64 M=16"
    assert processes[3].problem(LINEAR) == "exit 1" and processes[6].problem(LINEAR) is None


def test_read_rows_drops_a_row_cut_off_by_a_kill(tmp_path):
    path = tmp_path / "cut.csv"
    path.write_text("K,N,M,method,median_us\n96,64,1,bf16_compiled,10.0\n96,64,16,bf16_com")
    assert fresh.read_rows(str(path)) == [
        {"K": "96", "N": "64", "M": "1", "method": "bf16_compiled", "median_us": "10.0"}
    ]
    assert fresh.read_rows(str(tmp_path / "absent.csv")) == []


def test_a_crash_is_reported_and_a_timeout_stops_the_process(tmp_path):
    crash = [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    code, timed_out, _ = fresh.run_process(crash, str(tmp_path / "crash"), 30, dict(os.environ))
    assert (code, timed_out) == (3, False) and (tmp_path / "crash.err").read_text() == "boom\n"
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    code, timed_out, seconds = fresh.run_process(hang, str(tmp_path / "hang"), 0.3, dict(os.environ))
    assert (code, timed_out) == (-signal.SIGTERM, True) and seconds < 10


def test_stopping_a_process_stops_its_children(tmp_path):
    """A script's worker processes (and Inductor's compile workers) share its process group and go with it."""
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.02)
    fresh._stop_group(proc)
    assert proc.returncode == -signal.SIGTERM
    while time.monotonic() < deadline:
        try:
            os.kill(int(pid_file.read_text()), 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    pytest.fail("the child outlived its parent's process group")


def test_fake_run_end_to_end(tmp_path):
    """Stand-in processes through main(): a result per variant, a crash reported, the summary CSV written."""
    out = tmp_path / "summary.csv"
    args = ["block", "--fake", "--work-dir", str(tmp_path / "work"), "--csv", str(out), "--variants", "v", "crash"]
    assert fresh.main([*args, "--", "--blocks", "2"]) == 1
    with open(out, newline="") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert (rows["bf16_compiled"]["n"], rows["v"]["n"], rows["crash"]["n"]) == ("6", "3", "0")
    assert (
        float(rows["v"]["ratio_vs_bf16_min"])
        <= float(rows["v"]["ratio_vs_bf16_median"])
        <= float(rows["v"]["ratio_vs_bf16_max"])
    )
    assert (tmp_path / "summary_raw.csv").read_text().count("\n") == 1 + 3 * 3 + 3 * 2
