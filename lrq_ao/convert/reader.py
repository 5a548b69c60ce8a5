"""Read ComfyUI quantized checkpoints back into lrq_ao tensors.

Accepts files written by lrq_ao, by the reference tool ``convert-to-quant`` and by ComfyUI, in every ComfyUI
format some format file of :mod:`lrq_ao.formats` registers a reader for (``lrq_ao.formats.comfy.reader_for``; the
8-bit scaled ones are ``float8_e4m3fn``, ``float8_e4m3fn_rowwise``, ``float8_e4m3fn_blockwise``,
``int8_tensorwise``, ``int8_blockwise``), and legacy ``scaled_fp8`` files (``scale_weight`` / ``scale_input``).
Every layer is validated before any tensor is used: marker JSON, known format, stored weight dtype against the
formats of that name, presence of the scale, then the format's own reader (scale dtype and shape), and that the
file holds every byte its header promises. Any problem raises :class:`ComfyFormatError` (a ``ValueError``) naming
the file and the tensor.

Public entry points: :func:`read_comfy` (lazy: parses and validates, returns a :class:`ComfyCheckpoint`),
:func:`load_comfy` (a state dict with lrq_ao tensors for quantized weights) and :func:`load_comfy_into`
(fills a model built on the meta device). Each also takes a sharded checkpoint's ``*.safetensors.index.json``:
every shard is validated as a ComfyUI file of its own (errors name the shard) and the shards are merged.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lrq_ao.convert.comfy_format import (
    INPUT_SCALE_SUFFIX,
    MARKER_SUFFIX,
    METADATA_KEY,
    SCALE2_SUFFIX,
    SCALE_SUFFIX,
    WEIGHT_SUFFIX,
    ComfyFormatError,
    decode_marker,
    logical_shape,
    metadata_header,
    parse_dtype_name,
    parse_metadata_header,
)
from lrq_ao.convert.header import CheckpointError, check_shard_contents, read_header, read_weight_map, unique_shards
from lrq_ao.formats import FORMATS, FormatError, QuantizedWeight, WeightFormat, reader_for

__all__ = ["ComfyCheckpoint", "ComfyFormatError", "ComfyLayer", "LoadResult", "load_comfy", "load_comfy_into"]

LEGACY_MARKER = "scaled_fp8"
LEGACY_FORMAT = "float8_e4m3fn"  # what ComfyUI's convert_old_quants turns a scaled_fp8 file's layers into
LEGACY_SCALE_SUFFIX = ".scale_weight"
LEGACY_INPUT_SCALE_SUFFIX = ".scale_input"
DEFAULT_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the safetensors header describes it."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class ComfyLayer:
    """A validated quantized linear: lrq_ao's view of ``<layer>.weight`` + its scales + ``.comfy_quant``.

    ``comfy_name`` is the marker's format; ``weight_format`` the lrq_ao format its reader read the layer as
    (``spec`` is the older name); ``shape`` the logical ``(out, in)``. ``scale`` (the float32 2-D grid
    ``(N // bn, K // bk)``), ``scale2``, ``extra`` and ``block_size`` are the
    :class:`~lrq_ao.formats.QuantizedWeight`'s; ``qdata`` is filled by :meth:`ComfyCheckpoint.load_layer`. ``source``
    is ``"marker"``, ``"header"`` or ``"legacy"``. ``stored`` keeps the layer's other stored tensors by suffix (all
    ``<layer>.weight_*``), to hand the reader with the weight.
    """

    name: str
    comfy_name: str
    weight_format: WeightFormat
    shape: tuple[int, int]
    scale: torch.Tensor
    block_size: tuple[int, int]
    marker: dict[str, Any]
    source: str
    orig_dtype: torch.dtype | None = None
    input_scale: torch.Tensor | None = None
    qdata: torch.Tensor | None = None
    scale2: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    stored: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> WeightFormat:
        return self.weight_format

    @property
    def full_precision_matrix_mult(self) -> bool:
        return bool(self.marker.get("full_precision_matrix_mult", False))

    @property
    def stock(self) -> bool:
        return self.weight_format.stock

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The layer as its format's ``QuantizedWeight`` (needs :meth:`ComfyCheckpoint.load_layer` first)."""
        if self.qdata is None:
            raise ComfyFormatError(f"{self.name}.weight: data not loaded; use ComfyCheckpoint.load_layer first")
        return QuantizedWeight(self.qdata, self.scale, self.block_size, self.scale2, self.extra)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in the model's basis, exactly as the format defines it (``fmt.dequantize_original``: decoded
        codes times the scale broadcast per block, float32; the oracle every loader must reproduce)."""
        return self.weight_format.dequantize_original(self.quantized_weight, dtype)


@dataclass
class ComfyCheckpoint:
    """A parsed, validated ComfyUI checkpoint; tensor data is read lazily from ``path``."""

    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    layers: dict[str, ComfyLayer] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)  # keys folded into layers (weights, scales, markers)
    files: dict[str, Path] = field(default_factory=dict)  # sharded: key -> shard holding it (else all in ``path``)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors by key from the file (or, sharded, the shards) holding them."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files.get(key, self.path), []).append(key)
        out: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            out.update(_read_tensors(file, file_keys))
        return {key: out[key] for key in keys}

    def formats(self) -> dict[str, str]:
        """``{layer: ComfyUI format name}`` for every quantized layer."""
        return {name: layer.comfy_name for name, layer in self.layers.items()}

    def plain_keys(self) -> list[str]:
        """Keys of tensors that are not part of a quantized layer (biases, norms, unquantized weights)."""
        return [k for k in self.entries if k not in self.consumed]

    def get_tensor(self, key: str) -> torch.Tensor:
        """Read one tensor from the file (``ComfyFormatError`` naming the file and key if that fails)."""
        return self.read([key])[key]

    def load_layer(self, name: str) -> ComfyLayer:
        """Read ``<name>.weight`` into ``layers[name].qdata`` and return the layer."""
        return self.load_layers([name])[0]

    def load_layers(self, names: list[str] | None = None) -> list[ComfyLayer]:
        """Read the weights of ``names`` (default: every quantized layer) in one pass over the file."""
        layers = [self.layers[n] for n in (self.layers if names is None else names)]
        todo = [layer.name + WEIGHT_SUFFIX for layer in layers if layer.qdata is None]
        for key, tensor in self.read(todo).items():
            layer = self.layers[key[: -len(WEIGHT_SUFFIX)]]
            path = self.files.get(key, self.path)
            _, qw = _run_reader(path, layer.name, layer.marker, layer.source, {WEIGHT_SUFFIX: tensor, **layer.stored})
            layer.qdata = qw.qdata
        return layers

    def describe(self) -> str:
        """A table of the quantized layers: name, format, shape, block size, stock-ComfyUI loadability."""
        rows = [f"{'layer':<48} {'format':<26} {'shape':<14} {'block':<12} stock"]
        for name, layer in self.layers.items():
            shape = "x".join(map(str, layer.shape))
            block = "x".join(map(str, layer.block_size))
            rows.append(f"{name:<48} {layer.comfy_name:<26} {shape:<14} {block:<12} {layer.stock}")
        rows.append(f"{len(self.layers)} quantized layers, {len(self.plain_keys())} other tensors: {self.path}")
        return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------
# The safetensors container, checked by hand so every failure gets a clear message
# ----------------------------------------------------------------------------------------------------------------


def _read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The file's header, validated by ``header.read_header`` (the one parser the converter uses too: every rule of
    the safetensors format, size caps, no sparse files); its ``CheckpointError`` becomes ``ComfyFormatError``."""
    try:
        header = read_header(path)
    except CheckpointError as exc:
        raise ComfyFormatError(str(exc)) from None
    entries = {name: TensorEntry(e.torch_dtype, e.shape) for name, e in header.entries.items()}
    return entries, header.metadata


