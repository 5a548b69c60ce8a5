"""The conversion plan: for every input tensor, whether it is quantized (to which ComfyUI format), kept as it is, or
removed, and why; plus the exact output layout (every output tensor's dtype, shape and offset).

Building a plan reads only headers (and, with ``skip_bad_layers``, scans candidate weights for NaN/Inf). The plan is
deterministic for a given input and options, so its hash identifies a conversion for ``--resume`` and, later, lets
several workers agree on who converts which layer.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lrq_ao.config import BLOCK_SIZES, LearnedRoundingConfig, format_with_block
from lrq_ao.convert import comfy_format as cf
from lrq_ao.convert.presets import COMMON_KEEP, Preset, detect_preset, first_match, resolve_preset
from lrq_ao.convert.stream import (
    DTYPE_NAMES,
    OutputEntry,
    OutputFile,
    Source,
    TensorInfo,
    encode_header,
    layout_entries,
    read_tensor,
)
from lrq_ao.formats import FORMATS, WeightFormat

PLAN_VERSION = 1
MIN_QUANT_DIM = 16  # layers thinner than this gain nothing from 8-bit and some kernels refuse them

# Spellings kept from earlier lrq-convert versions that name one of several formats sharing a ComfyUI name.
EXTRA_ALIASES = {"int8_tensorwise_row": "int8", "int8_tensorwise_tensor": "int8_tensor"}


def format_aliases() -> dict[str, str]:
    """Every ``--format`` name -> lrq_ao format name: each format's ComfyUI name (where several formats share one,
    e.g. ``int8_tensorwise``, the first registered: the one earlier versions meant), ``EXTRA_ALIASES``, and every
    lrq_ao name in ``lrq_ao.formats.FORMATS``."""
    aliases: dict[str, str] = {}
    for name, fmt in FORMATS.items():
        aliases.setdefault(fmt.comfy_name, name)
    aliases.update(EXTRA_ALIASES)
    aliases.update({name: name for name in FORMATS})
    return aliases


FORMAT_ALIASES = format_aliases()  # as registered at import; the functions below ask the registry each time
# --max-shard-size units: decimal like Hugging Face's "5GB", binary with an "i".
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: int | str) -> int:
    """A ``--max-shard-size`` value in bytes: an int, or ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000"`` (units are
    case-insensitive; KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024). ``ValueError`` otherwise."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if unit not in SIZE_UNITS:
            raise ValueError(f"--max-shard-size {size!r}: give bytes or a size like 5GB, 500MB, 2GiB")
        value = int(float(m.group(1)) * SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"--max-shard-size {size!r} must be a positive number of bytes")
    return value


def shard_paths(target: str | Path, count: int) -> tuple[Path, list[Path]]:
    """The index and shard paths for output ``target`` (``x/model.safetensors`` or ``x/model.safetensors.index.json``):
    ``x/model.safetensors.index.json`` and ``x/model-00001-of-0000N.safetensors``."""
    target = Path(target)
    stem = target.name.removesuffix(".index.json").removesuffix(".safetensors")
    index = target.with_name(f"{stem}.safetensors.index.json")
    return index, [target.with_name(f"{stem}-{i:05d}-of-{count:05d}.safetensors") for i in range(1, count + 1)]


def parse_format(name: str, block: int) -> WeightFormat:
    """A ``--format`` value (ComfyUI name or lrq_ao name) as a format object, with ``block`` applied where the
    format has blocks; ``ValueError`` if unknown."""
    aliases = format_aliases()
    if name not in aliases:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(aliases)}")
    return format_with_block(FORMATS[aliases[name]], block)


@dataclass(frozen=True)
class LayerRule:
    """One ``--layer-config`` entry: a regex searched in the layer name, and either ``skip`` or a format."""

    pattern: str
    skip: bool = False
    format: str | None = None
    block_size: int | None = None


