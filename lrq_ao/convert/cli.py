"""``lrq-convert``: convert a high-precision safetensors checkpoint to a ComfyUI FP8/INT8 checkpoint.

Every quantization default comes from ``LearnedRoundingConfig`` (see ``rounding_config_from_args``), so the CLI and
the Python API can never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from lrq_ao.config import BLOCK_SIZES, INITS, OBJECTIVES, OPTIMIZERS, RELAXATIONS, SCHEDULES, LearnedRoundingConfig
from lrq_ao.convert.plan import (
    FORMAT_ALIASES,
    ConvertOptions,
    build_plan,
    custom_format_warning,
    custom_formats,
    describe_plan,
    format_aliases,
    load_layer_config,
    parse_size,
)
from lrq_ao.convert.presets import PRESET_ALIASES, PRESETS

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LearnedRoundingConfig)}

DESCRIPTION = """\
Convert a safetensors checkpoint (a diffusion transformer or a text encoder) into a ComfyUI quantized checkpoint:
every eligible linear weight becomes FP8 (e4m3fn) or INT8 with its scale and a .comfy_quant marker; norms,
biases, embeddings, 1-D and conv tensors stay as they are. Rounding follows LearnedRoundingConfig: with --calib
statistics, learned rounding minimizes each layer's output error; without them the default is round-to-nearest
(--objective svd asks for the reference tool's weight-SVD objective; --simple forces round-to-nearest). The file
is read and written layer by layer, so host memory stays near a few of the largest tensors, and an interrupted
run can continue with --resume.

Formats (--format, or --int8 / --scaling_mode):
  float8_e4m3fn            FP8, one scale per tensor        loads in stock ComfyUI   (default)
  int8_tensorwise          INT8, one scale per row          loads in stock ComfyUI   (--int8)
  int8_tensorwise_tensor   INT8, one scale per tensor       loads in stock ComfyUI   (--int8 --scaling_mode tensor)
  float8_e4m3fn_rowwise    FP8, one scale per row           ComfyUI-QuantOps node only (--scaling_mode row)
  float8_e4m3fn_blockwise  FP8, block x block scales        ComfyUI-QuantOps node only (--scaling_mode block)
  int8_blockwise           INT8, block x block scales       ComfyUI-QuantOps node only (--int8 --scaling_mode block)
  int8_convrot             INT8 ConvRot (Hadamard-rotated)  loads in stock ComfyUI, runs W8A8 (--convrot)
  mxfp8                    FP8, E8M0 scale per 32 inputs    loads in stock ComfyUI (Blackwell-native)
  nvfp4                    FP4 E2M1, FP8 scale per 16       loads in stock ComfyUI (Blackwell-native)
  convrot_w4a4             INT4 ConvRot, scale per row      loads in stock ComfyUI
  w4a8 (asym_w4a8_int8)    4-bit codebook ConvRot           ComfyUI with the asym_w4a8_int8 loader
A layer a block format cannot tile falls back to the row-wise format of the same dtype; the report and the file's
metadata name every fallback.
"""
# Every name --format takes, from the format registry (lrq_ao.formats), so a new format file shows up here too.
DESCRIPTION += "Every --format name: " + ", ".join(FORMAT_ALIASES) + "\n"

EPILOG = """\
examples:
  lrq-convert -i flux1-dev.safetensors --simple                      # FP8, auto-detected preset
  lrq-convert -i t5xxl_fp16.safetensors --t5xxl --int8 -o t5xxl_int8.safetensors
  lrq-convert -i model.safetensors --dry-run                         # show the plan, write nothing
  lrq-convert -i model.safetensors --max-shard-size 5GB -o out.safetensors  # out-0000i-of-0000N + index
  lrq-convert -i model.safetensors --resume --verify --report r.json --plot sqnr.png

presets (auto-detected from key names when no flag is given; a flag overrides):
""" + "\n".join(f"  --{name:<20} {p.help}" for name, p in PRESETS.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrq-convert",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument(
        "-i",
        "--input",
        required=True,
        help="a .safetensors file, a *.safetensors.index.json, or a "
        "folder holding one index (sharded checkpoint); opened read-only",
    )
    io.add_argument(
        "-o", "--output", help="output .safetensors path (default: <input>_<format>.safetensors beside the input)"
    )
    io.add_argument(
        "--max-shard-size",
        "--max_shard_size",
        type=_size_arg,
        default=None,
        dest="max_shard_size",
        metavar="SIZE",
        help="split the output into shards of at most SIZE tensor bytes (5GB, 500MB, 2GiB or bytes): "
        "<stem>-00001-of-0000N.safetensors beside <stem>.safetensors.index.json (default: one file)",
    )
    io.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    io.add_argument(
        "--allow-shards-outside",
        "--allow_shards_outside",
        action="store_true",
        dest="allow_shards_outside",
        help="let a *.safetensors.index.json name shard files outside its own folder (absolute paths, ../); "
        "refused by default so an index cannot make lrq-convert read files elsewhere",
    )
    io.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from <output>.partial; the "
        "result is byte-identical to an uninterrupted run (same input and flags required)",
    )
    io.add_argument(
        "--dry-run",
        "--dry_run",
        action="store_true",
        dest="dry_run",
        help="print the plan (each tensor, its format or why it stays high-precision, estimated size) "
        "and write nothing",
    )
    io.add_argument(
        "--verify",
        action="store_true",
        help="after writing, reload the output with lrq_ao's ComfyUI "
        "reader and check every layer against the input; exit 3 if anything differs",
    )
    io.add_argument(
        "--report", metavar="PATH", help="write the validation report (per-layer SQNR, objective, time; totals) as JSON"
    )
    io.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of per-layer SQNR (needs matplotlib)")
    io.add_argument("--quiet", action="store_true", help="no progress bars or tables; errors still print")
    io.add_argument(
        "--comfy_quant",
        "--comfy-quant",
        action="store_true",
        dest="comfy_quant",
        help="accepted for compatibility; the output always carries .comfy_quant markers",
    )
    io.add_argument(
        "--save-quant-metadata",
        "--save_quant_metadata",
        action="store_true",
        dest="save_quant_metadata",
        help="accepted for convert_to_quant compatibility; the _quantization_metadata header is always written "
        "(--no-metadata leaves it out)",
    )
    io.add_argument(
        "--low-memory",
        "--low_memory",
        "-lm",
        action="store_true",
        dest="low_memory",
        help="accepted for convert_to_quant compatibility; lrq-convert always streams one layer at a time",
    )
    io.add_argument(
        "--no-metadata",
        action="store_true",
        dest="no_metadata",
        help="do not write the optional _quantization_metadata file header",
    )

    fmt = p.add_argument_group("format")
    fmt.add_argument(
        "--format",
        choices=list(format_aliases()),
        metavar="NAME",
        help="explicit output format (overrides --int8/--scaling_mode); see the table above",
    )
    fmt.add_argument(
        "--mxfp8",
        action="store_const",
        const="mxfp8",
        dest="format",
        help="MXFP8 (same as --format mxfp8; convert_to_quant's flag)",
    )
    fmt.add_argument(
        "--nvfp4",
        action="store_const",
        const="nvfp4",
        dest="format",
        help="NVFP4 (same as --format nvfp4; convert_to_quant's flag)",
    )
    fmt.add_argument(
        "--int8",
        action="store_true",
        help="INT8 instead of FP8 (alone: per-row int8_tensorwise, which stock ComfyUI loads)",
    )
    fmt.add_argument(
        "--scaling_mode",
        "--scaling-mode",
        choices=("tensor", "row", "block"),
        dest="scaling_mode",
        help="scale granularity (default: tensor for FP8, row for INT8)",
    )
    fmt.add_argument(
        "--convrot",
        action="store_true",
        help="INT8 ConvRot (int8_convrot): weights rotated by a block-diagonal Hadamard, W8A8 in stock ComfyUI; "
        "implies --int8",
    )
    fmt.add_argument(
        "--convrot_group_size",
        "--convrot-group-size",
        "--convrot_groupsize",
        type=int,
        choices=(16, 64, 256, 1024),
        default=None,
        dest="convrot_group_size",
        help="ConvRot rotation group G (default 256); a layer whose input width G does not divide takes the largest "
        "smaller group that does, else plain per-row INT8 (plan, report and metadata say which)",
    )
    fmt.add_argument(
        "--block_size",
        "--block-size",
        "--group_size",
        type=int,
        default=_DEFAULTS["block_size"],
        dest="block_size",
        choices=BLOCK_SIZES,
        help="block edge for block-wise formats (the rotation group for ConvRot formats)",
    )
    fmt.add_argument(
        "--full_precision_mm",
        "--full-precision-mm",
        action="store_true",
        dest="full_precision_mm",
        help="mark layers full_precision_matrix_mult (ComfyUI dequantizes instead of FP8 matmul)",
    )

    layers = p.add_argument_group("which layers")
    for name in PRESETS:
        layers.add_argument(f"--{name}", action="store_const", const=name, dest="preset", help=argparse.SUPPRESS)
    for alias, target in PRESET_ALIASES.items():
        layers.add_argument(f"--{alias}", action="store_const", const=target, dest="preset", help=argparse.SUPPRESS)
    layers.add_argument(
        "--preset",
        choices=list(PRESETS),
        dest="preset",
        help="model-family preset (or a flag like --t5xxl, --flux2, --wan; listed below)",
    )
    layers.add_argument(
        "--exclude-layers",
        "--exclude_layers",
        metavar="REGEX",
        dest="exclude_layers",
        help="keep layers whose module path matches REGEX (re.search) in high precision",
    )
    layers.add_argument(
        "--custom-layers",
        "--custom_layers",
        metavar="REGEX",
        dest="custom_layers",
        help="layers matching REGEX get --custom-format; this wins over presets and exclusions "
        "(but never over shape rules: 1-D and conv tensors are never quantized)",
    )
    layers.add_argument(
        "--custom-format",
        "--custom-type",
        "--custom_type",
        choices=list(format_aliases()),
        metavar="NAME",
        dest="custom_format",
        help="format for --custom-layers",
    )
    layers.add_argument(
        "--layer-config",
        "--layer_config",
        metavar="JSON",
        dest="layer_config",
        help='per-layer rules: {"regex": {"format": "int8_blockwise", "block_size": 64}, '
        '"regex2": {"skip": true}, "_default": {...}}; the longest matching regex wins',
    )
    layers.add_argument(
        "--skip-bad-layers",
        action="store_true",
        dest="skip_bad_layers",
        help="keep weights holding NaN/Inf in high precision and report them, instead of failing "
        "(costs one extra read of the weights)",
    )

    rnd = p.add_argument_group("rounding (defaults are LearnedRoundingConfig's)")
    rnd.add_argument("--simple", action="store_true", help="round-to-nearest (fast; no optimization)")
    rnd.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=_DEFAULTS["objective"],
        help="rounding objective (auto: output error with --calib, else round-to-nearest)",
    )
    rnd.add_argument(
        "--relaxation",
        choices=RELAXATIONS,
        default=_DEFAULTS["relaxation"],
        help="how rounding choices are optimized (see LearnedRoundingConfig): greedy/parallel coordinate descent, or a "
        "gradient relaxation (ste, sigmoid, continuous = the reference tool's) driven by --optimizer/--num_iter/--lr; "
        "auto lets lrq_ao pick per objective",
    )
    rnd.add_argument(
        "--greedy_passes",
        "--greedy-passes",
        type=int,
        default=_DEFAULTS["greedy_passes"],
        dest="greedy_passes",
        help="passes of the greedy relaxation",
    )
    rnd.add_argument(
        "--init",
        choices=INITS,
        default=_DEFAULTS["init"],
        help="starting rounding: rtn, or gptq (needs --calib); auto picks gptq with --calib",
    )
    rnd.add_argument("--optimizer", choices=OPTIMIZERS, default=_DEFAULTS["optimizer"])
    rnd.add_argument(
        "--num_iter",
        "--num-iter",
        type=int,
        default=_DEFAULTS["num_iter"],
        dest="num_iter",
        help="optimization steps per layer",
    )
    rnd.add_argument("--lr", type=float, default=_DEFAULTS["lr"], help="learning rate (default: per relaxation)")
    rnd.add_argument(
        "--lr_schedule", "--lr-schedule", choices=SCHEDULES, default=_DEFAULTS["lr_schedule"], dest="lr_schedule"
    )
    rnd.add_argument(
        "--top_p",
        "--top-p",
        type=float,
        default=_DEFAULTS["top_p"],
        dest="top_p",
        help="fraction of singular directions the SVD objective keeps",
    )
    rnd.add_argument("--min_k", "--min-k", type=int, default=_DEFAULTS["min_k"], dest="min_k")
    rnd.add_argument("--max_k", "--max-k", type=int, default=_DEFAULTS["max_k"], dest="max_k")
    rnd.add_argument(
        "--calib",
        metavar="FILE",
        help="activation statistics saved by lrq_ao.calibrate (enables the output-error objective)",
    )
    rnd.add_argument(
        "--calib_samples",
        "--calib-samples",
        type=int,
        default=None,
        dest="calib_samples",
        help="accepted for convert_to_quant compatibility (there: random samples for bias "
        "correction); lrq_ao uses real statistics from --calib instead and ignores this number",
    )
    rnd.add_argument(
        "--manual_seed",
        "--manual-seed",
        type=int,
        default=_DEFAULTS["seed"],
        dest="manual_seed",
        help="seed for learned rounding's random draws (the same for every layer, so a layer's result does not "
        "depend on the order layers run in; -1, the reference tool's 'random', means 0 so --resume stays exact)",
    )
    rnd.add_argument("--device", default="cpu", help="where weights are quantized: cpu, cuda, cuda:1, ...")
    return p


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def resolve_format(args: argparse.Namespace) -> str:
    """The ``--format`` name the flags ask for."""
    if args.convrot or args.convrot_group_size is not None:
        if args.format and args.format != "int8_convrot":
            raise ValueError(f"--convrot writes int8_convrot; it cannot be combined with --format {args.format}")
        if args.scaling_mode not in (None, "row"):
            raise ValueError("--convrot is per-row INT8 after the rotation; drop --scaling_mode")
        return "int8_convrot"
    if args.format:
        return args.format
    mode = args.scaling_mode or ("row" if args.int8 else "tensor")
    if args.int8:
        return {"tensor": "int8_tensorwise_tensor", "row": "int8_tensorwise", "block": "int8_blockwise"}[mode]
    return {"tensor": "float8_e4m3fn", "row": "float8_e4m3fn_rowwise", "block": "float8_e4m3fn_blockwise"}[mode]


def _block_size(args: argparse.Namespace) -> int:
    """``--convrot-group-size`` where given (the ConvRot formats' block is their rotation group), else
    ``--block-size``."""
    return args.convrot_group_size if args.convrot_group_size is not None else args.block_size


def rounding_config_from_args(args: argparse.Namespace) -> LearnedRoundingConfig:
    """The one place CLI flags become a ``LearnedRoundingConfig`` (format is set per layer by the plan)."""
    return LearnedRoundingConfig(
        objective="rtn" if args.simple else args.objective,
        relaxation=args.relaxation,
        greedy_passes=args.greedy_passes,
        init=args.init,
        optimizer=args.optimizer,
        num_iter=args.num_iter,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        top_p=args.top_p,
        min_k=args.min_k,
        max_k=args.max_k,
        seed=max(args.manual_seed, 0),
        block_size=_block_size(args),
    )


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(
        format=resolve_format(args),
        block_size=_block_size(args),
        preset=args.preset,
        exclude_layers=args.exclude_layers,
        custom_layers=args.custom_layers,
        custom_format=args.custom_format,
        layer_rules=load_layer_config(args.layer_config) if args.layer_config else (),
        skip_bad_layers=args.skip_bad_layers,
        metadata_header=not args.no_metadata,
        full_precision_matrix_mult=args.full_precision_mm,
        rounding=rounding_config_from_args(args),
    )


def default_output(input_path: str, fmt: str) -> Path:
    src = Path(input_path)
    if src.is_dir():
        return src.parent / f"{src.name}_{fmt}.safetensors"
    stem = src.name.removesuffix(".index.json").removesuffix(".safetensors")
    return src.with_name(f"{stem}_{fmt}.safetensors")


def _load_calibration(path: str | None):
    """The ``--calib`` statistics, or None; ``ValueError`` naming the file for one that cannot be used."""
    if path is None:
        return None
    from safetensors import SafetensorError

    from lrq_ao.rounding.calibration import Calibration

    if not Path(path).is_file():
        raise ValueError(f"--calib {path} does not exist; write one with lrq_ao.calibrate(model) ... calib.save(path)")
    try:
        return Calibration.load(path)
    except (SafetensorError, OSError, KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"--calib {path} is not a usable lrq_ao calibration file ({str(e).splitlines()[0] if str(e) else e!r}); "
            f"write one with lrq_ao.calibrate(model) ... calib.save(path)"
        ) from None


def check_calibration_flags(args: argparse.Namespace) -> None:
    """Refuse, before any work, rounding choices that need ``--calib`` when it is not given (in the CLI's words)."""
    from lrq_ao.rounding.objectives import needs_calibration

    if args.calib is not None or args.simple:
        return
    if needs_calibration(args.objective):
        raise ValueError(
            f"--objective {args.objective} minimizes the layer's output error and needs activation statistics: pass "
            f"--calib FILE (from lrq_ao.calibrate), or use --objective svd (no data) or --simple (round-to-nearest)"
        )
    if args.init == "gptq":
        raise ValueError("--init gptq needs --calib FILE (activation statistics); drop --init or pass --calib")


def check_side_outputs(args: argparse.Namespace) -> None:
    """Check the ``--report`` and ``--plot`` paths (and that ``--plot`` can run) before the conversion starts, so a
    typo does not fail after hours of work."""
    for flag, path in (("--report", args.report), ("--plot", args.plot)):
        if path is None:
            continue
        target = Path(path)
        if target.is_dir():
            raise IsADirectoryError(f"{flag} {path} is a folder; give a file path")
        folder = target.parent
        if not folder.is_dir():
            raise FileNotFoundError(f"{flag} {path}: folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{flag} {path}: folder {folder} is not writable; choose another path")
    if args.plot is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise RuntimeError("--plot needs matplotlib; install it with `pip install 'lrq_ao[plot]'` or drop --plot")


def remove_outputs(plan, output: Path) -> list[Path]:
    """Delete every final file of ``plan``'s output to ``-o output`` (a failed ``--verify``); returns those removed."""
    final, files, index = plan.output_files(output)
    paths = [f.path for f in files] + ([final] if index is not None else [])
    removed = [p for p in paths if p.exists()]
    for p in removed:
        p.unlink()
    return removed


def _say(quiet: bool, *msg: str) -> None:
    if not quiet:
        print(*msg, file=sys.stderr)


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and convert. Returns the exit code (0 ok, 1 error, 3 --verify found problems)."""
    from lrq_ao.convert.distributed import RankInfo, launched_distributed
    from lrq_ao.convert.engine import RunOptions, check_plan_targets, convert
    from lrq_ao.convert.stream import read_source

    args = build_parser().parse_args(argv)
    distributed = launched_distributed()  # under torchrun: rank 0 prints, verifies and reports
    args.quiet = args.quiet or RankInfo.from_env().rank != 0
    options = options_from_args(args)
    check_calibration_flags(args)
    if args.int8 and args.scaling_mode is None and not args.format and not args.convrot:
        _say(
            args.quiet,
            "note: --int8 alone writes int8_tensorwise with one scale per row (stock ComfyUI loads it); "
            "convert_to_quant 1.3.4's --int8 wrote one scale per tensor: add --scaling_mode tensor for that",
        )
    if args.custom_format == "int8":
        _say(
            args.quiet,
            "note: --custom-type int8 writes per-row int8_tensorwise; convert_to_quant 1.3.4's wrote 128-blocks: "
            "use --custom-type int8_blockwise for that",
        )
    source = read_source(args.input, allow_outside=args.allow_shards_outside)
    plan = build_plan(source, options, max_shard_size=args.max_shard_size)
    output = Path(args.output) if args.output else default_output(args.input, options.format)
    if not args.dry_run:
        _say(args.quiet, f"preset: {plan.preset.name} ({plan.preset_reason})")
    custom = custom_formats(plan)
    if custom:
        print(custom_format_warning(custom), file=sys.stderr)
    if args.dry_run:
        if RankInfo.from_env().rank != 0:
            return 0
        print(describe_plan(plan))
        final, files, _ = plan.output_files(output)
        shards = f" + {len(files)} shards ({files[0].path.name} ...)" if plan.shards else ""
        print(f"output would be: {final}{shards}")
        return 0
    check_plan_targets(plan, output, overwrite=args.overwrite, resume=args.resume)
    check_side_outputs(args)
    run_opts = RunOptions(args.device, args.resume, args.overwrite, args.quiet, _load_calibration(args.calib))
    if distributed:
        from lrq_ao.convert.distributed import convert_distributed

        report = convert_distributed(plan, output, run_opts)
        if report is None:
            return 0
    else:
        report = convert(plan, output, run_opts)
    code = 0
    if args.verify:
        from lrq_ao.convert.verify import verify_output

        try:
            report.verify = verify_output(plan, report)
        except ValueError as e:  # the output cannot even be read back
            report.verify = {"ok": False, "problems": [f"the output cannot be read back: {e}"]}
        if not report.verify["ok"]:
            removed = remove_outputs(plan, output)
            print("verify FAILED:\n  " + "\n  ".join(report.verify["problems"]), file=sys.stderr)
            print(f"lrq-convert: deleted the unverified output ({', '.join(map(str, removed))})", file=sys.stderr)
            code = 3
        else:
            _say(
                args.quiet,
                f"verify ok: {report.verify['layers_checked']} layers, "
                f"{report.verify['tensors_checked']} kept tensors match the input",
            )
    if not args.quiet:
        print(report.table(max_rows=60))
        shards = f" and {len(plan.shards)} shards beside it" if plan.shards else ""
        if code == 0:
            print(f"wrote {report.output}{shards}")
    if args.report:
        report.write_json(args.report)
    if args.plot:
        report.plot(args.plot)
    return code


def main(argv: list[str] | None = None) -> None:
    """Console entry point: clear one-line errors instead of tracebacks for bad input."""
    try:
        code = run(argv)
    except KeyboardInterrupt:
        print("lrq-convert: interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        code = 130
    except (ValueError, OSError, RuntimeError, json.JSONDecodeError) as e:
        print(f"lrq-convert: error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)