def _read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out = {}
    key = None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in keys:
                out[key] = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ComfyFormatError(f"{path}: cannot read tensor {key!r} ({exc})") from None
    return out


# ----------------------------------------------------------------------------------------------------------------
# Finding and validating quantized layers
# ----------------------------------------------------------------------------------------------------------------


def read_comfy(path: str | os.PathLike, *, allow_shards_outside: bool = False) -> ComfyCheckpoint:
    """Parse and validate a ComfyUI checkpoint without reading the weight data.

    Returns a :class:`ComfyCheckpoint` whose ``layers`` hold each quantized layer's format, lrq_ao scale grid
    and block size. Raises :class:`ComfyFormatError` naming the file and tensor for: a file that is not
    safetensors, a truncated file, invalid header or marker JSON, an unknown format, a weight whose dtype does not
    match its format, a missing or misshapen scale, or header layer names ending in ``.weight``.
    """
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path, allow_shards_outside)
    entries, metadata = _read_header(path)
    ckpt = ComfyCheckpoint(path, entries, metadata)
    markers = _collect_markers(ckpt)
    legacy = _find_legacy_marker(entries)
    if legacy is not None and not markers:
        markers = _legacy_markers(ckpt, legacy)
    small = _read_tensors(path, sorted(_small_keys(entries, markers)))
    for name, (marker, source) in markers.items():
        ckpt.layers[name] = _validate_layer(ckpt, name, marker, source, small)
    _reject_orphan_scales(ckpt)
    return ckpt


