"""A benchmark result, not a sample: every variant timed in several fresh processes, median with min-max.

    python benchmarks/fresh.py linear --repeats 3 --variants lrq_fp8dq_row ao_fp8dq_row -- --shapes 3072x9216
    python benchmarks/fresh.py block --repeats 3 --variants lrq_fp8_row ao_fp8_row -- --blocks 2 --tokens 4608

One process per (variant, repeat) runs the benchmark script (``bench_linear.py`` with ``--only VARIANT``,
``bench_block.py`` with ``--variants VARIANT``) and writes its CSV; everything after ``--`` goes to the script
unchanged. Each process compiles and autotunes from scratch: it gets empty Inductor and Triton cache directories
(``--warm-caches`` shares the user's), so one process's autotuning choices never reach another. Processes run one
at a time, repeat by repeat, each repeat in a rotated variant order, so drift of clocks or temperature over the
call reaches every variant alike.

Both scripts time the bf16 baselines in every process (``bench_block.py`` in worker processes of the same call) and
write ``ratio_vs_bf16`` against the best of them, so each process gives one ratio sample against its own baseline.
The tables give, for every (shape, batch) or stack, each method's median and [min-max] over its processes of the
time, that ratio and the SQNR, and ``n``: the processes that gave a row (``2/3`` when one of three did not). The
baseline rows are pooled over every process of the call. torchao's variants are variants like ours: list them.

A process that crashes, times out (``--timeout``, seconds; its whole process group is stopped) or gives no row
for its variant is reported with its exit status and the last lines of its stderr; the others go on, the rows a
failed process finished are kept, and the call exits 1. Logs, CSVs and a merged raw CSV stay in ``--work-dir``.

``--fake`` runs a stand-in for the script (stdlib Python printing rows with the script's columns and some
process-to-process drift) so the scheduling, merging and statistics run without a GPU; the stand-in's variant
``crash`` exits 3 (``bench_block.py``'s worker failure: exit 0 without the row) and ``hang`` never finishes.

This file imports only the standard library (tests load it by path).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIN_REPEATS = 3
TAIL_LINES = 6
KILL_GRACE_S = 15.0


@dataclass(frozen=True)
class Bench:
    """How fresh.py drives one benchmark script and reads its CSV."""

    script: str
    select_flag: str  # the script's own option that keeps one variant
    name_column: str
    key_columns: tuple[str, ...]  # the columns that name one table (shape and batch)
    metrics: tuple[tuple[str, str, int], ...]  # (CSV column, heading, decimals)
    baselines: tuple[str, ...] = ("bf16_eager", "bf16_compiled")


BENCHES = {
    "linear": Bench(
        "bench_linear.py",
        "--only",
        "method",
        ("K", "N", "M"),
        (("median_us", "us", 1), ("ratio_vs_bf16", "x bf16", 3), ("sqnr_db", "SQNR dB", 1)),
    ),
    "block": Bench(
        "bench_block.py",
        "--variants",
        "variant",
        (),
        (("median_ms", "ms", 3), ("ratio_vs_bf16", "x bf16", 3), ("sqnr_db", "SQNR dB", 1)),
    ),
}


@dataclass
class Process:
    """One fresh process: what it ran and how it ended."""

    selection: str
    repeat: int
    log: str  # path prefix of its .out / .err / .csv
    returncode: int | None = None
    timed_out: bool = False
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)

    def problem(self, bench: Bench) -> str | None:
        """Why this process is not a full sample, or None."""
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        if self.returncode != 0:
            return f"exit {self.returncode}"
        if self.selection in bench.baselines:
            return None
        keys = {tuple(row[c] for c in bench.key_columns) for row in self.rows}
        timed = {
            tuple(row[c] for c in bench.key_columns)
            for row in self.rows
            if row[bench.name_column] not in bench.baselines
        }
        if not timed:
            return "exit 0 but no row for the variant"
        if keys - timed:  # the scripts print FAILED for a method that failed at one batch and go on
            missing = ", ".join(
                " ".join(f"{c}={v}" for c, v in zip(bench.key_columns, key)) for key in sorted(keys - timed)
            )
            return f"exit 0 but no row for the variant at {missing}"
        return None

    def tail(self) -> list[str]:
        """The lines of its stdout that say FAILED (the scripts report a method that failed to compile or time
        there and carry on) and the last lines of its stderr; without either, the last lines of its stdout."""
        err = _read_lines(self.log + ".err")[-TAIL_LINES:]
        out = _read_lines(self.log + ".out")
        failed = [line.strip() for line in out if "FAILED" in line][-TAIL_LINES:]
        return failed + err if failed or err else out[-TAIL_LINES:]  # a silent hang: where its progress stopped


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def schedule(variants: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, variant) in run order: repeat by repeat, each repeat's variant order rotated by one."""
    order = []
    for r in range(repeats):
        shift = r % len(variants)
        order += [(r, v) for v in variants[shift:] + variants[:shift]]
    return order


