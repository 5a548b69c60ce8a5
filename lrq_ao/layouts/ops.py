"""Op handlers shared by every quantized weight layout and format, registered on ``QuantizedWeightTensor``.

Subclasses find them through ``QuantizedWeightTensor.__torch_dispatch__``. Each handler keeps ``qdata``, ``scale``,
``scale2`` and ``block_size`` coherent and keeps ``fmt``: a transpose transposes the scale grid and the block size
(refused for packed or rotated codes, which only make sense along K), a slice along the output dimension slices the
scale grid (and must stay on block boundaries), ``split``/``chunk``/``cat`` along the output dimension keep each
part's scales (never merged or requantized), a ``.to(dtype)`` changes the dtype the tensor dequantizes to. Anything
not listed raises ``NotImplementedError`` naming the op and the layout (``QuantizedWeightTensor.__torch_dispatch__``).
Sizes, strides and offsets are the wrapper's logical ones (``lrq_ao.layouts.base.logical_geometry``).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

from lrq_ao.layouts.base import QuantizedWeightTensor, check_high_precision_dtype, unsupported_op_message

aten = torch.ops.aten
implements = QuantizedWeightTensor.implements
implements_torch_function = QuantizedWeightTensor.implements_torch_function


def _rebuild(
    t: QuantizedWeightTensor, qdata, scale, block_size, dtype=None, scale2=None, extra=None
) -> QuantizedWeightTensor:
    scale2 = t.scale2 if scale2 is None else scale2
    dtype = t.dtype if dtype is None else dtype
    extra = t.extra if extra is None else extra
    return type(t)(qdata, scale, block_size, dtype, t.fmt, scale2, act=t.act, kernel=t.kernel, extra=extra)


def _check_no_extra(t: QuantizedWeightTensor, op: str) -> None:
    """Row selections change the rows of qdata and scale; the format's extra tensors have no declared row layout."""
    if t.extra_names:
        raise NotImplementedError(
            f"{op} of a {type(t).__name__} in format {t.fmt.name}: its extra stored tensors {list(t.extra_names)} "
            f"have no row layout lrq_ao knows; select rows of the high-precision weight and quantize that instead"
        )


def transpose_refusal(t: QuantizedWeightTensor) -> str | None:
    """Why ``t`` cannot be transposed (``None`` if it can): packed codes share a byte along K, rotated codes are
    rotated along K; a transposed view of either would mean something else."""
    if t.fmt.element.packed:
        return f"format {t.fmt.name} packs {t.fmt.element.bits}-bit codes along K"
    if t.fmt.rotates:
        return f"format {t.fmt.name} stores codes rotated along K"
    return None


def transposed(t: QuantizedWeightTensor, op: str = "transpose") -> QuantizedWeightTensor:
    """``t.T``: data, scale grid and block size all transpose (a per-row layout becomes per-column). Raises
    ``NotImplementedError`` for a format whose codes cannot be transposed (``transpose_refusal``)."""
    reason = transpose_refusal(t)
    if reason is not None:
        raise NotImplementedError(
            f"{op} of a {type(t).__name__} of shape {tuple(t.shape)}: {reason}, so it cannot be transposed; use "
            f"F.linear(x, weight) (not x @ weight.T) or .dequantize()"
        )
    bn, bk = t.block_size
    return _rebuild(t, t.qdata.t(), t.scale.t(), (bk, bn))


# ---- transpose ---------------------------------------------------------------------------------------------


@implements([aten.t.default])
def _t(func, types, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, transposed(args[0], str(func)))


@implements([aten.transpose.int])
def _transpose(func, types, args, kwargs):
    t, dim0, dim1 = args[0], args[1], args[2]
    if {dim0 % 2, dim1 % 2} == {0}:
        return return_and_correct_aliasing(func, args, kwargs, t._apply_fn_to_data(lambda x: x))
    return return_and_correct_aliasing(func, args, kwargs, transposed(t, str(func)))