def _read_sharded(index: Path, allow_outside: bool = False) -> ComfyCheckpoint:
    """Validate every shard named by ``index`` on its own (as ComfyUI-style loaders read each file) and merge them.

    Raises :class:`ComfyFormatError` naming the index for a bad index (``header.read_weight_map``: a non-empty
    ``weight_map`` of shard file names inside the index's folder unless ``allow_outside``), or the shard for a bad
    shard, a key the index maps to another file, or a layer split across shards.
    """
    try:
        weight_map = read_weight_map(index, allow_outside=allow_outside)
    except CheckpointError as exc:
        raise ComfyFormatError(str(exc)) from None
    merged = ComfyCheckpoint(index, {}, {})
    header_layers: dict[str, dict[str, Any]] = {}
    for file in unique_shards(weight_map):
        if not file.is_file():
            raise ComfyFormatError(f"{index}: names shard {file.name!r}, which does not exist")
        shard = read_comfy(file)  # a bad shard raises naming it
        try:
            check_shard_contents(index, weight_map, file, shard.entries)
        except CheckpointError as exc:
            raise ComfyFormatError(str(exc)) from None
        merged.entries.update(shard.entries)
        merged.files.update(dict.fromkeys(shard.entries, shard.path))
        merged.layers.update(shard.layers)
        merged.consumed |= shard.consumed
        if METADATA_KEY in shard.metadata:
            header_layers.update(parse_metadata_header(shard.metadata[METADATA_KEY], f"{shard.path}: {METADATA_KEY}"))
        merged.metadata.update({k: v for k, v in shard.metadata.items() if k != METADATA_KEY})
    if header_layers:
        merged.metadata[METADATA_KEY] = metadata_header(header_layers)
    return merged


def _collect_markers(ckpt: ComfyCheckpoint) -> dict[str, tuple[dict[str, Any], str]]:
    path = ckpt.path
    marker_keys = [k for k in ckpt.entries if k.endswith(MARKER_SUFFIX)]
    tensors = _read_tensors(path, marker_keys)
    markers = {
        k[: -len(MARKER_SUFFIX)]: (decode_marker(t, f"{path}: tensor {k!r}"), "marker") for k, t in tensors.items()
    }
    ckpt.consumed.update(marker_keys)
    if METADATA_KEY not in ckpt.metadata:
        return markers
    header = parse_metadata_header(ckpt.metadata[METADATA_KEY], f"{path}: header {METADATA_KEY}")
    for name, marker in header.items():
        if name in markers and markers[name][0]["format"] != marker["format"]:
            raise ComfyFormatError(
                f"{path}: layer {name!r}: header {METADATA_KEY} says format {marker['format']!r} but tensor "
                f"'{name}{MARKER_SUFFIX}' says {markers[name][0]['format']!r} (ComfyUI would use the header)"
            )
        # ComfyUI regenerates markers from the header, so the header entry wins where both exist.
        markers[name] = (marker, "header" if name not in markers else "marker")
    return markers


