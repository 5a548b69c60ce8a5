"""``LearnedRoundingConfig``: the one user-facing configuration of lrq_ao.

It is a torchao ``AOBaseConfig`` so ``torchao.quantization.quantize_`` accepts it (the handler is registered in
``lrq_ao.api``). Every field validates in ``__post_init__`` and the whole config round-trips through JSON
(``to_json`` / ``from_json``) except ``calibration``, which holds live statistics and is never serialized.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torchao.core.config import AOBaseConfig

from lrq_ao.formats import FORMATS, WeightFormat, get_format

CONFIG_VERSION = 1
# block_size values a config takes (a format with blocks may accept fewer: its own check runs too). A format without
# blocks ignores block_size but accepts these, so that configs written before (which always carried one) still load.
BLOCK_SIZES = (16, 32, 64, 128, 256, 1024)
DEFAULT_BLOCK_SIZE = 128


def format_with_block(fmt: WeightFormat, block_size: int) -> WeightFormat:
    """``fmt`` with ``block_size`` applied where the format has blocks (``get_format``). The default block size
    given to a format with blocks whose own choices exclude it means the format's own default (ConvRot's rotation
    group 256); any other value the format refuses raises its ``ValueError``."""
    if not fmt.has_blocks:
        return fmt
    try:
        return get_format(fmt, block_size)
    except ValueError:
        if block_size == DEFAULT_BLOCK_SIZE:
            return fmt
        raise


# ``auto`` and the names of ``lrq_ao.rounding.objectives.OBJECTIVE_KINDS``, the table every other site asks. Spelled
# out here because the rounding package imports this module; tests/rounding/test_objectives.py checks they agree.
OBJECTIVES = ("auto", "rtn", "svd", "output", "act_svd")
OPTIMIZERS = ("original", "adamw", "radam", "prodigy")
RELAXATIONS = ("auto", "greedy", "parallel", "ste", "sigmoid", "continuous")
INITS = ("auto", "rtn", "gptq")
SCHEDULES = ("none", "plateau", "exponential", "cosine")
ACTIVATIONS = ("weight_only", "dynamic")
ACTIVATION_QUANTS = ("exact", "fast")
KERNELS = ("auto", "torch", "emulated", "triton")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"LearnedRoundingConfig.{name} must be one of {choices}, got {value!r}")


@dataclass
class LearnedRoundingConfig(AOBaseConfig):
    """How to quantize every eligible ``nn.Linear`` weight.

    Format:
      format: a name in ``lrq_ao.formats.FORMATS``: ``fp8`` (e4m3fn, per-tensor), ``fp8_row``, ``fp8_block``,
        ``int8`` (per-row), ``int8_tensor``, ``int8_block``, and every format registered since.
      block_size: block edge for the formats with blocks (``fmt.has_blocks``: the ``*_block`` formats); 32, 64,
        128 or 256. Ignored by the other formats.
    Inference:
      activation: ``weight_only`` (dequantize into the activation dtype) or ``dynamic`` (quantize activations
        per call: FP8 per-tensor/per-row following the weight, INT8 per-token or per-block).
      activation_quant: for ``dynamic``, ``exact`` (the activation quantization is bit-identical to the
        reference on every path) or ``fast`` (compiled graphs fuse the reference's ops as Inductor compiles them:
        cheaper, a value may move by one grid step; eager calls stay exact).
      kernel: ``auto``, ``torch``, ``emulated`` or ``triton``.
    Rounding:
      objective: ``rtn`` (round-to-nearest), ``svd`` (the reference: truncated SVD of W, minimize
        ``‖U_kᵀ (W_dq − W) V_k‖``), ``output`` (layer-output error on calibration activations), ``act_svd``
        (subspace from the activations' SVD), or ``auto`` (``output`` when calibration is given, else ``rtn``).
      top_p, min_k, max_k: rank rule for the SVD objectives (the reference tool's defaults 0.2 / 256 / 1280).
      init: starting point, ``rtn`` or ``gptq`` (GPTQ error feedback with the fixed scales; needs calibration),
        ``auto``: ``gptq`` for the calibration-aware objectives, else ``rtn``.
      damp, act_order: GPTQ's damping (fraction of mean(diag H)) and activation order.
      relaxation: how the per-element choice between grid neighbours is optimized: ``greedy`` (exact coordinate
        descent, ``greedy_passes`` sweeps), ``parallel`` (all elements at once with a backtracking majorization
        step, ``num_iter`` iterations), ``ste`` (straight-through), ``sigmoid`` (AdaRound-style annealed),
        ``continuous`` (the reference tool: free offset, re-rounded at the end); ``auto``: ``parallel`` for
        ``svd``, ``greedy`` otherwise.
      shrinkage: trust in the calibration ``H``'s off-diagonal in the refinement objective,
        ``H ← (1 − α)H + α·diag(H)`` (the GPTQ start uses ``H`` as is); -1 (default) picks
        ``α = K / (K + calibration rows)``.
      objective_damp: ridge ``λ·mean(diag H)·I`` added to the output objective.
      neighbours_only: keep every element on one of the two grid values around ``w / s`` (GPTQ and greedy).
      compensate_drift: with statistics captured against a float reference (``quantize_sequential``), round
        against the float model's output rather than the layer's own.
      optimizer, lr, lr_schedule, num_iter, check_every, patience: the gradient loop (``ste``/``sigmoid``/
        ``continuous``); ``lr`` None picks a per-relaxation default (grid units).
      fallback_to_rtn: keep round-to-nearest when the result is not better on the objective.
      seed: makes the rounding deterministic.
      calibration: statistics from ``lrq_ao.calibrate`` (not serialized).
      bias_correction: ``b ← b − (W_dq − W)·μ_x`` with the calibrated input mean.
      device: where the optimization runs (``None``: the weight's device).
    """

    format: str = "fp8"
    block_size: int = DEFAULT_BLOCK_SIZE
    activation: str = "weight_only"
    activation_quant: str = "exact"
    kernel: str = "auto"
    objective: str = "auto"
    top_p: float = 0.2
    min_k: int = 256
    max_k: int = 1280
    init: str = "auto"
    damp: float = 0.01
    objective_damp: float = 0.0
    shrinkage: float = -1.0
    neighbours_only: bool = False
    compensate_drift: bool = True
    act_order: bool = True
    relaxation: str = "auto"
    greedy_passes: int = 2
    optimizer: str = "adamw"
    lr: float | None = None
    lr_schedule: str = "plateau"
    num_iter: int = 200
    check_every: int = 25
    patience: int = 4
    fallback_to_rtn: bool = True
    seed: int = 0
    bias_correction: bool = False
    device: str | None = None
    calibration: Any = field(default=None, repr=False, compare=False)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"LearnedRoundingConfig.format must be one of {sorted(FORMATS)}, got {self.format!r}")
        self._check_block_size(FORMATS[self.format])
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("activation_quant", self.activation_quant, ACTIVATION_QUANTS)
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("relaxation", self.relaxation, RELAXATIONS)
        _check_choice("init", self.init, INITS)
        if self.greedy_passes < 0:
            raise ValueError(f"LearnedRoundingConfig.greedy_passes must be >= 0, got {self.greedy_passes}")
        if not (self.shrinkage == -1.0 or 0.0 <= self.shrinkage <= 1.0):
            raise ValueError(f"LearnedRoundingConfig.shrinkage must be in [0, 1] or -1 (auto), got {self.shrinkage}")
        if self.objective_damp < 0:
            raise ValueError(f"LearnedRoundingConfig.objective_damp must be >= 0, got {self.objective_damp}")
        if not 0.0 < self.damp <= 10.0:
            raise ValueError(f"LearnedRoundingConfig.damp must be in (0, 10], got {self.damp}")
        _check_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"LearnedRoundingConfig.top_p must be in [0, 1], got {self.top_p}")
        if self.min_k < 1 or self.max_k < self.min_k:
            raise ValueError(f"need 1 <= min_k <= max_k, got min_k={self.min_k}, max_k={self.max_k}")
        if self.num_iter < 0 or self.check_every < 1 or self.patience < 1:
            raise ValueError("num_iter must be >= 0, check_every and patience >= 1")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"LearnedRoundingConfig.lr must be positive, got {self.lr}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is not supported; this lrq_ao reads {CONFIG_VERSION}")

    def _check_block_size(self, fmt: WeightFormat) -> None:
        if self.block_size not in BLOCK_SIZES:
            what = f"for format {fmt.name}" if fmt.has_blocks else f"(format {fmt.name} has no blocks and ignores it)"
            raise ValueError(
                f"LearnedRoundingConfig.block_size must be one of {BLOCK_SIZES} {what}, got {self.block_size}"
            )
        format_with_block(fmt, self.block_size)  # the format's own checks (ValueError)

    @property
    def weight_format(self) -> WeightFormat:
        """The format object of ``format``, with ``block_size`` applied where the format has blocks
        (see :func:`format_with_block`)."""
        return format_with_block(FORMATS[self.format], self.block_size)

    @property
    def spec(self) -> WeightFormat:
        """Older name of :attr:`weight_format`."""
        return self.weight_format

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self) if self.calibration is None else {f.name: getattr(self, f.name) for f in fields(self)}
        d.pop("calibration", None)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LearnedRoundingConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)} - {"calibration"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LearnedRoundingConfig fields {sorted(unknown)}")
        return cls(**data)
