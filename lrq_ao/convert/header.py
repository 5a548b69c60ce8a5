"""The one safetensors header parser of lrq_ao: the converter (``stream``) and the reader (``reader``) both use it.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON, then the data section.
The JSON is an object: ``"__metadata__"`` (optional; ``null`` or an object of strings to strings) and one entry per
tensor, ``{"dtype": NAME, "shape": [d0, ...], "data_offsets": [begin, end]}``, offsets relative to the data section.
``read_header`` enforces the rules the safetensors library (0.8, the authority: a file it cannot open is useless to
ComfyUI) applies when it opens a file, and a few stricter ones of ours, so an input we accept is one every loader
accepts and nothing in it can make us allocate more than the file holds:

* the header length fits the file and is at most ``MAX_HEADER_BYTES`` (100,000,000, the library's own cap), and the
  header holds at most ``MAX_HEADER_VALUES`` JSON values (a cap on the Python objects parsing it may create);
* the JSON is one object with nothing but whitespace after it; no ``NaN``/``Infinity``; no duplicate key at any
  level (the library keeps the last of two same-named tensors and then refuses the gap, or silently accepts an
  exact duplicate: we refuse both); no unpaired surrogate in a name or metadata string (it cannot be re-encoded);
* every dtype is one of the library's names (``DTYPE_BITS``); every dimension an integer (never ``true``) in
  ``[0, 2**63)``; ``shape``'s running product times the element bits fits in 64 bits (the library's overflow rule);
  sub-byte dtypes fill whole bytes; ``data_offsets`` two integers ``0 <= begin <= end``; ``end - begin`` is exactly
  the bytes the dtype and shape need;
* the byte ranges, sorted, tile the data section exactly: the first starts at 0, each starts where the previous
  ended (no gap, no overlap) and the last ends at the end of the file (no trailing bytes);
* the file is not mostly holes (``check_not_sparse``): a 4 KiB sparse file may declare gigabytes of zeros.

Every failure raises :class:`CheckpointError` (a ``ValueError``) whose one-line message names the file, the tensor
where there is one, and what to do.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_HEADER_BYTES = 100_000_000  # safetensors' MAX_HEADER_SIZE
# JSON values ("{", "[" and "," each start at most one more) a header may hold: ~10 per tensor entry, so 2 million is
# 200,000 tensors in one file (real checkpoints hold a few thousand); bounds the parse near 0.5 GB of Python objects.
MAX_HEADER_VALUES = 2_000_000
MAX_DIM = 2**63 - 1  # torch shapes are int64
U64_MAX = 2**64 - 1
SPARSE_MIN_BYTES = 64 * 2**20  # files smaller than this are never called sparse
ALLOW_SPARSE_ENV = "LRQ_AO_ALLOW_SPARSE"

# Every dtype name of the safetensors format -> (bits per element, torch dtype or None where torch has none).
DTYPE_BITS: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (8, torch.bool),
    "F4": (4, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
    "U8": (8, torch.uint8),
    "I8": (8, torch.int8),
    "F8_E5M2": (8, torch.float8_e5m2),
    "F8_E4M3": (8, torch.float8_e4m3fn),
    "F8_E8M0": (8, getattr(torch, "float8_e8m0fnu", None)),
    "I16": (16, torch.int16),
    "U16": (16, torch.uint16),
    "F16": (16, torch.float16),
    "BF16": (16, torch.bfloat16),
    "I32": (32, torch.int32),
    "U32": (32, torch.uint32),
    "F32": (32, torch.float32),
    "C64": (64, torch.complex64),
    "F64": (64, torch.float64),
    "I64": (64, torch.int64),
    "U64": (64, torch.uint64),
}
TORCH_DTYPES: dict[str, torch.dtype] = {name: dt for name, (_, dt) in DTYPE_BITS.items() if dt is not None}
DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in TORCH_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and tensor and says what is wrong."""


@dataclass(frozen=True, slots=True)
class HeaderEntry:
    """One tensor as the header declares it; ``begin``/``end`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPE_BITS[self.dtype][1]


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: entries in header order, metadata, the raw JSON bytes, and where data starts."""

    path: str
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    raw: bytes
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + len(self.raw)