def read_rows(path: str) -> list[dict]:
    """The complete rows of a CSV a process wrote (none if it wrote none; a row cut off by a kill is dropped)."""
    if not os.path.exists(path) or not os.path.getsize(path):
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if None not in row.values() and None not in row]


def run_process(cmd: list[str], log: str, timeout_s: float, env: dict) -> tuple[int, bool, float]:
    """Run ``cmd`` in its own process group, stdout / stderr to ``log``.out / .err; on timeout stop the whole group
    (SIGTERM, then SIGKILL after a grace period: the scripts' worker processes and compile workers go too).
    Returns (exit status, timed out, seconds)."""
    start = time.monotonic()
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
            return proc.returncode, False, time.monotonic() - start
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return proc.returncode, True, time.monotonic() - start
        except KeyboardInterrupt:
            _stop_group(proc)
            raise


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def summarize(processes: list[Process], bench: Bench) -> list[tuple[tuple, list[dict]]]:
    """Per table key (the values of ``bench.key_columns``), one line per method: ``name``, ``n`` (rows), ``of``
    (processes launched that could give it: every process for a baseline, else those of the selections that
    gave it anywhere) and, per metric column, (median, min, max) over the rows, or None without a number.
    A selected variant without a row in a table still has its line (``n`` = 0). Tables in first-seen order;
    lines: baselines first, then the selections' order, then other names (``ceilings`` gives two)."""
    launched: dict[str, int] = {}
    for p in processes:
        launched[p.selection] = launched.get(p.selection, 0) + 1
    samples: dict[tuple, dict[str, list[dict]]] = {}
    selections_of: dict[str, set[str]] = {}
    for p in processes:
        for row in p.rows:
            key = tuple(row[c] for c in bench.key_columns)
            name = row[bench.name_column]
            samples.setdefault(key, {}).setdefault(name, []).append(row)
            selections_of.setdefault(name, set()).add(p.selection)
    renamed = {s for n, sels in selections_of.items() if n not in (*bench.baselines, *launched) for s in sels}
    expected = [s for s in launched if s not in bench.baselines and s not in renamed]  # rows named as selected
    rank = {name: i for i, name in enumerate([*bench.baselines, *launched])}
    tables = []
    for key, by_name in samples.items():
        names = sorted(dict.fromkeys([*by_name, *expected]), key=lambda n: rank.get(n, len(rank)))
        lines = []
        for name in names:
            rows = by_name.get(name, [])
            of = (
                len(processes) if name in bench.baselines else sum(launched[s] for s in selections_of.get(name, {name}))
            )
            line = {"name": name, "n": len(rows), "of": of}
            for column, _, _ in bench.metrics:
                values = [v for v in (_number(r.get(column)) for r in rows) if v is not None]
                line[column] = (statistics.median(values), min(values), max(values)) if values else None
            lines.append(line)
        tables.append((key, lines))
    return tables


def format_tables(tables: list[tuple[tuple, list[dict]]], bench: Bench, untitled: str) -> str:
    """The tables as text: ``median [min-max]`` per metric, ``n`` (``n/of`` when short)."""
    out = []
    for key, lines in tables:
        title = "  ".join(f"{c}={v}" for c, v in zip(bench.key_columns, key)) or untitled
        out.append(f"\n{title}    median [min-max] over fresh processes")
        cells = [[line["name"], *(_cell(line[c], d) for c, _, d in bench.metrics), _count(line)] for line in lines]
        head = ["method", *(h for _, h, _ in bench.metrics), "n"]
        widths = [max(len(str(row[i])) for row in [head, *cells]) for i in range(len(head))]
        for row in [head, *cells]:
            padded = [row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]
            out.append("  " + "  ".join(padded))
    return "\n".join(out)


def _cell(stats: tuple[float, float, float] | None, decimals: int) -> str:
    if stats is None:
        return "-"
    median, low, high = stats
    return f"{median:.{decimals}f} [{low:.{decimals}f}-{high:.{decimals}f}]"