def _find_legacy_marker(entries: dict[str, TensorEntry]) -> str | None:
    found = [k for k in entries if k == LEGACY_MARKER or k.endswith("." + LEGACY_MARKER)]
    return found[0] if found else None


def _legacy_markers(ckpt: ComfyCheckpoint, key: str) -> dict[str, tuple[dict[str, Any], str]]:
    """Turn a legacy ``scaled_fp8`` file's layers into markers, as ComfyUI's ``convert_old_quants`` does."""
    entry = ckpt.entries[key]
    if entry.dtype == torch.float8_e5m2:
        raise ComfyFormatError(f"{ckpt.path}: tensor {key!r}: legacy float8_e5m2 files are not supported by lrq_ao")
    if entry.dtype not in (*stored_dtypes(LEGACY_FORMAT), torch.float32):
        raise ComfyFormatError(f"{ckpt.path}: tensor {key!r}: legacy marker must be {LEGACY_FORMAT}, got {entry.dtype}")
    marker: dict[str, Any] = {"format": LEGACY_FORMAT}
    if math.prod(entry.shape) == 2:  # ComfyUI: a 2-element marker asks for full-precision matmul
        marker["full_precision_matrix_mult"] = True
    prefix = key[: -len(LEGACY_MARKER)]
    ckpt.consumed.add(key)
    return {
        k[: -len(LEGACY_SCALE_SUFFIX)]: (dict(marker), "legacy")
        for k in ckpt.entries
        if k.startswith(prefix) and k.endswith(LEGACY_SCALE_SUFFIX)
    }


def _scale_keys(name: str, source: str) -> tuple[str, str]:
    if source == "legacy":
        return name + LEGACY_SCALE_SUFFIX, name + LEGACY_INPUT_SCALE_SUFFIX
    return name + SCALE_SUFFIX, name + INPUT_SCALE_SUFFIX


def _layer_keys(entries: dict[str, TensorEntry], name: str, source: str) -> dict[str, str]:
    """A layer's stored tensors besides its weight data, suffix -> key: every ``<name>.weight_*`` tensor (the
    scales, and whatever else its format stores, e.g. ``.weight_s_channel``), a legacy ``.scale_weight`` as
    ``.weight_scale``."""
    prefix = name + WEIGHT_SUFFIX + "_"
    keys = {k[len(name) :]: k for k in entries if k.startswith(prefix) and "." not in k[len(prefix) :]}
    if source == "legacy" and name + LEGACY_SCALE_SUFFIX in entries:
        keys[SCALE_SUFFIX] = name + LEGACY_SCALE_SUFFIX
    return keys


def _small_keys(entries: dict[str, TensorEntry], markers: dict) -> set[str]:
    keys = set()
    for name, (_, source) in markers.items():
        keys.update(_layer_keys(entries, name, source).values())
        keys.update(k for k in _scale_keys(name, source)[1:] if k in entries)
    return keys


def stored_dtypes(comfy_name: str) -> tuple[torch.dtype, ...]:
    """The weight dtypes the lrq_ao formats called ``comfy_name`` in ComfyUI store (empty when only a reader is
    registered for that name)."""
    found = {f.element.storage_dtype: None for f in FORMATS.values() if f.comfy_name == comfy_name}
    return tuple(found)


def _run_reader(
    path: Path, name: str, marker: dict[str, Any], source: str, tensors: dict[str, torch.Tensor]
) -> tuple[WeightFormat, QuantizedWeight]:
    """The format's reader on one layer's tensors by suffix. Its errors name tensors as ``<layer><suffix>``; they
    are raised again naming the file and the tensor as stored (``'<layer>.scale_weight'`` in a legacy file)."""
    try:
        return reader_for(marker["format"], name)(marker, tensors, name)
    except FormatError as exc:
        raise ComfyFormatError(f"{path}: {_name_tensor(str(exc), name, source)}") from None


def _name_tensor(message: str, name: str, source: str) -> str:
    """``"<layer><suffix>: why"`` -> ``"tensor '<stored key>': why"`` (other messages are returned as they are)."""
    match = re.match(rf"{re.escape(name)}(\.\w+)?: ", message)
    if match is None:
        return message
    suffix = match.group(1) or ""
    key = _scale_keys(name, source)[0] if suffix == SCALE_SUFFIX else name + suffix
    what = f"tensor {key!r}" if suffix else f"layer {name!r}"
    return f"{what}: {message[match.end() :]}"