def nbytes_of(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a tensor of ``dtype`` (a safetensors name) and ``shape`` occupies."""
    return math.prod(shape) * DTYPE_BITS[dtype][0] // 8


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of the safetensors file at ``path`` (the rules are in the module docstring).

    Returns a :class:`Header`; raises :class:`CheckpointError` naming the file (and tensor) otherwise.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes, no header length)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated: header length {n} bytes does not fit a {size}-byte "
                    f"file (the format allows at most {MAX_HEADER_BYTES})"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from None
    if len(raw) != n:
        raise CheckpointError(f"{path}: file shrank while reading its header; is another program writing it?")
    header = _parse_json(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", None))
    entries = {name: _entry(path, name, value) for name, value in header.items()}
    _check_tiling(path, entries.values(), size - 8 - n)
    check_not_sparse(path, st)
    return Header(path, entries, metadata, raw, size)


def _parse_json(path: str, raw: bytes) -> dict:
    values = raw.count(b"{") + raw.count(b"[") + raw.count(b",")
    if values > MAX_HEADER_VALUES:
        raise CheckpointError(
            f"{path}: header holds about {values} JSON values, more than the {MAX_HEADER_VALUES} lrq_ao reads (about "
            f"{MAX_HEADER_VALUES // 10} tensors); split the checkpoint into shards"
        )
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path}: not a safetensors file: header is not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a safetensors file: header JSON is nested too deeply") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not a safetensors file: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file: header must be a JSON object, got {_kind(header)}")
    for name in header:
        _check_text(path, name, "tensor name")
    return header


class _Duplicate(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Duplicate(f"key {dup!r} appears twice in one object; a safetensors name must be unique")
    return obj


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_text(path: str, text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(
            f"{path}: {what} {text!r} holds an unpaired surrogate; it cannot be written back"
        ) from None


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _metadata(path: str, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{path}: header __metadata__ must map strings to strings, got {_kind(metadata)} of values"
        )
    for key, value in metadata.items():
        _check_text(path, key, "metadata key")
        _check_text(path, value, f"metadata value of {key!r}")
    return metadata


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: str, name: str, value: object) -> HeaderEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: header entry must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}; safetensors names: {', '.join(DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of integers in [0, 2^63), got {_short(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and 0 <= o <= U64_MAX for o in offsets):
        raise CheckpointError(f"{where}: data_offsets must be two integers [begin, end], got {_short(offsets)}")
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    bits, running = DTYPE_BITS[dtype][0], 1
    for d in shape:  # the library multiplies left to right in 64 bits
        running *= d
        if running > U64_MAX:
            raise CheckpointError(f"{where}: shape {_short(shape)} overflows 64 bits")
    if running * bits > U64_MAX:
        raise CheckpointError(f"{where}: shape {_short(shape)} of {dtype} overflows 64 bits")
    if running * bits % 8:
        raise CheckpointError(f"{where}: {running} elements of {dtype} do not fill whole bytes")
    needed = running * bits // 8
    if end - begin != needed:
        raise CheckpointError(
            f"{where}: data_offsets span {end - begin} bytes but {dtype} of shape {_short(shape)} needs {needed}"
        )
    return HeaderEntry(name, dtype, tuple(shape), begin, end)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_tiling(path: str, entries, data_len: int) -> None:
    """The entries' byte ranges, sorted, must cover ``[0, data_len)`` exactly once."""
    pos, previous = 0, None
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            if e.begin < pos:
                raise CheckpointError(f"{path}: tensors {previous!r} and {e.name!r} overlap in the data section")
            raise CheckpointError(
                f"{path}: tensor {e.name!r} starts at data byte {e.begin}, leaving bytes {pos}..{e.begin} unused "
                f"(a gap the safetensors format does not allow); re-save the file"
            )
        if e.end > data_len:
            raise CheckpointError(
                f"{path}: tensor {e.name!r} ends at data byte {e.end} but the file holds {data_len} data bytes; the "
                f"file is truncated (re-download or re-copy it)"
            )
        pos, previous = e.end, e.name
    if pos != data_len:
        raise CheckpointError(
            f"{path}: {data_len - pos} bytes after the last tensor belong to none (trailing data the safetensors "
            f"format does not allow); re-save the file"
        )


def check_not_sparse(path: str, st: os.stat_result) -> None:
    """Refuse a file of at least ``SPARSE_MIN_BYTES`` whose allocated blocks cover less than half its size: such a
    sparse file declares gigabytes it does not hold, and converting it would allocate and write them all.
    ``LRQ_AO_ALLOW_SPARSE=1`` lifts the check (a compressing filesystem can make a real file look sparse)."""
    blocks = getattr(st, "st_blocks", None)
    if blocks is None or st.st_size < SPARSE_MIN_BYTES or os.environ.get(ALLOW_SPARSE_ENV) == "1":
        return
    stored = blocks * 512
    if stored * 2 < st.st_size:
        raise CheckpointError(
            f"{path}: sparse file: declares {st.st_size} bytes but only {stored} are stored on disk, so its tensors "
            f"are mostly holes; re-download the checkpoint (set {ALLOW_SPARSE_ENV}=1 if a compressing filesystem "
            f"causes this)"
        )


def resolve_shard(index: Path, name: object, *, allow_outside: bool = False) -> Path:
    """The shard file a ``*.safetensors.index.json`` names: a plain relative name that stays inside the index's folder
    (no absolute path, no ``..`` escaping it, symlinks resolved) unless ``allow_outside``. ``CheckpointError``
    otherwise."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{index}: weight_map values must be shard file names, got {_short(name)}")
    shard = index.parent / name
    if allow_outside:
        return shard
    folder = index.parent.resolve()
    if Path(name).is_absolute() or not shard.resolve().is_relative_to(folder):
        raise CheckpointError(
            f"{index}: shard {name!r} lies outside the index's folder {folder}; move the shards beside the index "
            f"(or pass --allow-shards-outside if you trust this index)"
        )
    return shard


def read_weight_map(index: Path, *, allow_outside: bool = False) -> dict[str, Path]:
    """Read and validate a ``*.safetensors.index.json``: a JSON object whose ``weight_map`` is a non-empty object of
    tensor name -> shard file name, each inside the index's folder unless ``allow_outside`` (``resolve_shard``).
    Returns tensor name -> resolved shard path (in the index's order; ``unique_shards`` lists the files); raises
    ``CheckpointError`` naming the index and what is wrong."""
    try:
        raw = index.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read the shard index ({e.strerror or e})") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise CheckpointError(f"{index}: shard index of {len(raw)} bytes is larger than any real one; is it an index?")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object, parse_constant=_no_constant)
    except RecursionError:
        raise CheckpointError(f"{index}: not a safetensors index: its JSON is nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{index}: not a safetensors index: not valid UTF-8 JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: not a safetensors index: needs a 'weight_map' object of tensor name -> shard file, got "
            f"{_kind(weight_map)}"
        )
    if not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' is empty; the index names no shard")
    resolved: dict[str, Path] = {}
    shards: dict[object, Path] = {}
    for tensor, name in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(
                f"{index}: weight_map maps tensor {tensor!r} to {_short(name)}, not a shard file name"
            )
        if name not in shards:
            shards[name] = resolve_shard(index, name, allow_outside=allow_outside).resolve()
        resolved[tensor] = shards[name]
    return resolved


def unique_shards(weight_map: dict[str, Path]) -> list[Path]:
    """The shard files of a ``read_weight_map`` result, each once, in first-mention order."""
    return list(dict.fromkeys(weight_map.values()))


def check_shard_contents(index: Path, weight_map: dict[str, Path], shard: Path, names) -> None:
    """Every tensor ``shard`` holds must be mapped to it by the index, and every tensor mapped to it present; a
    ``CheckpointError`` names the first that is not."""
    mapped = {k for k, v in weight_map.items() if v == shard}
    for key in sorted(set(names) ^ mapped):
        what = "holds" if key not in mapped else "lacks"
        raise CheckpointError(
            f"{shard}: {what} tensor {key!r}, but {index.name} maps it {'elsewhere' if what == 'holds' else 'here'}; "
            f"the index does not describe these shards (re-download it)"
        )