def load_layer_config(path: str | Path) -> tuple[LayerRule, ...]:
    """Read a ``--layer-config`` JSON file: ``{"regex": {"format": "...", "block_size": 64} | {"skip": true}}``.

    The most specific (longest) matching pattern wins; ``_default`` applies when none matches. Raises
    ``ValueError`` naming the file and entry for bad JSON, bad regexes or unknown formats.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--layer-config {path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"--layer-config {path}: must be a JSON object mapping regex -> settings")
    rules = []
    for pattern, settings in data.items():
        where = f"--layer-config {path}: entry {pattern!r}"
        if not isinstance(settings, dict):
            raise ValueError(f'{where} must be an object like {{"format": "int8_tensorwise"}} or {{"skip": true}}')
        if pattern != "_default":
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{where} is not a valid regex: {e}") from e
        fmt = settings.get("format")
        skip = bool(settings.get("skip", False))
        if not skip and fmt not in format_aliases():
            raise ValueError(f'{where} needs "skip": true or a format among {", ".join(format_aliases())}')
        block = settings.get("block_size")
        if block is not None and block not in BLOCK_SIZES:
            raise ValueError(f"{where}: block_size must be 32, 64, 128 or 256, got {block!r}")
        rules.append(LayerRule(pattern, skip, fmt, block))
    return tuple(rules)


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that decides the output bytes (the device and progress display do not)."""

    format: str = "float8_e4m3fn"
    block_size: int = 128
    preset: str | None = None  # None: auto-detect from key names
    exclude_layers: str | None = None
    custom_layers: str | None = None
    custom_format: str | None = None
    layer_rules: tuple[LayerRule, ...] = ()
    skip_bad_layers: bool = False
    metadata_header: bool = True
    full_precision_matrix_mult: bool = False
    rounding: LearnedRoundingConfig = field(default_factory=LearnedRoundingConfig)  # the API's and CLI's defaults

    def __post_init__(self) -> None:
        parse_format(self.format, self.block_size)
        if self.custom_format is not None:
            parse_format(self.custom_format, self.block_size)
        if self.custom_layers is not None and self.custom_format is None:
            raise ValueError("--custom-layers needs --custom-format (the format those layers get)")
        for flag, pattern in (("--exclude-layers", self.exclude_layers), ("--custom-layers", self.custom_layers)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{flag} {pattern!r} is not a valid regular expression: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, rounding=None))
        d["rounding"] = self.rounding.to_dict()
        return d


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one input tensor.

    action: ``quantize``, ``keep`` or ``remove``. reason: why (for a quantized layer: which rule chose the format).
    layer: the module path of a quantized weight. weight_format: the format written (after any fallback; ``spec``
    is the older name); format: its ComfyUI name; fallback: the requested format and that it could not store the
    weight, or None; fallback_why: the requested format's own explanation; suffixes: the format's stored tensors.
    """

    name: str
    action: str
    reason: str
    layer: str | None = None
    weight_format: WeightFormat | None = None
    format: str | None = None
    fallback: str | None = None
    fallback_why: str | None = None
    suffixes: tuple[str, ...] = ()

    @property
    def spec(self) -> WeightFormat | None:
        return self.weight_format

    @property
    def full_fallback(self) -> str | None:
        """``fallback`` and, where separate, the format's ``fallback_why`` (for the plan table and the report)."""
        return self.fallback if self.fallback_why is None else f"{self.fallback}: {self.fallback_why}"

    @property
    def outputs(self) -> tuple[str, ...]:
        if self.action == "remove":
            return ()
        if self.action == "keep":
            return (self.name,)
        return tuple(self.layer + s for s in (*self.suffixes, cf.MARKER_SUFFIX))


@dataclass(frozen=True)
class Shard:
    """One output shard: its tensors (offsets relative to this shard's data section) and its header metadata."""

    entries: list[OutputEntry]
    metadata: dict[str, str]

    @property
    def data_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass
