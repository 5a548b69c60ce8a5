"""Weight-only linear on packed 4-bit codes: bf16 / fp16 activations times a weight stored two codes a byte.

``y = x @ W.T + bias`` with ``W[n, k] = value(code[n, k]) * scale[n, k // G] * scale2``: ``value`` is a 16-entry
table of the nibble, ``G`` the group along K (``G = K``: one scale per row), ``scale2`` an optional global scalar.
The formats this serves (``lrq_ao.formats.nvfp4``: E2M1 codes, even column in the high nibble, ``G = 16``, fp8
group scales held as float32, a float32 global; ``lrq_ao.formats.convrot_w4a4``: two's-complement INT4, even column
in the low nibble, per row) reach it through ``lrq_ao.layouts.packed_backends``, which passes the element's
``nibble_values`` and ``even_code_high``; this module never asks which format it runs.

Decoding is arithmetic, not a table lookup: ``decoder_for`` maps a value table onto one of the decoders below and
refuses any other table. Both give exact float32 values with integer and bit operations only (no int -> float
conversion, which Hopper issues at a fraction of the float rate):

* ``DECODE_INT4``, two's complement: ``code ^ 8`` is ``value + 8``; placed in the low mantissa bits of
  ``1.5 * 2**23`` (float32 bits ``0x4B400000``) it is the float ``1.5 * 2**23 + value + 8``, and one subtraction
  leaves ``value``.
* ``DECODE_E2M1`` (OCP MX spec, FP4 E2M1: 1 sign, 2 exponent bits with bias 1, 1 mantissa bit, exponent 0
  subnormal): the code's bits moved into fp16's sign, lowest exponent bits and top mantissa bit form an fp16 whose
  value is ``e2m1 * 2**-14`` (E2M1's subnormals land on fp16 subnormals, which the GPU keeps); one multiply by
  ``2**14`` scales it back.

Regimes, chosen here on the concrete M (backend selection never looks at the batch size):

* ``M == 1``: ``_packed_wo_kernel`` with ``BLOCK_M = 1``, a GEMV: float32 products of the decoded, scaled weight
  and ``x``, summed over K with ``tl.sum`` (no MMA, which would waste 15 of its 16 rows).
* ``M <= SMALL_M_MAX`` (16): the same kernel with ``BLOCK_M = 16``: operands swapped (``y.T = W @ x.T``) so the
  weight is the wide MMA operand, the even and the odd columns of each byte two ``tl.dot`` calls against the even
  and odd rows of ``x.T`` (no interleaving shuffle). The decoded value times its group scale is rounded to
  ``x.dtype`` for the MMA; for NVFP4 that product (2 significant bits times an fp8 value's 4) is exact in bf16 and
  fp16, INT4 codes are exact and their per-row scale multiplies the float32 sums in the epilogue.
  Both variants split K into ``SPLIT_K`` ranges (deterministic reduction through a float32 workspace and per-tile
  arrival counters, as ``lrq_ao.kernels.weight_only_gemm``'s small-M kernel).
* ``M > SMALL_M_MAX``: ``_packed_dequantize_kernel`` writes the weight in ``x.dtype`` once (float32 arithmetic, one
  rounding) and cuBLAS runs the GEMM; at large M decoding inside every output tile would cost more than that pass.

Group scales: ``G`` even and dividing ``MAX_GROUP`` (64), so a K tile holds whole groups and a byte never straddles
two; the scale tile ``(BLOCK_N, BLOCK_K / G)`` is broadcast over a ``(BLOCK_N, BLOCK_K / G, G / 2)`` byte tile.
Any float dtype of scale is read and widened to float32 (the formats store float32; fp8 storage would read 4x
fewer scale bytes, see ``benchmarks/bench_packed.py``). Ragged N and K (K even, a multiple of G) are masked.

Op: ``lrq_ao::packed_weight_only_linear(x, qdata, scale, scale2, group, nibble_values, even_high, bias)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lrq_ao.kernels._gemm_common import autotune_bench
from lrq_ao.kernels._runtime import check_contiguous_last, check_device, launchable, m_bucket
from lrq_ao.kernels.weight_only_gemm import (
    MAX_PROGRAMS,
    MAX_SPLIT_K,
    MAX_TILE_COUNTERS,
    MIN_PROGRAMS,
    tile_counters,
)

OP_NAME = "lrq_ao::packed_weight_only_linear"
SMALL_M_MAX = 16
MAX_GROUP = 64  # the smallest BLOCK_K of the GPU configurations; a group must divide it (or be the whole row)

DECODE_INT4, DECODE_E2M1 = 0, 1
# The nibble -> value table each decoder implements (nibble = the 4 stored bits, 0..15).
DECODER_VALUES: dict[int, tuple[float, ...]] = {
    DECODE_INT4: tuple(float(v) for v in (*range(8), *range(-8, 0))),
    DECODE_E2M1: (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0),
}


def decoder_for(nibble_values) -> int | None:
    """The decoder whose table equals ``nibble_values`` (16 floats; ``-0.0 == 0.0``), or ``None``."""
    values = tuple(float(v) for v in nibble_values)
    for decoder, table in DECODER_VALUES.items():
        if values == table:
            return decoder
    return None


def group_refusal(group: int, k: int) -> str | None:
    """Why a ``(1, group)`` scale grid along K cannot be read by these kernels (``None`` if it can)."""
    if group == k:
        return None
    if group < 2 or group % 2 or MAX_GROUP % group or k % group:
        return f"group {group} along K={k} must be the whole row or an even divisor of {MAX_GROUP} dividing K"
    return None


# ---- decoding --------------------------------------------------------------------------------------------------


@triton.jit
def _decode_nibbles(codes, DECODE: tl.constexpr):
    """float32 value of each 4-bit code (int32 in 0..15); see the module docstring for both decoders."""
    if DECODE == 0:
        values = ((codes ^ 8) | 0x4B400000).to(tl.float32, bitcast=True) - 12582920.0
    else:
        half_bits = ((codes & 8) << 12) | ((codes & 7) << 9)
        values = half_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0
    return values


@triton.jit
def _decode_bytes(packed, DECODE: tl.constexpr, EVEN_HIGH: tl.constexpr):
    """float32 values of the even and the odd column held by each byte of ``packed`` (int8 or uint8)."""
    byte = packed.to(tl.int32) & 0xFF
    high = _decode_nibbles(byte >> 4, DECODE)
    low = _decode_nibbles(byte & 0xF, DECODE)
    if EVEN_HIGH:
        even, odd = high, low
    else:
        even, odd = low, high
    return even, odd


@triton.jit
def _to(values, dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """float32 ``values`` rounded to nearest-even ``dtype``. ``BF16_BY_BITS``: round to bfloat16 on the float32 bits
    first (Triton's interpreter truncates float32 -> bfloat16 casts; the GPU rounds), so CPU tests see the GPU's
    numbers."""
    if BF16_BY_BITS:
        bits = values.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        values = bits.to(tl.float32, bitcast=True)
    return values.to(dtype)


@triton.jit
def _store_rows(c_ptr, bias_ptr, acc, offs_n, offs_m, safe_n, mask, stride_cm, HAS_BIAS: tl.constexpr, BF16_BY_BITS):
    """Store the (BLOCK_N, BLOCK_M) accumulator, plus bias, as rows ``offs_m`` of ``c`` (the product's transpose)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_n).to(tl.float32)[:, None]
    c_ptrs = c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    tl.store(c_ptrs, _to(acc, c_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)


@triton.jit
def _weight_pairs(
    w_ptr,
    s_ptr,
    rows,
    k0,
    K,
    stride_wn,
    stride_sn,
    DECODE: tl.constexpr,
    EVEN_HIGH: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The even and the odd columns of the weight tile ``rows x [k0, k0 + BLOCK_K)`` as two float32
    ``(BLOCK_N, BLOCK_K / 2)`` tiles, each code decoded and, for ``GROUP > 0``, multiplied by its group scale
    (a per-row scale, ``GROUP == 0``, is left to the caller). Columns at or beyond K read as 0."""
    HALF: tl.constexpr = BLOCK_K // 2
    row_ptrs = w_ptr + rows.to(tl.int64) * stride_wn + k0 // 2
    if GROUP > 0:
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        BYTES: tl.constexpr = GROUP // 2
        group_ids = tl.arange(0, GROUPS)
        j = group_ids[:, None] * BYTES + tl.arange(0, BYTES)[None, :]  # byte of the tile, (GROUPS, BYTES)
        mask = (j < (K - k0) // 2)[None, :, :]
        packed = tl.load(row_ptrs[:, None, None] + j[None, :, :], mask=mask, other=0)
        s_ptrs = s_ptr + rows[:, None].to(tl.int64) * stride_sn + k0 // GROUP + group_ids[None, :]
        scale = tl.load(s_ptrs, mask=(group_ids < (K - k0) // GROUP)[None, :], other=0.0).to(tl.float32)
        even, odd = _decode_bytes(packed, DECODE, EVEN_HIGH)
        even = tl.reshape(even * scale[:, :, None], (BLOCK_N, HALF))
        odd = tl.reshape(odd * scale[:, :, None], (BLOCK_N, HALF))
    else:
        j = tl.arange(0, HALF)
        packed = tl.load(row_ptrs[:, None] + j[None, :], mask=(j < (K - k0) // 2)[None, :], other=0)
        even, odd = _decode_bytes(packed, DECODE, EVEN_HIGH)
    return even, odd


# ---- M <= 16: split-K GEMV (M = 1) / MMA on swapped operands ------------------------------------------------------


def small_m_config(block_n: int, block_k: int, split_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k}, num_warps=warps, num_stages=stages
    )


def _configs(shapes) -> list[triton.Config]:
    return [small_m_config(n, k, split, w, s) for n, k, w, s in shapes for split in (1, 2, 4, 8)]


# BLOCK_K counts codes (a row of the tile is BLOCK_K / 2 bytes); every BLOCK_K is a multiple of MAX_GROUP.
MMA_CONFIGS = _configs([(32, 256, 4, 4), (32, 512, 4, 4), (64, 256, 4, 4), (64, 512, 4, 3), (128, 256, 8, 3)])
GEMV_CONFIGS = _configs([(16, 512, 4, 4), (32, 256, 4, 4), (32, 512, 4, 4), (32, 1024, 4, 3), (64, 512, 8, 3)])


def _prune(configs, named_args, **kwargs):
    """Keep the launches that fill the GPU without starving each split of K steps (as the INT8 small-M kernel)."""
    n, k = named_args["N"], named_args["K"]

    def programs(c):
        return triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"]

    def fits(c):
        block_k, split_k = c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        too_many_tiles = triton.cdiv(n, c.kwargs["BLOCK_N"]) > MAX_TILE_COUNTERS
        return split_k == 1 or not (too_many_tiles or k < 2 * split_k * block_k)

    usable = [c for c in configs if fits(c)]
    kept = [c for c in usable if MIN_PROGRAMS <= programs(c) <= MAX_PROGRAMS]
    return kept or [max(usable, key=programs)]


# M is not specialized: M == 1 would otherwise compile a separate kernel for no gain (BLOCK_M says GEMV or MMA).
@triton.jit(do_not_specialize=["M"])
def _packed_wo_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    s2_ptr,
    bias_ptr,
    c_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_cm,
    stride_sn,
    M_BUCKET,
    SPLIT_K,
    DECODE: tl.constexpr,
    EVEN_HIGH: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_SCALE2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_F32: tl.constexpr = False,
    BF16_BY_BITS: tl.constexpr = False,
):
    """``c.T[n-tile] = sum over this program's K range of W[n-tile] @ x.T``, scaled; ``M <= BLOCK_M`` (1 or 16).

    Program (pid_n, pid_k) streams a ``BLOCK_N x (K / SPLIT_K)`` slab of the packed weight exactly once.
    """
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, HALF)
    safe_n = offs_n % N
    m_valid = offs_m < M
    steps_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * steps_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + steps_per_split * BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, tl.cdiv(k_end - k_begin, BLOCK_K)):
        k0 = k_begin + step * BLOCK_K
        even, odd = _weight_pairs(
            w_ptr, s_ptr, safe_n, k0, K, stride_wn, stride_sn, DECODE, EVEN_HIGH, GROUP, BLOCK_N, BLOCK_K
        )
        k_even = k0 + 2 * offs_j
        j_mask = offs_j < (K - k0) // 2
        if BLOCK_M == 1:
            x_even = tl.load(x_ptr + k_even, mask=j_mask, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + k_even + 1, mask=j_mask, other=0.0).to(tl.float32)
            acc += tl.sum(even * x_even[None, :] + odd * x_odd[None, :], axis=1)[:, None]
        else:
            # Rows of x beyond M are masked, not re-read.
            xt_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + k_even[:, None]
            x_mask = j_mask[:, None] & m_valid[None, :]
            x_even = tl.load(xt_ptrs, mask=x_mask, other=0.0)
            x_odd = tl.load(xt_ptrs + 1, mask=x_mask, other=0.0)
            even = _to(even, x_even.dtype, BF16_BY_BITS)
            odd = _to(odd, x_odd.dtype, BF16_BY_BITS)
            if DOT_IN_F32:
                # Triton's interpreter mis-multiplies bfloat16 operands; the (rounded) values are exact in float32.
                acc = tl.dot(even.to(tl.float32), x_even.to(tl.float32), acc)
                acc = tl.dot(odd.to(tl.float32), x_odd.to(tl.float32), acc)
            else:
                acc = tl.dot(even, x_even, acc)
                acc = tl.dot(odd, x_odd, acc)
    if GROUP == 0:
        acc *= tl.load(s_ptr + safe_n * stride_sn).to(tl.float32)[:, None]
    if HAS_SCALE2:
        acc *= tl.load(s2_ptr).to(tl.float32)
    mask = (offs_n < N)[:, None] & m_valid[None, :]
    if SPLIT_K == 1:
        _store_rows(c_ptr, bias_ptr, acc, offs_n, offs_m, safe_n, mask, stride_cm, HAS_BIAS, BF16_BY_BITS)
    else:
        # partial[split, m, n]; the last split of each column tile to arrive adds them in split order.
        p_ptrs = partial_ptr + (pid_k * M + offs_m[None, :]).to(tl.int64) * N + offs_n[:, None]
        tl.store(p_ptrs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter's release publishes it
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for split in range(0, SPLIT_K):
                p_ptrs = partial_ptr + (split * M + offs_m[None, :]).to(tl.int64) * N + offs_n[:, None]
                total += tl.load(p_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            _store_rows(c_ptr, bias_ptr, total, offs_n, offs_m, safe_n, mask, stride_cm, HAS_BIAS, BF16_BY_BITS)
            tl.store(counter_ptr + pid_n, 0)


_AUTOTUNE_KEY = ["N", "K", "M_BUCKET", "DECODE", "EVEN_HIGH", "GROUP", "HAS_SCALE2", "HAS_BIAS", "BLOCK_M"]
_mma_tuned = triton.autotune(
    configs=MMA_CONFIGS, key=_AUTOTUNE_KEY, do_bench=autotune_bench, prune_configs_by={"early_config_prune": _prune}
)(_packed_wo_kernel)
_gemv_tuned = triton.autotune(
    configs=GEMV_CONFIGS, key=_AUTOTUNE_KEY, do_bench=autotune_bench, prune_configs_by={"early_config_prune": _prune}
)(_packed_wo_kernel)


def cpu_config(k: int) -> dict[str, int]:
    """The interpreter's configuration: the narrowest tile and up to 3 (uneven) K ranges, so CPU tests cover the
    split reduction."""
    return {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": max(1, min(3, triton.cdiv(k, 32)))}


def _meta(qdata, scale2, group: int, nibble_values, even_high: bool, bias) -> dict:
    k = 2 * qdata.shape[1]
    decoder = decoder_for(nibble_values)
    if decoder is None:
        raise ValueError(f"{OP_NAME}: no decoder for the nibble table {tuple(nibble_values)}; known: {DECODER_VALUES}")
    return {
        "DECODE": decoder,
        "EVEN_HIGH": bool(even_high),
        "GROUP": 0 if group == k else group,
        "HAS_SCALE2": scale2 is not None,
        "HAS_BIAS": bias is not None,
    }


def small_m_packed_linear(
    x, qdata, scale, scale2, group, nibble_values, even_high, bias, out, config=None, gemv: bool | None = None
):
    """Launch ``_packed_wo_kernel`` into ``out`` (M <= 16) and return it.

    ``gemv`` (default: ``M == 1``) takes the ``BLOCK_M = 1`` reduction instead of the MMA. On CUDA the
    configuration is autotuned unless ``config`` (``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K``, optionally ``num_warps``
    / ``num_stages``) fixes it; on CPU (interpreter) ``config`` defaults to ``cpu_config``.
    """
    m, k = x.shape
    n = qdata.shape[0]
    device = x.device
    gemv = m == 1 if gemv is None else gemv
    if gemv and m != 1:
        raise ValueError(f"{OP_NAME}: the GEMV kernel takes one row, got M={m}")
    meta = _meta(qdata, scale2, group, nibble_values, even_high, bias)
    meta["BLOCK_M"] = 1 if gemv else 16
    args = (x, qdata, scale, scale2 if scale2 is not None else scale, bias if bias is not None else out, out)
    sizes = (m, n, k, x.stride(0), qdata.stride(0), out.stride(0), scale.stride(0), m_bucket(m))
    counters = tile_counters(device)
    if device.type == "cuda" and config is None:
        partial = torch.empty((MAX_SPLIT_K, m, n), dtype=torch.float32, device=device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        (_gemv_tuned if gemv else _mma_tuned)[grid](*args, partial, counters, *sizes, **meta)
        return out
    config = dict(config or cpu_config(k))
    split_k = config.pop("SPLIT_K")
    if split_k > 1 and triton.cdiv(n, config["BLOCK_N"]) > MAX_TILE_COUNTERS:
        raise ValueError(f"{OP_NAME}: N={n} has more column tiles than {MAX_TILE_COUNTERS} split counters")
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=device)
    grid = (triton.cdiv(n, config["BLOCK_N"]), split_k)
    launchable(_packed_wo_kernel, device)[grid](
        *args, partial, counters, *sizes, split_k, **meta, **config, **_interpreter_flags(device, out.dtype)
    )
    return out


def _interpreter_flags(device: torch.device, dtype: torch.dtype) -> dict[str, bool]:
    on_cpu = device.type == "cpu"
    return {"DOT_IN_F32": on_cpu, "BF16_BY_BITS": on_cpu and dtype == torch.bfloat16}


# ---- M > 16: dequantize once, then cuBLAS ------------------------------------------------------------------------


@triton.jit
def _packed_dequantize_kernel(
    w_ptr,
    s_ptr,
    s2_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    stride_on,
    stride_sn,
    DECODE: tl.constexpr,
    EVEN_HIGH: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_SCALE2: tl.constexpr,
    TILE_N: tl.constexpr,
    TILE_K: tl.constexpr,
    BF16_BY_BITS: tl.constexpr = False,
):
    """``out[n, k] = value(code) * scale * scale2`` in float32, rounded once to ``out``'s dtype."""
    rows = tl.program_id(0) * TILE_N + tl.arange(0, TILE_N)
    k0 = tl.program_id(1) * TILE_K
    safe_rows = rows % N
    even, odd = _weight_pairs(
        w_ptr, s_ptr, safe_rows, k0, K, stride_wn, stride_sn, DECODE, EVEN_HIGH, GROUP, TILE_N, TILE_K
    )
    if GROUP == 0:
        row_scale = tl.load(s_ptr + safe_rows * stride_sn).to(tl.float32)[:, None]
        even *= row_scale
        odd *= row_scale
    if HAS_SCALE2:
        scale2 = tl.load(s2_ptr).to(tl.float32)
        even *= scale2
        odd *= scale2
    values = tl.reshape(tl.join(even, odd), (TILE_N, TILE_K))  # columns 2j, 2j + 1 side by side
    offs_k = k0 + tl.arange(0, TILE_K)
    mask = (rows < N)[:, None] & (offs_k < K)[None, :]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_on + offs_k[None, :]
    tl.store(out_ptrs, _to(values, out_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)


def dequantize_packed(qdata, scale, scale2, group, nibble_values, even_high, dtype: torch.dtype) -> torch.Tensor:
    """The ``(N, K)`` weight in ``dtype`` in one pass (K / 2 bytes read per row, 2 K or 4 K written)."""
    n, kb = qdata.shape
    device = check_device(f"{OP_NAME} (dequantization)", qdata, scale)
    meta = _meta(qdata, scale2, group, nibble_values, even_high, None)
    del meta["HAS_BIAS"]
    out = torch.empty((n, 2 * kb), dtype=dtype, device=device)
    tile_n, tile_k = (16, 64) if device.type == "cpu" else (32, 256)
    grid = (triton.cdiv(n, tile_n), triton.cdiv(2 * kb, tile_k))
    launchable(_packed_dequantize_kernel, device)[grid](
        qdata,
        scale,
        scale2 if scale2 is not None else scale,
        out,
        n,
        2 * kb,
        qdata.stride(0),
        out.stride(0),
        scale.stride(0),
        **meta,
        TILE_N=tile_n,
        TILE_K=tile_k,
        BF16_BY_BITS=device.type == "cpu" and dtype == torch.bfloat16,
    )
    return out


# ---- the launcher and the op -------------------------------------------------------------------------------------


def _check(x, qdata, scale, scale2, group, nibble_values, bias) -> None:
    check_contiguous_last(OP_NAME, "x", x)
    check_contiguous_last(OP_NAME, "qdata", qdata)
    check_device(OP_NAME, *(t for t in (x, qdata, scale, scale2, bias) if t is not None))
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{OP_NAME}: x must be bfloat16 or float16 for the tensor cores, got {x.dtype}")
    if qdata.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"{OP_NAME}: qdata must hold packed 4-bit codes as uint8 or int8, got {qdata.dtype}")
    m, k = x.shape
    n, kb = qdata.shape
    if k != 2 * kb:
        raise ValueError(f"{OP_NAME}: x has K={k} but qdata holds {2 * kb} codes per row (two a byte)")
    if len(nibble_values) != 16 or decoder_for(nibble_values) is None:
        raise ValueError(f"{OP_NAME}: nibble_values {tuple(nibble_values)} is not a table these kernels decode")
    reason = group_refusal(group, k)
    if reason is not None:
        raise ValueError(f"{OP_NAME}: {reason}")
    if not scale.dtype.is_floating_point or tuple(scale.shape) != (n, k // group):
        raise ValueError(f"{OP_NAME}: scale must be a float grid {(n, k // group)}, got {scale.dtype} {scale.shape}")
    if scale2 is not None and scale2.numel() != 1:
        raise ValueError(f"{OP_NAME}: scale2 must be a scalar, got shape {tuple(scale2.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{OP_NAME}: bias must have shape ({n},), got {tuple(bias.shape)}")


def packed_weight_only_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    scale2: torch.Tensor | None,
    group: int,
    nibble_values,
    even_high: bool,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x (M, K) @ W.T + bias`` in ``x.dtype`` (bfloat16 or float16) for packed 4-bit ``qdata (N, K / 2)``.

    ``W[n, k] = nibble_values[code] * scale[n, k // group] * scale2``; ``even_high``: column ``2j`` is the high
    nibble of byte ``j``. Raises ``ValueError`` naming the tensor for a dtype, shape or table the kernels refuse.
    """
    _check(x, qdata, scale, scale2, group, nibble_values, bias)
    m = x.shape[0]
    if m > SMALL_M_MAX:
        # Compute-bound: one dequantization pass, then cuBLAS. Decided here on the concrete M.
        w = dequantize_packed(qdata, scale, scale2, group, nibble_values, even_high, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    out = torch.empty((m, qdata.shape[0]), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    return small_m_packed_linear(x, qdata, scale, scale2, group, nibble_values, even_high, bias, out)


@torch.library.custom_op(OP_NAME, mutates_args=())
def packed_weight_only_linear_op(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    scale2: torch.Tensor | None,
    group: int,
    nibble_values: list[float],
    even_high: bool,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Triton weight-only linear on packed 4-bit codes decoded in registers; see the module docstring."""
    return packed_weight_only_linear(x, qdata, scale, scale2, group, nibble_values, even_high, bias)


@packed_weight_only_linear_op.register_fake
def _(x, qdata, scale, scale2, group, nibble_values, even_high, bias):
    return x.new_empty((x.shape[0], qdata.shape[0]))