def _count(line: dict) -> str:
    return str(line["n"]) if line["n"] >= line["of"] else f"{line['n']}/{line['of']}"


def write_summary(path: str, tables, bench: Bench) -> None:
    fields = [*bench.key_columns, "method", "n", "of"]
    fields += [f"{c}_{stat}" for c, _, _ in bench.metrics for stat in ("median", "min", "max")]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for key, lines in tables:
            for line in lines:
                row = dict(zip(bench.key_columns, key), method=line["name"], n=line["n"], of=line["of"])
                for c, _, _ in bench.metrics:
                    stats = line[c] or ("", "", "")
                    row.update({f"{c}_{s}": _rounded(v) for s, v in zip(("median", "min", "max"), stats)})
                writer.writerow(row)


def _rounded(value):
    return round(value, 6) if isinstance(value, float) else value


def write_raw(path: str, processes: list[Process]) -> None:
    """Every row of every process, with the process's selection and repeat in front."""
    rows = [{"selection": p.selection, "repeat": p.repeat, **row} for p in processes for row in p.rows]
    if not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def command_for(bench: Bench, variant: str, script_args: list[str], csv_path: str, fake: bool) -> list[str]:
    script = [str(HERE / "fresh.py"), "--emulate", bench.script] if fake else [str(HERE / bench.script)]
    return [sys.executable, *script, *script_args, bench.select_flag, variant, "--csv", csv_path]


def process_env(cache_dir: str | None) -> dict:
    env = dict(os.environ)
    if cache_dir is not None:  # nothing compiled or autotuned by an earlier process is found on disk
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir, "inductor")
        env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    return env


def run_all(bench: Bench, args, script_args: list[str], work_dir: str) -> list[Process]:
    order = schedule(args.variants, args.repeats)
    processes = []
    try:
        for i, (repeat, variant) in enumerate(order):
            p = Process(variant, repeat, os.path.join(work_dir, f"r{repeat}_{variant}"))
            processes.append(p)
            cache = None if args.warm_caches else os.path.join(work_dir, "cache")
            cmd = command_for(bench, variant, script_args, p.log + ".csv", args.fake)
            p.returncode, p.timed_out, p.seconds = run_process(cmd, p.log, args.timeout, process_env(cache))
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)
            p.rows = read_rows(p.log + ".csv")
            problem = p.problem(bench)
            print(
                f"[{i + 1}/{len(order)}] {variant} (repeat {repeat + 1}): {p.seconds:.0f} s, {len(p.rows)} rows"
                + (f", {problem}" if problem else ""),
                flush=True,
            )
    except KeyboardInterrupt:
        print("interrupted: the processes so far follow", flush=True)
        if processes and processes[-1].returncode is None:
            processes[-1].returncode, processes[-1].timed_out = -signal.SIGINT, False
            processes[-1].rows = read_rows(processes[-1].log + ".csv")
    return processes


def machine_line(processes: list[Process]) -> str:
    """The GPU / versions line the scripts print first (from the first process that printed one)."""
    for p in processes:
        for line in _read_lines(p.log + ".out")[:3]:
            if line.startswith("GPU "):
                return line
    return "(no process printed its GPU / versions line)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--emulate"]:
        return emulate(argv[1], argv[2:])
    ours, script_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Script arguments follow --.")
    parser.add_argument("bench", choices=list(BENCHES))
    parser.add_argument("--variants", nargs="+", required=True, help="variants to time (each in its own processes)")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="fresh processes per variant (>= 3)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one process may run")
    parser.add_argument("--work-dir", help="keep logs and CSVs here (default: a new temporary directory)")
    parser.add_argument("--csv", help="summary CSV (default fresh_<bench>.csv); the raw rows go to *_raw.csv")
    parser.add_argument("--warm-caches", action="store_true", help="share the Inductor / Triton disk caches")
    parser.add_argument("--fake", action="store_true", help="run a CPU stand-in for the script (tests fresh.py)")
    args = parser.parse_args(ours)
    bench = BENCHES[args.bench]
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats {args.repeats}: a result needs at least {MIN_REPEATS} fresh processes per variant")
    for flag in (bench.select_flag, "--csv"):
        if flag in script_args:
            parser.error(f"fresh.py sets {flag} for {bench.script} itself: give the variants with --variants")
    work_dir = args.work_dir or tempfile.mkdtemp(prefix=f"fresh_{args.bench}_")
    os.makedirs(work_dir, exist_ok=True)
    print(f"{bench.script} {' '.join(script_args)}: {args.repeats} fresh processes per variant; logs in {work_dir}")
    processes = run_all(bench, args, script_args, work_dir)

    tables = summarize(processes, bench)
    print("\n" + machine_line(processes))
    print(f"command: python benchmarks/fresh.py {' '.join(argv)}")
    print(format_tables(tables, bench, untitled=f"{bench.script} {' '.join(script_args)}".strip()))
    summary = args.csv or f"fresh_{args.bench}.csv"
    write_summary(summary, tables, bench)
    write_raw(summary.removesuffix(".csv") + "_raw.csv", processes)
    failed = [p for p in processes if p.problem(bench)]
    for p in failed:
        print(f"\nFAILED {p.selection} (repeat {p.repeat + 1}): {p.problem(bench)}; log {p.log}.out / .err")
        print("".join(f"    {line}\n" for line in p.tail()), end="")
    return 1 if failed else 0