class ConversionPlan:
    """Every decision of one conversion. ``entries``/``metadata`` describe the single output file; with
    ``max_shard_size`` the same tensors, in the same order, are split over ``shards`` plus an index instead."""

    source: Source
    options: ConvertOptions
    preset: Preset
    preset_reason: str
    tensors: list[TensorPlan]
    entries: list[OutputEntry]
    metadata: dict[str, str]
    markers: dict[str, dict[str, Any]]
    max_shard_size: int | None = None
    shards: list[Shard] = field(default_factory=list)

    @property
    def quantized(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.action == "quantize"]

    @property
    def input_bytes(self) -> int:
        return sum(i.nbytes for i in self.source.tensors.values())

    @property
    def output_bytes(self) -> int:
        files = self.shards or [Shard(self.entries, self.metadata)]
        return sum(len(encode_header(f.entries, f.metadata)) + f.data_bytes for f in files)

    def output_files(self, target: str | Path) -> tuple[Path, list[OutputFile], bytes | None]:
        """Where the output goes for ``-o target``: ``(final path, files, index JSON or None)``. Unsharded, the final
        path is ``target`` itself; sharded, it is the index (written last) and ``files`` are the shards."""
        target = Path(target)
        if not self.shards:
            return target, [OutputFile(target, self.entries, self.metadata)], None
        index, paths = shard_paths(target, len(self.shards))
        files = [OutputFile(path, s.entries, s.metadata) for path, s in zip(paths, self.shards)]
        return index, files, self.index_json(paths)

    def index_json(self, paths: list[Path]) -> bytes:
        """The Hugging Face style index: ``total_size`` (tensor bytes), the whole-model ``_quantization_metadata``
        and ``lrq_ao`` entries, and ``weight_map`` (tensor -> shard file name, in plan order)."""
        meta: dict[str, Any] = {"total_size": sum(s.data_bytes for s in self.shards)}
        meta.update({k: self.metadata[k] for k in (cf.METADATA_KEY, "lrq_ao") if k in self.metadata})
        weight_map = {e.name: path.name for path, s in zip(paths, self.shards) for e in s.entries}
        return (json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n").encode()

    def layer_config(self, tp: TensorPlan) -> LearnedRoundingConfig:
        """The rounding config for one quantized layer: the run's config with this layer's format (and its block:
        the ``*_block`` edge, or the ConvRot rotation group)."""
        fmt = tp.weight_format
        block = fmt.block if fmt.has_blocks else LearnedRoundingConfig.block_size
        return replace(self.options.rounding, format=fmt.name, block_size=block)

    def plan_hash(self) -> str:
        """Identifies the conversion: input files and header, every decision, the output layout and the config."""
        h = hashlib.sha256()
        h.update(f"plan v{PLAN_VERSION}|{self.source.fingerprint}|".encode())
        h.update(json.dumps(self.options.to_dict(), sort_keys=True, default=str).encode())
        for t in self.tensors:
            h.update(f"|{t.name}:{t.action}:{t.format}:{t.spec}".encode())
        for e in self.entries:
            h.update(f"|{e.name}:{e.dtype}:{e.shape}:{e.offset}".encode())
        h.update(json.dumps(self.metadata, sort_keys=True).encode())
        if self.shards:  # an unsharded plan hashes as before, so its older partial files stay resumable
            h.update(f"|shards {self.max_shard_size} x{len(self.shards)}".encode())
            for shard in self.shards:
                h.update(json.dumps([[e.name, e.offset] for e in shard.entries]).encode())
                h.update(json.dumps(shard.metadata, sort_keys=True).encode())
        return h.hexdigest()


def _best_rule(layer: str, rules: tuple[LayerRule, ...]) -> LayerRule | None:
    matches = [r for r in rules if r.pattern != "_default" and re.search(r.pattern, layer)]
    if matches:
        return max(matches, key=lambda r: len(r.pattern))
    return next((r for r in rules if r.pattern == "_default"), None)


def _shape_reason(info: TensorInfo) -> str | None:
    if not info.name.endswith(cf.WEIGHT_SUFFIX):
        return "not a .weight tensor (bias, buffer or parameter)"
    if not info.is_float:
        return f"dtype {info.dtype} is not a high-precision float"
    if len(info.shape) != 2:
        kind = "1-D" if len(info.shape) == 1 else f"{len(info.shape)}-D (conv or other non-linear)"
        return f"{kind} tensor; only 2-D linear weights are quantized"
    if min(info.shape) < MIN_QUANT_DIM:
        return f"shape {list(info.shape)} is thinner than {MIN_QUANT_DIM}; too small to gain from 8-bit"
    return None


def decide(info: TensorInfo, options: ConvertOptions, preset: Preset, nonfinite: set[str]) -> TensorPlan:
    """The plan for one tensor. Rules, first match wins: the preset's ``remove`` list; shape/dtype rules (only 2-D
    float ``.weight`` tensors at least 16 wide are candidates); NaN/Inf found by ``--skip-bad-layers``;
    ``--custom-layers`` (its format, overriding everything below); ``--layer-config`` (skip, or a format);
    ``--exclude-layers``; the common and preset keep lists; otherwise the default format. A format that cannot
    store the weight falls back to ``fmt.fallback()`` where it has one (see ``_with_fallback``)."""
    name = info.name
    hit = first_match(name, preset.remove)
    if hit:
        return TensorPlan(name, "remove", f"preset {preset.name} removes {hit!r}")
    reason = _shape_reason(info)
    if reason:
        return TensorPlan(name, "keep", reason)
    layer = name[: -len(cf.WEIGHT_SUFFIX)]
    if name in nonfinite:
        return TensorPlan(name, "keep", "has NaN/Inf values (--skip-bad-layers)")
    fmt, block, why = options.format, options.block_size, "default format"
    if options.custom_layers and re.search(options.custom_layers, layer):
        fmt, why = options.custom_format, f"matches --custom-layers {options.custom_layers!r}"
    else:
        rule = _best_rule(layer, options.layer_rules)
        if rule is not None and rule.skip:
            return TensorPlan(name, "keep", f"--layer-config {rule.pattern!r} says skip")
        if rule is not None:
            fmt, block = rule.format, rule.block_size or block
            why = f"--layer-config {rule.pattern!r}"
        elif options.exclude_layers and re.search(options.exclude_layers, layer):
            return TensorPlan(name, "keep", f"matches --exclude-layers {options.exclude_layers!r}")
        else:
            hit = first_match(name, COMMON_KEEP) or first_match(name, preset.keep)
            if hit:
                return TensorPlan(name, "keep", f"preset {preset.name} keeps {hit!r} high-precision")
    return _with_fallback(TensorPlan(name, "quantize", why, layer=layer), parse_format(fmt, block), info.shape)


def _with_fallback(tp: TensorPlan, fmt: WeightFormat, shape: tuple[int, ...]) -> TensorPlan:
    """``tp`` quantized to ``fmt``, or, where ``fmt.refusal(shape)`` says it cannot store the weight, to the
    format's fallback (``fallback`` says what was written instead, ``fallback_why`` is the format's own reason).
    A weight that neither can store stays high-precision, with both formats' reasons."""
    why = fmt.refusal(shape)
    if why is None:
        return _quantized(tp, fmt, shape)
    final = fallback_format(fmt, shape)
    final_why = "it has no fallback format" if final is None else final.refusal(shape)
    if final_why is not None:
        reason = f"format {fmt.describe()} cannot store it: {why}; {final_why}"
        return replace(tp, action="keep", layer=None, reason=reason)
    note = fallback_note(fmt, final, shape)
    # A format's own fallback_reason already says why; otherwise its refusal is the why.
    why = None if getattr(fmt, "fallback_reason", None) is not None else why
    return replace(_quantized(tp, final, shape), fallback=note, fallback_why=why)


def fallback_format(fmt: WeightFormat, shape: tuple[int, ...]) -> WeightFormat | None:
    """What ``fmt.fallback`` gives for a weight of ``shape`` (formats whose choice depends on the shape take it,
    e.g. ConvRot's smaller rotation group), or ``None`` for a format without one."""
    fallback = getattr(fmt, "fallback", None)
    if fallback is None:
        return None
    return fallback(shape) if inspect.signature(fallback).parameters else fallback()


def fallback_note(fmt: WeightFormat, final: WeightFormat, shape: tuple[int, ...]) -> str:
    """One line for the plan, the report and the file's ``lrq_ao`` metadata: the format's own
    ``fallback_reason(shape)`` where it has one, else "requested <name> cannot tile shape [N, K]; wrote <name>
    (<group shape>) instead" (names are ComfyUI names where they name one format, as earlier versions wrote)."""
    reason = getattr(fmt, "fallback_reason", None)
    if reason is not None:
        return reason(shape)
    return (
        f"requested {_note_name(fmt)}{_block_words(fmt)} cannot tile shape {list(shape)}; "
        f"wrote {_note_name(final)} ({_group_words(final.block_size_for(shape), shape)}) instead"
    )


def _note_name(fmt: WeightFormat) -> str:
    return fmt.comfy_name if format_aliases().get(fmt.comfy_name) == fmt.name else fmt.name


def _quantized(tp: TensorPlan, fmt: WeightFormat, shape: tuple[int, ...]) -> TensorPlan:
    suffixes = tuple(fmt.comfy_tensor_specs(shape))
    return replace(tp, weight_format=fmt, format=fmt.comfy_name, suffixes=suffixes)


def _block_words(fmt: WeightFormat) -> str:
    return f" block {fmt.block}" if fmt.has_blocks else ""


def _group_words(block_size: tuple[int, int], shape: tuple[int, ...]) -> str:
    """How a group shape reads in a note: tensor-wise, row-wise, groups of g, or bn x bk blocks."""
    (bn, bk), (n, k) = block_size, shape
    if (bn, bk) == (n, k):
        return "tensor-wise"
    if (bn, bk) == (1, k):
        return "row-wise"
    return f"groups of {bk}" if bn == 1 else f"{bn}x{bk} blocks"


def _marker(tp: TensorPlan, info: TensorInfo, options: ConvertOptions) -> dict[str, Any]:
    return cf.layer_marker(tp.weight_format, info.shape, full_precision_matrix_mult=options.full_precision_matrix_mult)


def _outputs_for(tp: TensorPlan, info: TensorInfo, marker: dict[str, Any] | None) -> list[OutputEntry]:
    """The output entries of one input tensor: itself when kept; a quantized layer's stored tensors as its format
    specifies them (``comfy_tensor_specs``), then its marker."""
    if tp.action == "remove":
        return []
    if tp.action == "keep":
        return [OutputEntry(info.name, info.dtype, info.shape)]
    specs = tp.weight_format.comfy_tensor_specs(info.shape)
    marker_len = len(cf.marker_json(marker).encode("utf-8"))
    entries = [OutputEntry(tp.layer + suffix, DTYPE_NAMES[dtype], shape) for suffix, (dtype, shape) in specs.items()]
    return [*entries, OutputEntry(tp.layer + cf.MARKER_SUFFIX, "U8", (marker_len,))]


def check_not_quantized(source: Source) -> None:
    """Refuse an input that is already a quantized ComfyUI checkpoint (re-quantizing would compound error)."""
    marked = [n for n in source.tensors if n.endswith(cf.MARKER_SUFFIX)]
    if marked or cf.METADATA_KEY in source.metadata or "scaled_fp8" in source.tensors:
        example = marked[0] if marked else cf.METADATA_KEY
        raise ValueError(
            f"input {source.files[0]} is already a quantized ComfyUI checkpoint (has {example!r}); convert the "
            f"original high-precision checkpoint instead"
        )


# Suffixes a ComfyUI loader reads as a quantized layer's data (``<layer><suffix>``) besides ``.weight_<anything>``.
LAYER_DATA_SUFFIXES = (cf.INPUT_SCALE_SUFFIX, cf.MARKER_SUFFIX, ".scale_weight", ".scale_input")
ORPHAN_SCALE_SUFFIXES = (cf.SCALE_SUFFIX, cf.SCALE2_SUFFIX)  # the reader refuses these without a marker


def check_output_names(tensors: list[TensorPlan], groups: list[list[OutputEntry]]) -> None:
    """Refuse, before anything is written, an output that would name two tensors alike or that a loader would
    misread: a kept input tensor named like a quantized layer's data (``<layer>.weight_scale``, ``.weight_<x>``,
    ``.input_scale``, ...: ComfyUI and ``read_comfy`` would take it as that layer's scale) or like a scale of no
    layer (``read_comfy`` refuses orphan scales). ``ValueError`` names the input tensor and what to do."""
    owner: dict[str, str] = {}
    for tp, group in zip(tensors, groups):
        for e in group:
            if e.name in owner:
                raise ValueError(
                    f"input tensor {tp.name!r} and {owner[e.name]!r} would both write output tensor {e.name!r}; "
                    f"rename or drop one of them in the input"
                )
            owner[e.name] = tp.name
    quantized = {tp.layer for tp in tensors if tp.action == "quantize"}
    for tp in tensors:
        if tp.action != "keep":
            continue
        layer = _layer_owning(tp.name, quantized)
        if layer is not None:
            raise ValueError(
                f"input tensor {tp.name!r} would be read as quantization data of layer {layer!r} (ComfyUI's name "
                f"for it); drop or rename it in the input, or keep the layer high-precision with "
                f"--exclude-layers '^{re.escape(layer)}$'"
            )
        if tp.name.endswith(ORPHAN_SCALE_SUFFIXES):
            raise ValueError(
                f"input tensor {tp.name!r} is named like a quantization scale but its layer is not quantized; "
                f"loaders refuse such a file. Is the input already quantized? Convert the high-precision original, "
                f"or drop the tensor"
            )


def _layer_owning(name: str, quantized: set[str]) -> str | None:
    """The quantized layer ``L`` a kept tensor ``name`` belongs to in a loader's eyes: ``L.weight_<x>`` (no further
    dot) or ``L<suffix>`` for a suffix of ``LAYER_DATA_SUFFIXES``; else None."""
    for suffix in LAYER_DATA_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in quantized:
            return name[: -len(suffix)]
    layer, sep, rest = name.rpartition(cf.WEIGHT_SUFFIX + "_")
    if sep and layer in quantized and "." not in rest:
        return layer
    return None


def scan_nonfinite(source: Source, candidates: list[str]) -> set[str]:
    """Names among ``candidates`` holding NaN/Inf (reads each one; used only with ``--skip-bad-layers``)."""
    bad = set()
    for name in candidates:
        t = read_tensor(source.tensors[name])
        if not bool(torch.isfinite(t).all()):
            bad.add(name)
    return bad


def build_plan(source: Source, options: ConvertOptions, *, max_shard_size: int | str | None = None) -> ConversionPlan:
    """Decide every tensor's fate and lay out the output file (or, with ``max_shard_size``, the shards: see
    ``split_shards``). Raises ``ValueError`` for unusable input or a bad size."""
    max_shard_size = None if max_shard_size is None else parse_size(max_shard_size)
    check_not_quantized(source)
    shapes = {n: i.shape for n, i in source.tensors.items()}
    if options.preset is None:
        preset, preset_reason = detect_preset(shapes)
        preset_reason = f"auto-detected: {preset_reason}"
    else:
        preset, preset_reason = resolve_preset(options.preset), "chosen by flag"
    nonfinite: set[str] = set()
    if options.skip_bad_layers:
        first = [decide(i, options, preset, set()) for i in source.tensors.values()]
        nonfinite = scan_nonfinite(source, [t.name for t in first if t.action == "quantize"])
    tensors = [decide(info, options, preset, nonfinite) for info in source.tensors.values()]
    if not any(i.is_float for i in source.tensors.values()):
        raise ValueError(f"input {source.files[0]} holds no floating-point tensors; nothing to convert")
    markers = {t.layer: _marker(t, source.tensors[t.name], options) for t in tensors if t.action == "quantize"}
    groups = [_outputs_for(tp, source.tensors[tp.name], markers.get(tp.layer)) for tp in tensors]
    check_output_names(tensors, groups)
    entries, _ = layout_entries([e for group in groups for e in group])
    metadata = _metadata(source, options, preset, tensors, markers)
    shards = [] if max_shard_size is None else split_shards(groups, max_shard_size, metadata, markers)
    return ConversionPlan(
        source, options, preset, preset_reason, tensors, entries, metadata, markers, max_shard_size, shards
    )


def split_shards(
    groups: list[list[OutputEntry]], max_bytes: int, metadata: dict[str, str], markers: dict[str, dict[str, Any]]
) -> list[Shard]:
    """Split the output groups (one per input tensor; a quantized layer's weight, scale and marker are one group), in
    plan order, into shards of at most ``max_bytes`` tensor bytes; a group larger than that gets a shard of its own.
    A group is never split, so every shard is a complete ComfyUI file for its layers. Each shard's
    ``_quantization_metadata`` lists exactly its own layers (it is dropped from shards holding none)."""
    packed: list[list[OutputEntry]] = []
    size = 0
    for group in groups:
        nbytes = sum(e.nbytes for e in group)
        if not group:
            continue
        if not packed or size + nbytes > max_bytes:
            packed.append([])
            size = 0
        packed[-1] += group
        size += nbytes
    shards = []
    for entries in packed:
        meta = dict(metadata)
        layers = {e.name[: -len(cf.MARKER_SUFFIX)] for e in entries if e.name.endswith(cf.MARKER_SUFFIX)}
        if cf.METADATA_KEY in meta:
            mine = {layer: marker for layer, marker in markers.items() if layer in layers}
            if mine:
                meta[cf.METADATA_KEY] = cf.metadata_header(mine)
            else:
                del meta[cf.METADATA_KEY]
        shards.append(Shard(layout_entries(entries)[0], meta))
    return shards


def _metadata(
    source: Source, options: ConvertOptions, preset: Preset, tensors: list[TensorPlan], markers: dict[str, dict]
) -> dict[str, str]:
    meta = dict(source.metadata)
    if options.metadata_header and markers:
        meta[cf.METADATA_KEY] = cf.metadata_header(markers)
    fallbacks = {t.layer: t.fallback for t in tensors if t.fallback}
    meta["lrq_ao"] = json.dumps(
        {"plan_version": PLAN_VERSION, "preset": preset.name, "options": options.to_dict(), "fallbacks": fallbacks},
        sort_keys=True,
        default=str,
    )
    return meta


def describe_plan(plan: ConversionPlan) -> str:
    """A human-readable table of the plan (``--dry-run``)."""
    from lrq_ao.convert.report import human_bytes

    lines = [f"preset: {plan.preset.name} ({plan.preset_reason})", ""]
    width = max((len(t.name) for t in plan.tensors), default=10)
    for t in plan.tensors:
        info = plan.source.tensors[t.name]
        what = t.format if t.action == "quantize" else t.action
        lines.append(f"  {t.name:<{width}}  {info.dtype:>5} {str(list(info.shape)):>16}  {what:<24} {t.reason}")
        if t.fallback:
            lines.append(f"  {'':<{width}}  FALLBACK: {t.full_fallback}")
    nq = len(plan.quantized)
    lines += [
        "",
        f"{nq} layers quantized, {sum(t.action == 'keep' for t in plan.tensors)} tensors kept, "
        f"{sum(t.action == 'remove' for t in plan.tensors)} removed, "
        f"{sum(1 for t in plan.tensors if t.fallback)} fallbacks",
        f"estimated output size: {human_bytes(plan.output_bytes)} (input {human_bytes(plan.input_bytes)})",
    ]
    if plan.shards:
        lines.append(
            f"output split into {len(plan.shards)} shards of at most {human_bytes(plan.max_shard_size)} tensor bytes "
            f"each (largest {human_bytes(max(s.data_bytes for s in plan.shards))}) plus an index"
        )
    custom = custom_formats(plan)
    if custom:
        lines.append(custom_format_warning(custom))
    return "\n".join(lines)


def custom_formats(plan: ConversionPlan) -> list[str]:
    """The ComfyUI names of the planned formats stock ComfyUI does not load (``fmt.stock`` is False)."""
    return sorted({t.format for t in plan.quantized if not t.weight_format.stock})


def custom_format_warning(formats: list[str]) -> str:
    stock = " or ".join(dict.fromkeys(f.comfy_name for f in FORMATS.values() if f.stock))
    return (
        f"WARNING: {', '.join(formats)} load only with the ComfyUI-QuantOps custom node; stock ComfyUI refuses "
        f"them ('Unsupported quantization format'). For stock ComfyUI use {stock}."
    )