def _validate_layer(
    ckpt: ComfyCheckpoint, name: str, marker: dict[str, Any], source: str, small: dict[str, torch.Tensor]
) -> ComfyLayer:
    """Check one layer with what every format shares (weight present, 2-D, non-empty, of a dtype the format's
    name stores, a scale present), then with the format's own reader (on zero codes standing in for the weight:
    no weight data is read here; ``load_layers`` runs the reader again on the data), then the scales it returns
    (finite, non-negative) and the marker's ``orig_shape`` against the logical shape."""
    where = f"{ckpt.path}: layer {name!r}"
    comfy_name = marker["format"]
    reader_for(comfy_name, where)  # an unknown or unsupported format is named before anything else
    weight_key = name + WEIGHT_SUFFIX
    weight = ckpt.entries.get(weight_key)
    if weight is None:
        raise ComfyFormatError(f"{where}: marked as {comfy_name} but tensor {weight_key!r} is missing")
    expected = stored_dtypes(comfy_name)
    if expected and weight.dtype not in expected:
        raise ComfyFormatError(
            f"{ckpt.path}: tensor {weight_key!r}: dtype {weight.dtype} is wrong for format {comfy_name}, which "
            f"stores {' or '.join(map(str, expected))}"
        )
    if len(weight.shape) != 2:
        raise ComfyFormatError(f"{ckpt.path}: tensor {weight_key!r}: expected a 2-D weight, got shape {weight.shape}")
    if 0 in weight.shape:
        raise ComfyFormatError(f"{ckpt.path}: tensor {weight_key!r}: empty weight of shape {list(weight.shape)}")
    scale_key, input_key = _scale_keys(name, source)
    layer_keys = _layer_keys(ckpt.entries, name, source)
    stored = {suffix: small[key] for suffix, key in layer_keys.items()}
    zeros = torch.zeros((), dtype=weight.dtype).expand(weight.shape)  # stands in for the unread data (a view)
    fmt, qw = _run_reader(ckpt.path, name, marker, source, {WEIGHT_SUFFIX: zeros, **stored})
    shape = logical_shape(fmt, qw)
    if "orig_shape" in marker and tuple(marker["orig_shape"]) != shape:
        raise ComfyFormatError(f"{where}: marker orig_shape {marker['orig_shape']} != stored weight shape {shape}")
    if SCALE_SUFFIX in stored:
        _warn_unusual_scale_shape(ckpt.path, scale_key, stored[SCALE_SUFFIX], fmt, qw, shape)
    for suffix, grid in ((SCALE_SUFFIX, qw.scale), (SCALE2_SUFFIX, qw.scale2)):
        if grid is not None and (not bool(torch.isfinite(grid).all()) or bool((grid < 0).any())):
            what = f"tensor {layer_keys[suffix]!r}" if suffix in layer_keys else f"layer {name!r}"
            raise ComfyFormatError(f"{ckpt.path}: {what}: scales must be finite and non-negative")
    input_scale = _validated_input_scale(ckpt, input_key, small)
    if source == "legacy" and input_scale is not None and input_scale.numel() == 1 and float(input_scale) == 1.0:
        input_scale = None  # ComfyUI drops a legacy unit input scale
    orig_dtype = parse_dtype_name(marker["orig_dtype"], where) if "orig_dtype" in marker else None
    ckpt.consumed.update(k for k in (weight_key, *layer_keys.values(), input_key) if k in ckpt.entries)
    return ComfyLayer(
        name,
        comfy_name,
        fmt,
        shape,
        qw.scale,
        qw.block_size,
        marker,
        source,
        orig_dtype,
        input_scale,
        scale2=qw.scale2,
        extra=dict(qw.extra),
        stored=stored,
    )