@implements([aten.permute.default])
def _permute(func, types, args, kwargs):
    t, dims = args[0], [d % 2 for d in args[1]]
    if dims == [0, 1]:
        return return_and_correct_aliasing(func, args, kwargs, t._apply_fn_to_data(lambda x: x))
    return return_and_correct_aliasing(func, args, kwargs, transposed(t, str(func)))


@implements([aten.as_strided.default])
def _as_strided(func, types, args, kwargs):
    """Only the views lrq_ao itself makes: identity, transpose, and whole-row ranges of either orientation. Sizes,
    strides and offsets are the wrapper's, in codes (``lrq_ao.layouts.base.logical_geometry``), so this holds for
    packed codes too; a transpose only where the format allows one."""
    t, size, stride = args[0], tuple(args[1]), tuple(args[2])
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset")
    offset = t.storage_offset() if offset is None else offset
    candidates = (t,) if transpose_refusal(t) is not None else (t, transposed(t))
    for candidate in candidates:
        row_stride = candidate.stride()
        if stride != tuple(row_stride) or size[1:] != tuple(candidate.shape[1:]):
            continue
        shift = offset - candidate.storage_offset()
        if shift % row_stride[0] == 0:
            start = shift // row_stride[0]
            if start == 0 and size[0] == candidate.shape[0]:
                return candidate
            _check_no_extra(t, "as_strided")
            scale, block_size = _rows_scale(candidate, start, start + size[0], "as_strided")
            return _rebuild(candidate, candidate.qdata[start : start + size[0]], scale, block_size)
    raise NotImplementedError(
        f"{func} to size {size}, stride {stride}, offset {offset}: {unsupported_op_message(func, args, kwargs)}"
    )


# ---- view / reshape: only the identity is meaningful for a blocked 2-D layout -------------------------------


@implements([aten.view.default, aten._unsafe_view.default, aten.reshape.default])
def _view(func, types, args, kwargs):
    t, size = args[0], list(args[1])
    if -1 in size:
        known = 1
        for s in size:
            if s != -1:
                known *= s
        size[size.index(-1)] = t.numel() // max(known, 1)
    if tuple(size) != tuple(t.shape):
        raise NotImplementedError(
            f"{func} to shape {tuple(args[1])}: {unsupported_op_message(func, args, kwargs)} (only a view to the "
            f"same 2-D shape keeps the scale grid meaningful)"
        )
    return return_and_correct_aliasing(func, args, kwargs, t._apply_fn_to_data(lambda x: x.view(x.shape)))


# ---- selecting rows (as weight loaders and tensor-parallel splits do) ---------------------------------------


