"""ComfyUI checkpoints: the ``lrq-convert`` converter (writing) and ``reader`` (``load_comfy``).

``convert_checkpoint`` is the converter as one Python call; the command line is ``lrq_ao.convert.cli``. Modules are
imported lazily so ``import lrq_ao`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def convert_checkpoint(
    input: str | Path,
    output: str | Path,
    *,
    format: str = "float8_e4m3fn",
    simple: bool = False,
    preset: str | None = None,
    verify: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
    resume: bool = False,
    max_shard_size: int | str | None = None,
    **rounding: Any,
):
    """Convert a safetensors checkpoint to a ComfyUI quantized checkpoint; returns the ``ConversionReport``.

    ``format`` is a ComfyUI format name (or lrq_ao short name); ``simple`` = round-to-nearest; ``preset`` None
    auto-detects the model family; ``rounding`` overrides ``LearnedRoundingConfig`` fields (``num_iter=...``).
    ``max_shard_size`` (bytes, or ``"5GB"``/``"500MB"``) splits the output into ``<stem>-0000i-of-0000N.safetensors``
    shards beside ``<stem>.safetensors.index.json`` (``report.output`` is then the index); None writes one file.
    With ``verify`` the output is reloaded and checked (``report.verify``). Raises ``ValueError``/``OSError`` for
    bad input or an unusable output path, like the CLI. Under ``torchrun`` (``WORLD_SIZE`` > 1) the layers are spread
    over the ranks (``lrq_ao.convert.distributed``); rank 0 returns the report, the other ranks None.
    """
    from lrq_ao.config import LearnedRoundingConfig
    from lrq_ao.convert.engine import RunOptions, convert
    from lrq_ao.convert.plan import ConvertOptions, build_plan
    from lrq_ao.convert.stream import read_source

    config = LearnedRoundingConfig(**{**rounding, **({"objective": "rtn"} if simple else {})})
    options = ConvertOptions(format=format, preset=preset, rounding=config)
    plan = build_plan(read_source(input), options, max_shard_size=max_shard_size)
    run = RunOptions(device=device, resume=resume, overwrite=overwrite, quiet=True)
    from lrq_ao.convert.distributed import convert_distributed, launched_distributed

    if launched_distributed():  # under torchrun every rank calls this; rank 0 gets the report, the others None
        report = convert_distributed(plan, output, run)
        if report is None:
            return None
    else:
        report = convert(plan, output, run)
    if verify:
        from lrq_ao.convert.verify import verify_output

        report.verify = verify_output(plan, report)
    return report


__all__ = ["convert_checkpoint"]