def _warn_unusual_scale_shape(
    path: Path, key: str, stored: torch.Tensor, fmt: WeightFormat, qw: QuantizedWeight, shape: tuple[int, int]
) -> None:
    """Warn when a scale of several values is stored in another shape than the format writes (e.g. a 1-D ``[out]``
    per-row INT8 scale): lrq_ao reads it, but ComfyUI's dequantize broadcasts the stored shape as it is (an error or
    wrong weights)."""
    written = fmt.comfy_tensor_specs(shape)[SCALE_SUFFIX][1]
    if stored.numel() > 1 and tuple(stored.shape) != tuple(written):
        groups = _group_words(qw.block_size, shape)
        warnings.warn(
            f"{path}: tensor {key!r}: {stored.dim()}-D {groups} {fmt.element.name} scale {list(stored.shape)}; read "
            f"as {groups}, but ComfyUI's dequantize broadcasts it as stored (error or wrong weights); rewrite it as "
            f"{list(written)}",
            stacklevel=4,
        )


def _group_words(block_size: tuple[int, int], shape: tuple[int, int]) -> str:
    if tuple(block_size) == tuple(shape):
        return "per-tensor"
    if tuple(block_size) == (1, shape[1]):
        return "per-row"
    return f"{block_size[0]}x{block_size[1]}-block"