def _rows_scale(t: QuantizedWeightTensor, start: int, end: int, op: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Scale grid and block size for rows ``[start, end)`` of ``t``."""
    n = t.shape[0]
    bn, bk = t.block_size
    if end <= start:
        raise ValueError(f"{op} of {type(t).__name__}: an empty row range [{start}, {end}) has no quantized layout")
    if bn == n:  # one scale row covers every output row (per-tensor, or a single block row)
        return t.scale, (end - start, bk)
    if start % bn or (end % bn and end != n):
        raise ValueError(
            f"{op} rows [{start}, {end}) of a {type(t).__name__} with layout {t.layout_name}: block-wise scales can "
            f"only be split on multiples of {bn} rows; choose block-aligned boundaries"
        )
    return t.scale[start // bn : -(-end // bn)], t.block_size


@implements([aten.slice.Tensor])
def _slice(func, types, args, kwargs):
    t = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    start = args[2] if len(args) > 2 else kwargs.get("start")
    end = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    n = t.shape[0]
    if dim % 2 != 0:
        raise NotImplementedError(
            f"{func} along the input dimension: {unsupported_op_message(func, args, kwargs)}; only slicing the "
            f"output dimension (dim 0) is supported"
        )
    if step != 1:
        raise NotImplementedError(f"{func} with step {step}: {unsupported_op_message(func, args, kwargs)}")
    start, end = _normalize_range(start, end, n)
    if (start, end) == (0, n):
        return return_and_correct_aliasing(func, args, kwargs, t._apply_fn_to_data(lambda x: x))
    _check_no_extra(t, "slice")
    scale, block_size = _rows_scale(t, start, end, "slice")
    return _rebuild(t, t.qdata[start:end], scale, block_size)


def _normalize_range(start, end, n: int) -> tuple[int, int]:
    start = 0 if start is None else start
    end = n if end is None else end
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    return max(0, min(start, n)), max(0, min(end, n))


@implements([aten.index_select.default])
def _index_select(func, types, args, kwargs):
    t, dim, index = args[0], args[1], args[2]
    if dim % 2 != 0:
        raise NotImplementedError(
            f"{func} along the input dimension: {unsupported_op_message(func, args, kwargs)}; only the output "
            f"dimension (dim 0) is supported"
        )
    _check_no_extra(t, "index_select")
    n = t.shape[0]
    bn, bk = t.block_size
    rows = t.qdata.index_select(0, index)
    if bn == 1:
        return _rebuild(t, rows, t.scale.index_select(0, index), t.block_size)
    if bn == n:
        return _rebuild(t, rows, t.scale, (index.numel(), bk))
    blocks = index.reshape(-1, bn) if index.numel() % bn == 0 else None
    offsets = torch.arange(bn, device=index.device)
    if blocks is None or bool((blocks[:, 0] % bn != 0).any()) or not torch.equal(blocks, blocks[:, :1] + offsets):
        raise ValueError(
            f"index_select on a {type(t).__name__} with layout {t.layout_name}: the index must pick whole blocks "
            f"of {bn} consecutive, block-aligned rows"
        )
    return _rebuild(t, rows, t.scale.index_select(0, blocks[:, 0] // bn), t.block_size)


def _row_sizes(split, n: int) -> list[int]:
    if isinstance(split, int):
        return [min(split, n - start) for start in range(0, n, split)]
    return list(split)


@implements([aten.split.Tensor, aten.split_with_sizes.default])
def _split(func, types, args, kwargs):
    """Split along the output dimension (a fused QKV into Q, K, V); each piece keeps its rows' scales."""
    t = args[0]
    split = args[1] if len(args) > 1 else kwargs.get("split_size", kwargs.get("split_sizes"))
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    if dim % 2 != 0:
        raise NotImplementedError(
            f"{func} along the input dimension: {unsupported_op_message(func, args, kwargs)}; only the output "
            f"dimension (dim 0) is supported"
        )
    _check_no_extra(t, "split")
    pieces, start = [], 0
    for size in _row_sizes(split, t.shape[0]):
        scale, block_size = _rows_scale(t, start, start + size, "split")
        pieces.append(_rebuild(t, t.qdata[start : start + size], scale, block_size))
        start += size
    return pieces


@implements([aten.cat.default])
def _cat(func, types, args, kwargs):
    """Concatenate along the output dimension (fusing Q, K, V). Parts must share class, format, block size, dtype,
    activation mode, kernel and ``scale2``: scales are never merged or requantized."""
    parts = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    first = parts[0]
    if dim % 2 != 0 or not all(isinstance(p, QuantizedWeightTensor) for p in parts):
        raise NotImplementedError(
            f"{func}: {unsupported_op_message(func, args, kwargs)}; only quantized weights along dim 0 concatenate"
        )
    meta = {(type(p), p.fmt, p.block_size, p.shape[1], p.dtype, p.act, p.kernel) for p in parts}
    if len(meta) != 1:
        raise ValueError(
            f"cat of quantized weights needs one class, block size, format, K, dtype, activation mode and kernel; "
            f"got {sorted(str(m) for m in meta)}. Requantize the fused weight with from_hp() instead"
        )
    _check_no_extra(first, "cat")
    if not _same_scale2(parts):
        raise ValueError(
            f"cat of quantized weights of format {first.fmt.name} needs one second-level scale (scale2) for all "
            f"parts; requantize the fused weight instead"
        )
    return _rebuild(first, torch.cat([p.qdata for p in parts]), torch.cat([p.scale for p in parts]), first.block_size)


# ---- copies, device moves and dtype changes -----------------------------------------------------------------


def _same_scale2(parts: list[QuantizedWeightTensor]) -> bool:
    first = parts[0].scale2
    if first is None:
        return all(p.scale2 is None for p in parts)
    return all(p.scale2 is not None and torch.equal(p.scale2, first) for p in parts)


def _same_layout(a: QuantizedWeightTensor, b: QuantizedWeightTensor) -> bool:
    return (
        type(a) is type(b)
        and a.fmt == b.fmt
        and (a.scale2 is None) == (b.scale2 is None)
        and a.extra_names == b.extra_names
        and all(x.shape == y.shape for x, y in zip(a.extra.values(), b.extra.values()))
        and a.shape == b.shape
        and a.block_size == b.block_size
        and a.scale.shape == b.scale.shape
        and a.dtype == b.dtype
    )


@implements([aten.copy_.default])
def _copy_(func, types, args, kwargs):
    dst, src = args[0], args[1]
    if isinstance(dst, QuantizedWeightTensor) and isinstance(src, QuantizedWeightTensor):
        if not _same_layout(dst, src):
            raise ValueError(
                f"copy_ into a {type(dst).__name__} ({dst.layout_name}, {tuple(dst.shape)}, {dst.dtype}) from a "
                f"{type(src).__name__} ({src.layout_name}, {tuple(src.shape)}, {src.dtype}): layouts differ; "
                f"load with load_state_dict(..., assign=True) to replace the tensor instead"
            )
        dst.qdata.copy_(src.qdata)
        dst.scale.copy_(src.scale)
        if dst.scale2 is not None:
            dst.scale2.copy_(src.scale2)
        for key, value in dst.extra.items():
            value.copy_(src.extra[key])
        dst.act, dst.kernel = src.act, src.kernel
        return dst
    if isinstance(src, QuantizedWeightTensor):  # plain destination: write the dequantized values
        dst.copy_(src.dequantize(dst.dtype if dst.is_floating_point() else torch.float32))
        return dst
    raise ValueError(
        f"copy_ of a plain {src.dtype} tensor into a {type(dst).__name__}: lrq_ao does not requantize silently; "
        f"build the quantized tensor with from_hp() or lrq_ao.quantize_(), or load with assign=True"
    )


def _moved(t: QuantizedWeightTensor, device, dtype, non_blocking: bool) -> QuantizedWeightTensor:
    check_high_precision_dtype(dtype, f"{type(t).__name__}.to({dtype})")
    qdata = t.qdata.to(device, non_blocking=non_blocking)
    scale = t.scale.to(device, non_blocking=non_blocking)
    scale2 = None if t.scale2 is None else t.scale2.to(device, non_blocking=non_blocking)
    extra = {key: value.to(device, non_blocking=non_blocking) for key, value in t.extra.items()}
    return _rebuild(t, qdata, scale, t.block_size, dtype, scale2, extra)


@implements([aten._to_copy.default])
def _to_copy(func, types, args, kwargs):
    t = args[0]
    to = t._get_to_kwargs(*args[1:], **kwargs)
    return _moved(t, to["device"], to["dtype"], to["non_blocking"])


@implements([aten.to.dtype_layout, aten.to.device, aten.to.dtype])
def _to(func, types, args, kwargs):
    t = args[0]
    to = t._get_to_kwargs(*args[1:], **kwargs)
    if to["device"] == t.device and to["dtype"] == t.dtype:
        return t
    return _moved(t, to["device"], to["dtype"], to["non_blocking"])


@implements([aten._pin_memory.default])
def _pin_memory(func, types, args, kwargs):
    return args[0]._apply_fn_to_data(lambda x: x.pin_memory())


@implements([aten.is_pinned.default])
def _is_pinned(func, types, args, kwargs):
    t = args[0]
    inner = [t.qdata, t.scale, *t.extra.values()] + ([] if t.scale2 is None else [t.scale2])
    return all(x.is_pinned() for x in inner)
