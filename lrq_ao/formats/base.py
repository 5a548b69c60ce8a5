"""What every weight format answers. One subclass per format family, one file each (``lrq_ao/formats/*.py``).

A ``WeightFormat`` owns every rule of its format, so that layouts, kernels' selection, rounding, the converter,
the reader and the report ask it instead of branching on element dtypes or granularity names:

* **element and packing**: ``element`` (an :class:`~lrq_ao.formats.elements.Element`);
* **group shape**: :meth:`block_size_for` (``(bn, bk)``; per-tensor ``(N, K)``, per-row ``(1, K)``, square
  blocks ``(b, b)``, groups ``(1, g)`` along K) and :meth:`refusal` (why a weight shape cannot be stored);
* **scale rule**: :meth:`compute_scales` returns ``scale`` (a float32 grid ``(N // bn, K // bk)``) and, for
  two-level formats, ``scale2`` (a float32 scalar); :meth:`effective_scale` is the per-block multiplier;
* **rounding grid**: ``element.values()`` under the fixed effective scale (what learned rounding may choose);
* **input rotation** (ConvRot): :meth:`rotate_weight` / :meth:`rotate_input` / :meth:`rotate_hessian`, identity
  by default, :meth:`rotate_input_float32` (the rotation lrq_ao's linears apply) and :attr:`hadamard_group` (whether
  the fused rotate + quantize kernel implements it); quantization, rounding and ``dequantize`` work in the rotated
  basis, :meth:`dequantize_original` returns the weight a plain ``F.linear`` needs;
* **activation pairing**: :meth:`dynamic_activation` (which activation quantization a dynamic W8A8 linear uses);
* **ComfyUI**: ``comfy_name``, ``stock``, :meth:`comfy_marker_fields`, :meth:`comfy_tensors`; reading goes through
  the reader the format file registers (``lrq_ao.formats.comfy.register_reader``);
* **exact dequantization**: :meth:`dequantize` (``decode(codes) * scale`` broadcast per block, float32).

Formats are immutable and hashable (they travel as tensor metadata through ``torch.compile``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lrq_ao.formats.elements import Element

MIN_SCALE = 1e-8


class FormatError(ValueError):
    """A weight a format cannot store, or data that does not follow the format. The message names the tensor."""


@dataclass
class QuantizedWeight:
    """A quantized weight at the format level: what a tensor class wraps and what a file stores.

    qdata: stored codes (``element.storage_dtype``; ``(N, K)``, or ``(N, K / 2)`` for packed 4-bit).
    scale: float32 grid ``(N // bn, K // bk)``.
    block_size: ``(bn, bk)``.
    scale2: float32 scalar of a two-level format, else ``None``.
    extra: further stored tensors a format needs besides these, by name (empty for most formats). ``w4a8`` keeps
        its per-row ``"s_channel"`` (float32 ``(N,)``) here; a tensor class wrapping a ``QuantizedWeight`` carries
        these as inner tensors too (flatten / unflatten, device moves), named ``extra.<name>``.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    block_size: tuple[int, int]
    scale2: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def check_2d(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    if len(shape) != 2:
        raise FormatError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    """Raise ``FormatError`` naming the tensor if it holds NaN or Inf."""
    if not bool(torch.isfinite(w).all()):
        n_bad = int((~torch.isfinite(w)).sum())
        raise FormatError(
            f"tensor {name!r} has {n_bad} NaN/Inf values and cannot be quantized; fix the checkpoint or leave "
            f"this layer in high precision"
        )


def expand_scale(scale: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Broadcast a 2-D block scale grid to the full weight shape."""
    bn, bk = block_size
    return scale.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)


def blocked_amax(w: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """``max |w|`` per ``(bn, bk)`` block, shape ``(N // bn, K // bk)``."""
    n, k = w.shape
    bn, bk = block_size
    if n % bn or k % bk:
        raise FormatError(f"block size {block_size} does not tile shape {tuple(w.shape)}")
    return w.abs().reshape(n // bn, bn, k // bk, bk).amax(dim=(1, 3))


def broadcast_blocks(values: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """``values * scale`` with the scale broadcast per block (a view, no full-size scale tensor)."""
    n, k = values.shape
    bn, bk = block_size
    blocks = values.reshape(n // bn, bn, k // bk, bk) * scale.reshape(n // bn, 1, k // bk, 1)
    return blocks.reshape(n, k)


class WeightFormat:
    """Base of every format (see the module docstring). Subclasses are frozen dataclasses."""

    element: Element
    comfy_name: str
    stock: bool = True

    # ---- identity -------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The lrq_ao name (``LearnedRoundingConfig.format``, ``lrq-convert --format``)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for reports: the name and the group shape."""
        return self.name

    @property
    def has_blocks(self) -> bool:
        """Whether the user chooses a block size for this format (``LearnedRoundingConfig.block_size``)."""
        return False

    # ---- group shape ----------------------------------------------------------------------------------------

    def block_size_for(self, shape: tuple[int, int] | torch.Size) -> tuple[int, int]:
        """``(bn, bk)`` for a weight of ``shape``; ``FormatError`` if the format cannot store it."""
        raise NotImplementedError

    def refusal(self, shape: tuple[int, ...] | torch.Size) -> str | None:
        """Why a weight of ``shape`` cannot be stored in this format (``None`` if it can)."""
        try:
            self.block_size_for(check_2d(shape))
        except FormatError as exc:
            return str(exc)
        return None

    # ---- scales and rounding --------------------------------------------------------------------------------

    def compute_scales(self, w: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Round-to-nearest's scales for (rotated) ``w``: ``(scale grid, scale2 or None)``."""
        raise NotImplementedError

    def effective_scale(self, scale: torch.Tensor, scale2: torch.Tensor | None) -> torch.Tensor:
        """The float32 grid that multiplies decoded codes, block by block."""
        return scale.float()

    def round_values(
        self, w: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor | None, block_size: tuple[int, int]
    ) -> torch.Tensor:
        """Round-to-nearest codes (unpacked) of (rotated) ``w`` under fixed scales."""
        x = w.float() / expand_scale(self.effective_scale(scale, scale2), block_size)
        return self.element.round(x)

    def quantize(self, w: torch.Tensor, name: str = "weight") -> QuantizedWeight:
        """Round-to-nearest quantization of a high-precision ``(N, K)`` weight (rotated first where the format
        rotates). Raises ``FormatError`` naming ``name`` for NaN/Inf or a shape the format cannot store."""
        shape = check_2d(w.shape)
        check_finite(w, name)
        try:
            block_size = self.block_size_for(shape)
        except FormatError as exc:
            raise FormatError(f"{name}: {exc}") from None
        wr = self.rotate_weight(w.float())
        scale, scale2 = self.compute_scales(wr, block_size)
        codes = self.round_values(wr, scale, scale2, block_size)
        return QuantizedWeight(self.element.pack(codes), scale, block_size, scale2)

    def rounding_refusal(self) -> str | None:
        """Why learned rounding cannot choose this format's codes (``None`` when it can): it chooses among
        ``element.values()`` times one fixed :meth:`effective_scale` per group, which a format whose decoded values
        are not that product cannot offer. Such a format is rounded to nearest, and the report says why."""
        return None

    def from_codes(self, codes: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
        """A weight with ``like``'s scales and the given (unpacked) codes."""
        return QuantizedWeight(self.element.pack(codes), like.scale, like.block_size, like.scale2)

    def codes(self, qw: QuantizedWeight) -> torch.Tensor:
        """The unpacked codes of ``qw``."""
        return self.element.unpack(qw.qdata)

    # ---- dequantization -------------------------------------------------------------------------------------

    def dequantize(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight in ``dtype``, exactly (float32 arithmetic), in the rotated basis where the format
        rotates: ``decode(codes) * effective_scale`` broadcast per block."""
        values = self.element.decode(self.codes(qw))
        scale = self.effective_scale(qw.scale, qw.scale2)
        return broadcast_blocks(values, scale, qw.block_size).to(dtype)

    def dequantize_original(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in the model's own basis (what ``F.linear(x, ·)`` needs): un-rotated where the format rotates."""
        return self.unrotate_weight(self.dequantize(qw, torch.float32)).to(dtype)

    # ---- input rotation (identity unless the format rotates) ------------------------------------------------

    @property
    def rotates(self) -> bool:
        return False

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W`` in the basis the codes are stored in."""
        return w

    def unrotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rotate_weight`."""
        return w

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """Activations ``(..., K)`` in the rotated basis, so ``rotate_input(x) @ rotate_weight(W).T == x @ W.T``."""
        return x

    def rotate_input_float32(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`rotate_input` as lrq_ao's own linears compute it: float32, in the format's most exact and
        reproducible arithmetic (ConvRot: a float32 butterfly that the fused Triton pass matches bit for bit, where
        :meth:`rotate_input` follows comfy-kitchen's product in ``x``'s dtype). Default: :meth:`rotate_input` of
        ``x.float()``."""
        return self.rotate_input(x.float())

    @property
    def hadamard_group(self) -> int | None:
        """``G`` when :meth:`rotate_input_float32` is the ConvRot butterfly (block-diagonal regular Hadamard of size
        ``G``, ``lrq_ao.formats.convrot.rotate_exact``): the rotation ``lrq_ao::rotate_quant_int8`` fuses into the
        activation quantization. ``None`` for every other format."""
        return None

    def rotate_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """``E[x xᵀ]`` of the rotated inputs, from ``E[x xᵀ]`` of the model's inputs."""
        return h

    def rotate_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """``E[x]`` of the rotated inputs."""
        return self.rotate_input(mean)

    # ---- activation pairing ---------------------------------------------------------------------------------

    def dynamic_activation(self, block_size: tuple[int, int], shape: tuple[int, int]) -> tuple[str, int] | str:
        """For ``activation="dynamic"``: ``(granularity, block)`` of the activation quantization that pairs with
        this weight (``("row", 0)`` per token, ``("block", bk)`` 1 x bk along K), or a string saying why this
        format has no dynamic mode."""
        return f"format {self.name} has no dynamic activation quantization; use activation='weight_only'"

    @property
    def kernel_dtype(self) -> torch.dtype | None:
        """The dtype lrq_ao's 8-bit linear kernels consume for this format's codes, or ``None`` when only the
        dequantizing path runs it."""
        return None if self.rotates else self.element.kernel_dtype

    # ---- ComfyUI --------------------------------------------------------------------------------------------

    def comfy_marker_fields(self, qw_block_size: tuple[int, int], shape: tuple[int, int]) -> dict[str, Any]:
        """Marker keys beyond ``format`` / ``orig_dtype`` / ``orig_shape`` / ``full_precision_matrix_mult``,
        in the order they are written (e.g. ``group_size``, ``per_row``, ``convrot``)."""
        return {}

    def comfy_tensors(self, qw: QuantizedWeight, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Stored tensors by suffix (``.weight``, ``.weight_scale``[, ``.weight_scale_2``]) for a weight of
        logical ``shape``."""
        raise NotImplementedError

    def comfy_tensor_specs(self, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``{suffix: (dtype, shape)}`` of :meth:`comfy_tensors` without computing them (for plans)."""
        block_size = self.block_size_for(shape)
        n, k = shape
        bn, bk = block_size
        meta = torch.device("meta")  # shapes and dtypes only: a plan of a 12B model allocates nothing
        dummy = QuantizedWeight(
            torch.zeros(self.element.stored_shape((n, k)), dtype=self.element.storage_dtype, device=meta),
            torch.ones(n // bn, k // bk, device=meta),
            block_size,
            torch.ones((), device=meta) if self._has_scale2 else None,
        )
        return {s: (t.dtype, tuple(t.shape)) for s, t in self.comfy_tensors(dummy, shape).items()}

    @property
    def _has_scale2(self) -> bool:
        return False