def _validated_input_scale(ckpt: ComfyCheckpoint, key: str, small: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if key not in small:
        return None
    value = small[key]
    if not value.dtype.is_floating_point or value.dtype.itemsize == 1:
        raise ComfyFormatError(f"{ckpt.path}: tensor {key!r}: input scale must be a float tensor, got {value.dtype}")
    if not bool(torch.isfinite(value).all()) or bool((value <= 0).any()):
        raise ComfyFormatError(f"{ckpt.path}: tensor {key!r}: input scale must be finite and positive")
    return value.float()


def _reject_orphan_scales(ckpt: ComfyCheckpoint) -> None:
    for key in ckpt.entries:
        suffix = next((s for s in (SCALE_SUFFIX, SCALE2_SUFFIX) if key.endswith(s)), None)
        if suffix is not None and key not in ckpt.consumed:
            layer = key[: -len(suffix)]
            raise ComfyFormatError(
                f"{ckpt.path}: tensor {key!r} has no quantization marker: add '{layer}{MARKER_SUFFIX}' or a "
                f"{METADATA_KEY} header entry for {layer!r}"
            )


# ----------------------------------------------------------------------------------------------------------------
# Loading into lrq_ao tensors and models
# ----------------------------------------------------------------------------------------------------------------


def _weight_tensor(layer: ComfyLayer, dtype: torch.dtype | None, act, kernel) -> torch.Tensor:
    from lrq_ao.layouts import weight_tensor

    hp_dtype = dtype or layer.orig_dtype or DEFAULT_DTYPE
    name = layer.name + WEIGHT_SUFFIX
    return weight_tensor(layer.weight_format, layer.quantized_weight, hp_dtype, act=act, kernel=kernel, name=name)


def load_comfy(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, act=None, kernel=None
) -> dict[str, torch.Tensor]:
    """Load a ComfyUI checkpoint as a state dict.

    Quantized layers come back as ``<layer>.weight`` -> ``lrq_ao.layouts.Float8Tensor`` / ``Int8Tensor`` reporting
    ``dtype`` (default: the marker's ``orig_dtype``, else bfloat16); their ``weight_scale``, ``input_scale`` and
    ``comfy_quant`` entries are folded in and not returned. Every other tensor is returned as stored (floating-point
    ones cast to ``dtype`` when it is given). Use :func:`read_comfy` for per-layer formats. Raises
    :class:`ComfyFormatError` for malformed files.
    """
    ckpt = read_comfy(path)
    state = {k: _cast_floating(t, dtype) for k, t in ckpt.read(ckpt.plain_keys()).items()}
    for layer in ckpt.load_layers():
        state[layer.name + WEIGHT_SUFFIX] = _weight_tensor(layer, dtype, act, kernel)
        layer.qdata = None  # the lrq_ao tensor holds it now
    return state


@dataclass
class LoadResult:
    """What :func:`load_comfy_into` did: quantized layers set, state-dict keys the model and file disagree on, and
    file keys outside ``prefix`` that were not considered (e.g. the VAE in a combined checkpoint)."""

    quantized: list[str]
    missing_keys: list[str]
    unexpected_keys: list[str]
    ignored_keys: list[str] = field(default_factory=list)


def load_comfy_into(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    prefix: str = "",
    strict: bool = True,
    dtype: torch.dtype | None = None,
    act=None,
    kernel=None,
) -> LoadResult:
    """Fill ``model`` (typically built on the meta device) from a ComfyUI checkpoint, assigning tensors in place.

    Quantized layers become non-trainable ``nn.Parameter``s wrapping lrq_ao tensors, so the model runs with
    lrq_ao's kernels; every other tensor is assigned as stored (``load_state_dict(assign=True)`` semantics), or
    cast to ``dtype`` if it is floating point and ``dtype`` is given (quantized layers then report ``dtype`` too).
    ``prefix`` is stripped from the file's keys (e.g. ``"model.diffusion_model."``); keys outside it are not
    loaded and are listed in ``LoadResult.ignored_keys``. A shape mismatch raises :class:`ComfyFormatError`; so does,
    with ``strict`` (default), any key the model expects but the file lacks or any file key the model lacks
    (otherwise they are returned in the :class:`LoadResult`). Nothing in ``model`` changes if an error is raised.
    """
    ckpt = read_comfy(path)
    where = str(ckpt.path)
    expected = model.state_dict(keep_vars=True)
    quantized, plain, unexpected = _match_keys(ckpt, expected, prefix, where)
    missing = sorted(set(expected) - set(plain) - set(quantized))
    ignored = sorted(k for k in ckpt.entries if not k.startswith(prefix) and k not in ckpt.consumed)
    ignored += sorted(name + WEIGHT_SUFFIX for name in ckpt.layers if not name.startswith(prefix))
    result = LoadResult(sorted(quantized), missing, unexpected, ignored)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ComfyFormatError(
            f"{where}: checkpoint does not match the model: {len(missing)} missing key(s) "
            f"{_first(result.missing_keys)}, {len(unexpected)} unexpected key(s) {_first(result.unexpected_keys)}; "
            f"check `prefix` (got {prefix!r}) or pass strict=False"
        )
    for key, layer in zip(quantized, ckpt.load_layers(list(quantized.values()))):
        module_path, _, attr = key.rpartition(".")
        weight = _weight_tensor(layer, dtype, act, kernel)
        setattr(model.get_submodule(module_path), attr, torch.nn.Parameter(weight, requires_grad=False))
        layer.qdata = None  # the lrq_ao tensor holds it now; do not keep a second reference
    tensors = ckpt.read(list(plain.values()))
    state = {local: _cast_floating(tensors[key], dtype) for local, key in plain.items()}
    model.load_state_dict(state, strict=False, assign=True)
    return result


def _match_keys(
    ckpt: ComfyCheckpoint, expected: dict[str, torch.Tensor], prefix: str, where: str
) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Model key -> file layer for quantized weights, model key -> file key for the rest, and unexpected keys."""
    quantized, plain, unexpected = {}, {}, []
    for name, layer in ckpt.layers.items():
        if name.startswith(prefix):
            key = name[len(prefix) :] + WEIGHT_SUFFIX
            if key in expected:
                _check_shape(where, key, tuple(expected[key].shape), layer.shape)
                quantized[key] = name
            else:
                unexpected.append(key)
    for key in ckpt.plain_keys():
        if key.startswith(prefix):
            local = key[len(prefix) :]
            if local in expected:
                _check_shape(where, local, tuple(expected[local].shape), ckpt.entries[key].shape)
                plain[local] = key
            else:
                unexpected.append(local)
    return quantized, plain, sorted(unexpected)


def _cast_floating(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _check_shape(where: str, key: str, model_shape: tuple, file_shape: tuple) -> None:
    if tuple(model_shape) != tuple(file_shape):
        raise ComfyFormatError(
            f"{where}: tensor {key!r} has shape {list(file_shape)} but the model expects {list(model_shape)}"
        )


def _first(keys: list[str], n: int = 8) -> str:
    return str(keys[:n])[:-1] + (", ...]" if len(keys) > n else "]")
