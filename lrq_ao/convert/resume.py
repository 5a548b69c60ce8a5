"""The resume journal: a JSON-lines sidecar ``<output>.partial.journal`` beside the partial output.

Line 1 holds the plan hash (input files and header, every decision, output layout, config). Each later line says one
output group is complete (its bytes are already in the partial file) and carries the layer's report record. A line
is appended only after the tensor bytes are written, so a process killed at any point leaves a journal that lists
only finished work; a torn last line (killed mid-append) is ignored. Bytes written by the kernel survive a killed
process; surviving a power loss would need an fsync per layer, which we do not pay for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

JOURNAL_VERSION = 1


def journal_path(partial: Path) -> Path:
    return Path(partial).with_name(Path(partial).name + ".journal")


def rank_journal_path(journal: Path, rank: int) -> Path:
    """The journal of one torchrun rank (``convert.distributed``): ``<journal>.rank<r>``."""
    return Path(journal).with_name(Path(journal).name + f".rank{rank}")


def rank_journals(journal: Path) -> list[Path]:
    """Every rank journal beside ``journal``, from any earlier distributed run."""
    journal = Path(journal)
    return sorted(p for p in journal.parent.glob(journal.name + ".rank*") if p.is_file())


class Journal:
    def __init__(self, path: Path, plan_hash: str, done: dict[str, dict[str, Any]], fd: int):
        self.path = path
        self.plan_hash = plan_hash
        self.done = done
        self._fd = fd

    @classmethod
    def start(cls, path: Path, plan_hash: str) -> Journal:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, (json.dumps({"journal": JOURNAL_VERSION, "plan": plan_hash}) + "\n").encode())
        return cls(path, plan_hash, {}, fd)

    @classmethod
    def reopen(cls, path: Path, plan_hash: str) -> Journal:
        """Load a journal for ``--resume``; ``ValueError`` if it belongs to a different conversion."""
        lines = Path(path).read_bytes().split(b"\n")
        try:
            head = json.loads(lines[0])
        except ValueError as e:
            raise ValueError(f"{path}: resume journal is unreadable; delete it and the .partial file") from e
        if head.get("plan") != plan_hash:
            raise ValueError(
                f"{path}: the partial output was made from a different input or different options; run without "
                f"--resume to start over (or restore the original input and flags)"
            )
        done: dict[str, dict[str, Any]] = {}
        good_end = len(lines[0]) + 1
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:
                break  # torn final line from a killed run: that group is redone
            done[entry["name"]] = entry.get("record") or {}
            good_end += len(line) + 1
        fd = os.open(path, os.O_WRONLY)
        os.ftruncate(fd, good_end)
        os.lseek(fd, good_end, os.SEEK_SET)
        return cls(path, plan_hash, done, fd)

    def mark_done(self, name: str, record: dict[str, Any] | None = None) -> None:
        self.done[name] = record or {}
        os.write(self._fd, (json.dumps({"name": name, "record": record}) + "\n").encode())

    def close(self, *, delete: bool) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if delete:
            self.path.unlink(missing_ok=True)