# --- the stand-in for --fake: the scripts' CSV columns, numbers with process-to-process drift -----------------

LINEAR_COLUMNS = ["K", "N", "M", "method", "backend", "p20_us", "median_us", "p80_us", "ratio_vs_bf16", "tflops"]
LINEAR_COLUMNS += ["gbs", "pct_copy_bw", "sqnr_db", "setup_s"]


def emulate(script: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["3072x9216"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--only", nargs="+", default=[])
    parser.add_argument("--variants", nargs="+", default=[])
    parser.add_argument("--csv", required=True)
    args, _ = parser.parse_known_args(argv)
    selected = args.only or args.variants
    rng = random.Random(os.getpid() * 1_000_003 + time.time_ns())
    drift = rng.uniform(0.95, 1.05)  # what a fresh process changes: clocks, autotuning picks
    print("GPU stand-in (fresh.py --fake) | torch - | triton - | python", sys.version.split()[0], flush=True)
    if "hang" in selected:
        time.sleep(3600)
    if "crash" in selected and script == "bench_linear.py":
        print("Traceback (most recent call last):\nRuntimeError: stand-in crash", file=sys.stderr)
        return 3
    speedup = {name: 1.1 + (sum(map(ord, name)) % 70) / 100 for name in selected}

    def time_of(name: str, bf16: float) -> float:
        base = bf16 * (1.08 if name == "bf16_eager" else 1.0) / speedup.get(name, 1.0)
        return base * drift * rng.uniform(0.99, 1.01)

    if script == "bench_block.py":
        rows = []
        for name in ["bf16_eager", "bf16_compiled", *selected]:
            if name == "crash":
                print(f"  {name:<18} FAILED (exit 1): RuntimeError: stand-in worker failure", flush=True)
                continue
            ms = time_of(name, 40.0)
            rows.append({"variant": name, "how": "stand-in", "p20_ms": ms * 0.99, "median_ms": ms})
            rows[-1].update(p80_ms=ms * 1.01, sqnr_db=100.0 if name.startswith("bf16") else 30 + speedup[name])
        best = min(r["median_ms"] for r in rows[:2])
        _write(
            args.csv, [dict(r, ratio_vs_bf16=best / r["median_ms"]) for r in rows], list(rows[0]) + ["ratio_vs_bf16"]
        )
        return 0
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x")) if "x" in shape else (3072, 9216)
        for m in args.batches:
            bf16 = 5.0 + 2 * m * n * k / 400e6 + 2 * n * k / 4e6  # us: 400 TFLOP/s, 4 TB/s
            times = {name: time_of(name, bf16) for name in ["bf16_eager", "bf16_compiled", *selected]}
            best = min(times["bf16_eager"], times["bf16_compiled"])
            for name, us in times.items():
                sqnr = 100.0 if name.startswith("bf16") else 28 + speedup[name]
                rows.append(dict.fromkeys(LINEAR_COLUMNS, ""))
                rows[-1].update(K=k, N=n, M=m, method=name, backend="stand-in", median_us=round(us, 2))
                rows[-1].update(ratio_vs_bf16=round(best / us, 3), sqnr_db=round(sqnr, 1), setup_s=0.0)
    _write(args.csv, rows, LINEAR_COLUMNS)
    return 0


def _write(path: str, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # timeout(1) on us: stop the running group, report
    sys.exit(main())
