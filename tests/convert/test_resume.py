"""--resume after a real process is SIGKILLed mid-run gives a file byte-identical to an uninterrupted run."""

import json

import pytest

from lrq_ao.convert.cli import main
from lrq_ao.convert.engine import KILL_HOOK_ENV
from lrq_ao.convert.resume import Journal


def run_in_process(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


@pytest.mark.slow
def test_killed_twice_then_resumed_is_byte_identical(flux_ckpt, tmp_path, cli_subprocess, capsys):
    # Learned rounding (not --simple) so determinism of the rounding itself is part of what is checked.
    common = ["-i", str(flux_ckpt), "--format", "int8_blockwise", "--block_size", "64", "--objective", "svd"]
    common += ["--manual_seed", "7", "--quiet"]
    reference = tmp_path / "reference.safetensors"
    assert run_in_process([*common, "-o", str(reference)]) == 0

    out = tmp_path / "resumed.safetensors"
    partial = tmp_path / "resumed.safetensors.partial"
    journal = tmp_path / "resumed.safetensors.partial.journal"
    first = cli_subprocess([*common, "-o", str(out)], {KILL_HOOK_ENV: "3"})
    assert first.returncode == -9, first.stderr  # really killed, no cleanup ran
    assert partial.exists() and journal.exists() and not out.exists()
    assert len(journal.read_text().splitlines()) == 1 + 3

    assert run_in_process([*common, "-o", str(out), "--resume", "--manual_seed", "8"]) == 1
    assert "without --resume" in capsys.readouterr().err
    assert partial.exists()  # a refused resume leaves the partial work alone

    second = cli_subprocess([*common, "-o", str(out), "--resume"], {KILL_HOOK_ENV: "4"})
    assert second.returncode == -9
    lines = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    assert len(lines) == 3 + 4 and any(line["record"] for line in lines)  # quantized layers were among them

    report = tmp_path / "r.json"
    last = cli_subprocess([*common, "-o", str(out), "--resume", "--verify", "--report", str(report)])
    assert last.returncode == 0, last.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert not partial.exists() and not journal.exists()
    rep = json.loads(report.read_text())
    assert rep["verify"]["ok"] and rep["totals"]["resumed_tensors"] == 7
    # Records of layers finished before the kills come back from the journal, so the report is complete.
    assert len(rep["layers"]) == 7 and all(isinstance(r["sqnr_db"], float) for r in rep["layers"])


def test_journal_ignores_a_torn_last_line_and_checks_the_plan(tmp_path):
    path = tmp_path / "j"
    j = Journal.start(path, "plan-a")
    j.mark_done("a.weight", {"layer": "a"})
    j.mark_done("b.weight", None)
    j.close(delete=False)
    with open(path, "ab") as f:
        f.write(b'{"name": "c.wei')  # killed mid-append
    again = Journal.reopen(path, "plan-a")
    assert set(again.done) == {"a.weight", "b.weight"}
    again.mark_done("c.weight", None)
    again.close(delete=False)
    assert set(Journal.reopen(path, "plan-a").done) == {"a.weight", "b.weight", "c.weight"}
    with pytest.raises(ValueError, match="different input or different options"):
        Journal.reopen(path, "plan-b")
