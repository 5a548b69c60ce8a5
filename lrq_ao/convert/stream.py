"""Streaming safetensors I/O with bounded memory.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, offsets relative to the end of the header), then the
raw little-endian tensor bytes. ``read_source`` parses only the headers (of one file or of every shard named by a
``*.safetensors.index.json``); ``read_tensor`` reads one tensor's bytes with a single ``readinto`` so host memory
holds one copy of it; ``copy_bytes`` moves an untouched tensor in fixed-size chunks without decoding it.

``StreamingWriter`` writes the whole output header first (every output tensor's dtype and shape is known from the
plan), then each tensor's bytes at its offset in any order, into ``<output>.partial`` beside the target; ``finish``
fsyncs and renames. ``ShardedWriter`` does the same for a set of shards plus their ``*.safetensors.index.json``:
every file is written as ``<file>.partial`` and the final names appear only once all are complete, the index last.
Input files are only ever opened read-only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lrq_ao.convert.header import (
    DTYPE_NAMES,
    MAX_HEADER_BYTES,
    TORCH_DTYPES,
    CheckpointError,
    check_shard_contents,
    nbytes_of,
    read_header,
    read_weight_map,
    unique_shards,
)

__all__ = ["DTYPE_NAMES", "MAX_HEADER_BYTES", "CheckpointError"]  # re-exported: the header module owns them

# safetensors dtype names <-> torch dtypes: the format's names torch can hold (``header.DTYPE_BITS`` has them all).
DTYPES: dict[str, torch.dtype] = TORCH_DTYPES
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one input tensor lives: file, dtype name, shape and absolute byte range."""

    name: str
    path: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class Source:
    """A checkpoint's tensors (in file and offset order), its metadata and a fingerprint of its files."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    files: tuple[str, ...]
    fingerprint: str


def parse_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str], bytes]:
    """Parse and validate one safetensors file's header (``header.read_header``: every rule of the format). Returns
    ``(tensors in offset order, metadata, raw_header_bytes)``; raises ``CheckpointError`` naming the file and tensor,
    also for a dtype torch cannot hold (the converter must read or copy every tensor)."""
    header = read_header(path)
    base = header.data_start
    tensors = {}
    for e in sorted(header.entries.values(), key=lambda e: (e.begin, e.end)):
        if e.dtype not in DTYPES:
            raise CheckpointError(
                f"{header.path}: tensor {e.name!r} has dtype {e.dtype}, which lrq-convert cannot handle; remove it or "
                f"convert it to a torch dtype first"
            )
        tensors[e.name] = TensorInfo(e.name, header.path, e.dtype, e.shape, base + e.begin, base + e.end)
    return tensors, header.metadata, header.raw


def resolve_input(path: str | Path) -> tuple[list[Path], Path | None]:
    """The safetensors file behind ``path`` and ``None``, or ``([], index)`` for an index JSON or a folder holding one
    index (a folder may instead hold exactly one .safetensors file)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"input {path} does not exist")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return [], indexes[0]
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several *.safetensors.index.json files; pass the one to use with -i")
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files, None
        raise CheckpointError(
            f"{path}: a folder input needs one *.safetensors.index.json (or exactly one .safetensors file), "
            f"found {len(files)} .safetensors files and no index"
        )
    if path.name.endswith(".index.json"):
        return [], path
    return [path], None


def read_source(path: str | Path, *, allow_outside: bool = False) -> Source:
    """Read the headers of every file behind ``path`` (nothing else). Raises ``CheckpointError`` for bad input.

    A sharded input's index is validated (``header.read_weight_map``): its shards must lie in its folder unless
    ``allow_outside``, and it must map exactly the tensors each shard holds."""
    files, index = resolve_input(path)
    weight_map = None
    if index is not None:
        weight_map = read_weight_map(index, allow_outside=allow_outside)
        files = unique_shards(weight_map)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    digest = hashlib.sha256()
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"shard {file} named by the index does not exist")
        infos, meta, raw = parse_header(file)
        if weight_map is not None:
            check_shard_contents(index, weight_map, file, infos)
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].path} and {file}")
            tensors[name] = info
        metadata.update(meta)
        st = file.stat()
        digest.update(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
        digest.update(raw)
    return Source(tensors, metadata, tuple(str(f) for f in files), digest.hexdigest())


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into a fresh CPU tensor (a single copy in host memory)."""
    out = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        with open(info.path, "rb", buffering=0) as f:
            f.seek(info.start)
            got = f.readinto(memoryview(out.numpy()))
        if got != info.nbytes:
            raise CheckpointError(f"{info.path}: tensor {info.name!r} is truncated ({got} of {info.nbytes} bytes)")
    return out.view(info.torch_dtype).reshape(info.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without copying if it is contiguous."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class OutputEntry:
    """One output tensor: name, safetensors dtype name, shape; ``offset`` is relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


def layout_entries(entries: list[OutputEntry]) -> tuple[list[OutputEntry], int]:
    """Assign contiguous data offsets in the given order. Returns ``(entries, data_bytes)``."""
    offset, placed = 0, []
    for e in entries:
        placed.append(OutputEntry(e.name, e.dtype, e.shape, offset))
        offset += e.nbytes
    return placed, offset


def encode_header(entries: list[OutputEntry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus JSON header (space-padded to a multiple of 8, as the safetensors library does)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.offset, e.offset + e.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class OutputBusyError(RuntimeError):
    """Another process is writing the same output (it holds the lock on its ``.partial`` file)."""


PARTIAL_MODE = 0o600  # a partial file is private while written; ``finish`` gives it the output's mode
DEFAULT_MODE = 0o644


class StreamingWriter:
    """Writes a safetensors file whose header is known up front; tensor bytes may arrive in any order.

    Data goes to ``<target>.partial`` (same folder, so the final rename is atomic), on which the writer holds an
    exclusive ``flock`` from before it touches a byte until after the rename: a second writer of the same output
    gets ``OutputBusyError`` naming the process that holds it, and never truncates the first one's file
    (``lock=False`` is for the extra ranks of a torchrun conversion, which write into the file rank 0 locked).
    ``finish`` checks every tensor was written, fsyncs, sets ``mode`` (the input's permission bits) and renames.
    ``resume`` reopens a partial file for ``--resume``.
    """

    def __init__(
        self,
        target: Path,
        entries: list[OutputEntry],
        metadata: dict[str, str],
        *,
        resume: bool = False,
        lock: bool = True,
        mode: int = DEFAULT_MODE,
    ):
        self.target = Path(target)
        self.partial = partial_path(self.target)
        self.entries = {e.name: e for e in entries}
        self.header = encode_header(entries, metadata)
        self.total = len(self.header) + sum(e.nbytes for e in entries)
        self.mode = mode
        self.fd = -1
        flags = os.O_RDWR if resume else os.O_RDWR | os.O_CREAT
        try:
            self.fd = os.open(self.partial, flags, PARTIAL_MODE)
        except OSError as e:
            raise OSError(f"cannot create output file {self.partial} ({e.strerror}); choose another -o") from e
        if lock:
            take_lock(self.fd, self.partial)
        try:
            if resume:
                existing = os.pread(self.fd, len(self.header), 0)
                if existing != self.header or os.fstat(self.fd).st_size != self.total:
                    raise CheckpointError(
                        f"{self.partial} does not match this conversion's output layout; delete it or run without "
                        f"--resume"
                    )
            else:
                os.ftruncate(self.fd, 0)  # only now, under the lock: a partial file of an earlier run is replaced
                os.ftruncate(self.fd, self.total)
                self._pwrite(0, memoryview(self.header))
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def write(self, name: str, data: torch.Tensor | bytes | memoryview) -> None:
        entry = self.entries[name]
        buf = tensor_bytes(data) if isinstance(data, torch.Tensor) else memoryview(data)
        if buf.nbytes != entry.nbytes:
            raise ValueError(f"output tensor {name!r} expects {entry.nbytes} bytes, got {buf.nbytes}")
        self.write_at(entry, 0, buf)

    def write_at(self, entry: OutputEntry, within: int, buf: memoryview) -> None:
        self._pwrite(len(self.header) + entry.offset + within, buf)

    def _pwrite(self, pos: int, buf: memoryview) -> None:
        buf = buf.cast("B")
        while buf.nbytes:
            try:
                n = os.pwrite(self.fd, buf, pos)
            except OSError as e:
                raise _write_error(e, self.partial, buf.nbytes) from None
            buf, pos = buf[n:], pos + n

    def copy_from(self, name: str, info: TensorInfo) -> None:
        """Copy an input tensor's bytes unchanged, in bounded chunks."""
        entry = self.entries[name]
        if entry.nbytes != info.nbytes:
            raise ValueError(f"output tensor {name!r} expects {entry.nbytes} bytes, input has {info.nbytes}")
        with open(info.path, "rb", buffering=0) as f:
            done = 0
            while done < info.nbytes:
                chunk = os.pread(f.fileno(), min(COPY_CHUNK, info.nbytes - done), info.start + done)
                if not chunk:
                    raise CheckpointError(f"{info.path}: tensor {info.name!r} is truncated")
                self.write_at(entry, done, memoryview(chunk))
                done += len(chunk)

    @property
    def paths(self) -> list[Path]:
        """The final file names this writer produces."""
        return [self.target]

    def sync(self) -> None:
        """Flush the data to disk and give the file its final permission bits; it keeps its ``.partial`` name and
        this writer its lock."""
        os.fsync(self.fd)
        os.fchmod(self.fd, self.mode)

    def close(self) -> None:
        """Close the file (releasing the lock)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def sync_close(self) -> None:
        """Flush the data to disk and close; the file keeps its ``.partial`` name."""
        self.sync()
        self.close()

    def finish(self) -> Path:
        """Sync, rename ``.partial`` to the target while still holding the lock, then close."""
        try:
            self.sync()
            os.replace(self.partial, self.target)
            _fsync_dir(self.target.parent)
        finally:
            self.close()
        return self.target

    def abort(self, *, keep_partial: bool) -> None:
        """Close; delete the partial file unless it is kept for ``--resume``."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not keep_partial:
            self.partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class OutputFile:
    """One safetensors file of the output: its final path, its tensors (offsets within it) and its metadata."""

    path: Path
    entries: list[OutputEntry]
    metadata: dict[str, str]


class ShardedWriter:
    """Writes shards plus their index as one unit, with ``StreamingWriter``'s interface (``write``, ``copy_from``,
    ``finish``, ``abort``); each tensor goes to the shard that holds it.

    The index's content is known up front, so ``<index>.partial`` is written at the start: its presence marks an
    unfinished set (``--resume`` looks for it and its journal). ``finish`` fsyncs every shard, renames them, then
    renames the index, so a loader that starts from the index never sees an incomplete set.
    """

    def __init__(
        self,
        index: Path,
        files: list[OutputFile],
        index_json: bytes,
        *,
        resume: bool = False,
        lock: bool = True,
        mode: int = DEFAULT_MODE,
    ):
        self.target = Path(index)
        self.mode = mode
        self.partial = partial_path(self.target)
        self.index_json = index_json
        if resume:
            missing = [str(partial_path(f.path)) for f in files if not partial_path(f.path).is_file()]
            if not self.partial.is_file() or self.partial.read_bytes() != index_json or missing:
                what = f"shard partial files {missing} are missing" if missing else f"{self.partial} differs"
                raise CheckpointError(
                    f"{what}: the partial output does not match this conversion's shard layout; delete the .partial "
                    f"files or run without --resume"
                )
        self.writers: list[StreamingWriter] = []
        self.owns_index = False  # the index's partial file is ours once every shard's lock is held
        try:
            for f in files:
                writer = StreamingWriter(f.path, f.entries, f.metadata, resume=resume, lock=lock, mode=mode)
                self.writers.append(writer)
            self.owns_index = True
            if not resume:
                _write_file(self.partial, index_json)
        except BaseException:
            self.abort(keep_partial=resume)
            raise
        self.owner = {name: w for w in self.writers for name in w.entries}

    @property
    def paths(self) -> list[Path]:
        return [w.target for w in self.writers] + [self.target]

    def write(self, name: str, data: torch.Tensor | bytes | memoryview) -> None:
        self.owner[name].write(name, data)

    def copy_from(self, name: str, info: TensorInfo) -> None:
        self.owner[name].copy_from(name, info)

    def finish(self) -> Path:
        """Sync every shard, rename them, then the index (written last, so a loader starting from it never sees an
        incomplete set); the shards' locks are held until every rename is done."""
        try:
            for w in self.writers:
                w.sync()
            os.chmod(self.partial, self.mode)
            for w in self.writers:
                os.replace(w.partial, w.target)
            _fsync_dir(self.target.parent)
            os.replace(self.partial, self.target)
            _fsync_dir(self.target.parent)
        finally:
            for w in self.writers:
                w.close()
        return self.target

    def abort(self, *, keep_partial: bool) -> None:
        """Close every shard; delete every partial file (shards and index) unless they are kept for ``--resume``."""
        for w in self.writers:
            w.abort(keep_partial=keep_partial)
        if not keep_partial and self.owns_index:
            self.partial.unlink(missing_ok=True)


def open_output(
    target: Path,
    files: list[OutputFile],
    index_json: bytes | None,
    *,
    resume: bool = False,
    lock: bool = True,
    mode: int = DEFAULT_MODE,
) -> StreamingWriter | ShardedWriter:
    """The writer for a plan's output: one ``StreamingWriter`` (no index) or a ``ShardedWriter`` for shards + index;
    ``lock`` and ``mode`` as ``StreamingWriter`` takes them."""
    if index_json is None:
        (only,) = files
        return StreamingWriter(only.path, only.entries, only.metadata, resume=resume, lock=lock, mode=mode)
    return ShardedWriter(target, files, index_json, resume=resume, lock=lock, mode=mode)


def take_lock(fd: int, path: Path) -> None:
    """An exclusive, non-blocking ``flock`` on ``fd``; ``OutputBusyError`` naming the holder if another has it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        os.close(fd)
        raise OutputBusyError(
            f"{path} is being written by another conversion ({holder}); wait for it to finish, or choose another -o"
        ) from None


def lock_holder(fd: int) -> str:
    """Who holds the ``flock`` on ``fd``'s file: ``pid N: <command line>`` from ``/proc/locks`` (Linux), else a
    generic phrase."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                    pid = fields[4]
                    return f"pid {pid}: {_command_line(pid)}"
    except OSError:
        pass
    return "another process holds its lock"


def _command_line(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return "command unknown"
    text = " ".join(w.decode("utf-8", "replace") for w in words)
    return text if len(text) <= 200 else text[:197] + "..."


def _write_error(e: OSError, path: Path, remaining: int) -> OSError:
    """A write failure as one line; a full disk says so and what to do."""
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        error = OSError(
            f"disk full while writing {path} ({remaining} bytes still to write); free space or choose another -o, "
            f"then run again"
        )
    else:
        error = OSError(f"cannot write {path} ({e.strerror or e}); check the disk, then run again")
    error.errno = e.errno
    return error


def _write_file(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PARTIAL_MODE)
    except OSError as e:
        raise OSError(f"cannot create output file {path} ({e.strerror}); choose another -o") from e
    try:
        view = memoryview(data)
        while view.nbytes:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(target: Path) -> Path:
    return Path(target).with_name(Path(target).name + ".partial")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
