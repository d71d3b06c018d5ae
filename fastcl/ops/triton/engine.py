"""Triton kernels of the engine, and their launchers (no autograd here).

One forward kernel and two backward kernels serve every loss; the loss is chosen by compile-time
flags (KIND, SYMMETRIC, LABELS, EXCLUDE_SELF, HAS_POS, HAS_CPOS, HAS_BIAS, TARGET_K, ...). The
contract they implement (statistics, targets, gradients) is documented in :mod:`fastcl.ops`.

Numerics: tiles of S = s * Q K^T + b are accumulated in float32 (tensor cores for fp16/bf16, TF32
for fp32 unless ``spec.exact``); all statistics are float32. The symmetric column LSE is merged from
per-row-block partial LSEs (exact at any scale: no fixed offset that could underflow at small tau);
the partial buffer holds at most ``max(32 MiB, bytes of the inputs)`` and row blocks are launched in
groups that fit in it. All index arithmetic on tensors is 64-bit.
"""
# (no ``from __future__ import annotations`` here: Triton 3.0's interpreter recognises constexpr
# parameters only by an annotation that is the ``tl.constexpr`` object, not its string)
import os
import warnings
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .. import (EngineStats, centred_scale_sums, closure_weights, compiling, correct_line_totals,
                dense_ids, measures_line_sums, merge_lse)

try:
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # this Triton has no host-side tensor descriptors
    _TensorDescriptor = None

SPLIT_TARGET_GRADS = True  # accepts grad_row_pos / grad_col_pos and the spec extensions
GRAM = True  # with spec.gram, backward returns the whole gradient of the shared features as dq

# Block pointers lower to efficient loads on every Triton >= 3.0 and every arch >= sm_80; newer
# Triton releases prefer TMA descriptors (Hopper-only) and warn about them at compile time.
warnings.filterwarnings("ignore", message=r"tl\.make_block_ptr is deprecated")

KIND_SOFTMAX = 0
KIND_SIGMOID = 1
# the symmetric forward's per-row-block column partials: the bytes a launch group may hold, at
# least this much, else about the inputs' size (None: that rule; tests set a small budget)
_PARTIAL_BYTES_MIN = 32 << 20
_PARTIAL_BYTES = None
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
LN_075 = tl.constexpr(-0.2876820724517809)  # log(3/4)
# Interior tiles take the one-exponential column statistics while every column keeps a sum of
# 2^(x_ij - tile max) above this; below it (a column ~55 nats under the tile's largest logit) the
# tile is recomputed with per-column maxima, so nothing underflows at any temperature.
_COLSUM_FLOOR = tl.constexpr(2.0 ** -80)
# Backward: P^col_ij = P_ij * 2^(r_i - c_j) is used when the row and column LSEs of a tile lie
# within this many powers of two of each other (else the second exponential is computed).
_LSE_SPREAD = tl.constexpr(60.0)
_MERGE_BLOCK = 256

# Tests and benchmarks may pin block sizes here (e.g. to force several D chunks at small D), for
# every pass ("BLOCK_N": 32) or one pass ("fwd_plain.num_warps": 4; passes as in config_for; the
# interior forward's and the fused backward's RESIDENT: True keeps a program's own feature block
# loaded when D <= 256; the forward passes' TMA: True streams their D chunks through tensor
# descriptors on Hopper, where Triton has them; the interior forward's COLSUM_MMA: the symmetric
# column sums on the tensor cores), and choose paths: "DENSE" (the wide-feature
# backward on or off), "PLAIN" (False: every tile takes the general, masked path), "SPLIT" (the
# backward's interior tiles in launches of their own: the fused kernels', and the wide-feature
# backward's dS tiles), "DENSE_ROWS" (False: a self-similarity's wide-feature dS block without
# its transposed half, and dK's slab sums beside it; see _backward_dense), "STEP" (False: the
# sigmoid closure's forward and backward sweeps instead of its step; see takes_step).
config_override: dict = {}
POLICY_KEYS = ("DENSE", "PLAIN", "SPLIT", "DENSE_ROWS", "STEP")
PASSES = ("fwd", "fwd_plain", "bwd", "bwd_rows_plain", "bwd_cols_plain", "bwd_gram", "dense_plain")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "num_warps", "num_stages", "RESIDENT",
               "TMA", "COLSUM_MMA")


# ----------------------------------------------------------------------------------------------
# shared device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _similarity_tile(q_ptr, k_ptr, row0, col0, N, M, D, stride_qn, stride_qd, stride_kn, stride_kd,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """c = Q[row0:row0+BLOCK_M] . K[col0:col0+BLOCK_N]^T as a float32 tile, accumulated over D
    chunks (block pointers: 64-bit strides, zero padding outside the matrices). TMA: q_ptr and
    k_ptr are tensor descriptors of Q (N, D) and K (M, D) with blocks (BLOCK_M, BLOCK_D) and
    (BLOCK_N, BLOCK_D), loaded by the copy engine (zero padding outside the matrices too)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        for d0 in range(0, D, BLOCK_D):
            q = q_ptr.load([row0, d0])
            k = k_ptr.load([col0, d0])
            acc = tl.dot(_operand(q, UPCAST), _operand(tl.trans(k), UPCAST), acc,
                         input_precision=PRECISION)
    else:
        q_blk = tl.make_block_ptr(q_ptr, shape=(N, D), strides=(stride_qn, stride_qd),
                                  offsets=(row0, 0), block_shape=(BLOCK_M, BLOCK_D), order=(1, 0))
        k_blk = tl.make_block_ptr(k_ptr, shape=(D, M), strides=(stride_kd, stride_kn),
                                  offsets=(0, col0), block_shape=(BLOCK_D, BLOCK_N), order=(0, 1))
        for _ in range(0, D, BLOCK_D):
            q = tl.load(q_blk, boundary_check=(0, 1), padding_option="zero")
            k = tl.load(k_blk, boundary_check=(0, 1), padding_option="zero")
            acc = tl.dot(_operand(q, UPCAST), _operand(k, UPCAST), acc, input_precision=PRECISION)
            q_blk = tl.advance(q_blk, (0, BLOCK_D))
            k_blk = tl.advance(k_blk, (BLOCK_D, 0))
    return acc


@triton.jit
def _feature_block(x_ptr, r0, n, D, stride_n, stride_d, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """X[r0:r0+BLOCK, :D] zero-padded to (BLOCK, BLOCK_D >= D): a block of features loaded whole."""
    blk = tl.make_block_ptr(x_ptr, shape=(n, D), strides=(stride_n, stride_d), offsets=(r0, 0),
                            block_shape=(BLOCK, BLOCK_D), order=(1, 0))
    return tl.load(blk, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def _resident_tile(q, k_ptr, col0, M, D, stride_kn, stride_kd, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """c = q . K[col0:col0+BLOCK_N]^T for a resident query block q (BLOCK_D >= D): one product,
    so the key tiles of successive columns are what the compiler pipelines."""
    k_blk = tl.make_block_ptr(k_ptr, shape=(D, M), strides=(stride_kd, stride_kn), offsets=(0, col0),
                              block_shape=(BLOCK_D, BLOCK_N), order=(0, 1))
    k = tl.load(k_blk, boundary_check=(0, 1), padding_option="zero")
    return tl.dot(_operand(q, UPCAST), _operand(k, UPCAST), input_precision=PRECISION)


@triton.jit
def _scale_bias(scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """The scale s and bias b (0 without one) as float32 scalars, read on the device."""
    s = tl.load(scale_ptr).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr).to(tl.float32)
    else:
        b = 0.0
    return s, b


@triton.jit
def _centres(lse, s, b, count, KIND: tl.constexpr):
    """Centres of the scale sum for a block of rows (or, with the column LSEs, columns) of a
    softmax closure; zeros for the sigmoid closure and for lines without entries. A line's dS
    sums to a known total R (its LSE's weight plus its targets' weight, see _offset_sums), so
    d_scale = sum dS_ij (c_ij - m) + sum m R with m = (lse - b) / s, the LSE in the units of c,
    when s >= log(count); at higher temperatures (lse - b - log count) / s, the log-mean-exp of the
    line's c, which lies within the range of c where the LSE's offset log(count) / s would not
    (count: the line's length). The launcher adds the second sum (_offset_sums): a float32 error
    e of the stored LSE scales P's line by (1 + e) and moves the first sum by e times the line's
    mean of c - m (about its entropy / s) instead of its mean of c, which at a low temperature is
    where the whole scale gradient cancels."""
    if KIND == 0:
        s_safe = tl.where(s != 0.0, s, 1.0)
        log_n = tl.log(tl.zeros_like(lse) + count)  # (count may be specialised to 1)
        shift = tl.where(s < log_n, log_n, 0.0)
        m = tl.where(lse > float("-inf"), (lse - b - shift) / s_safe, 0.0)
        return tl.where(s != 0.0, m, 0.0)
    return tl.zeros_like(lse)


@triton.jit
def _plain_tile(row0, col0, N, M, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """True when the tile lies inside the matrix and off the band j = i + offset that holds the
    default targets and the self-similarities: every entry is a valid non-target."""
    inside = (row0 + BLOCK_M <= N) & (col0 + BLOCK_N <= M)
    band_lo = row0 + offset
    return inside & ((col0 + BLOCK_N <= band_lo) | (col0 >= band_lo + BLOCK_M))


@triton.jit
def _plain_spans(row0, N, M, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The plain column tiles of the row block at row0 (those _plain_tile accepts), as two spans
    of tile starts: [0, lo_end) and [hi_start, hi_end); the rest, [lo_end, hi_start) and
    [hi_end, M), are the band and the edge tiles. All multiples of BLOCK_N, lo_end <= hi_start <=
    hi_end; empty when the row block is cut by N."""
    m_full = M // BLOCK_N * BLOCK_N
    band_lo = row0 + offset
    lo_end = tl.minimum(tl.maximum(band_lo, 0) // BLOCK_N * BLOCK_N, m_full)
    band_hi = tl.maximum(band_lo + BLOCK_M, 0)
    hi_start = tl.minimum(tl.maximum((band_hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo_end), m_full)
    inside = row0 + BLOCK_M <= N
    return tl.where(inside, lo_end, 0), tl.where(inside, hi_start, 0), tl.where(inside, m_full, 0)


@triton.jit
def _plain_row_spans(col0, N, M, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The transposed view of _plain_spans: the row-block starts whose tile with the column block
    at col0 is plain, as [0, lo_end) and [hi_start, hi_end) (multiples of BLOCK_M). Tile (i, j) is
    plain exactly when tile (j, i) of the transposed matrix, with the band at i = j - offset, is."""
    return _plain_spans(col0, M, N, -offset, BLOCK_N, BLOCK_M)


@triton.jit
def _sweep(TILES: tl.constexpr, lo_end, hi_start, hi_end, n):
    """The sweep of a split launch as (a0, a_len, b0, count): tile u of the sweep starts at
    a0 + u for u < a_len, else at b0 + (u - a_len). TILES 0: all of [0, n); 1: the band and edge
    tiles [lo_end, hi_start) + [hi_end, n); 2: the interior ones [0, lo_end) + [hi_start, hi_end)."""
    if TILES == 0:
        return 0, n, n, n
    elif TILES == 1:
        return lo_end, hi_start - lo_end, hi_end, (hi_start - lo_end) + (n - hi_end)
    else:
        return 0, lo_end, hi_start, lo_end + (hi_end - hi_start)


@triton.jit
def _any_underflow(flags):
    """Whether a plain tile of the row block had a raw column sum below _COLSUM_FLOOR."""
    return tl.max(flags, 0) > 0


@triton.jit
def _two_sum(a, b):
    """(s, e): s = a + b rounded and its rounding error e, a + b = s + e exactly (0 where s is not
    finite). Keeps what a float32 LSE m + log(l) loses: the LSEs' lo parts (EngineStats)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, tl.where(tl.abs(s) < float("inf"), e, 0.0)


@triton.jit
def _lse_parts(m, l):
    """The LSE m + log(l) of float32 m and float64 l as float32 (hi, lo), hi + lo within ~1e-15 of
    it (lo 0 where m is -inf). (LSE_LO: l is summed in float64, where float32 additions beside a
    dominant 1 would round by up to 6e-8 each, next to a loss log(l) ~ 1e-3.)"""
    lse = m.to(tl.float64) + tl.log(tl.where(l > 0, l, 1.0))
    hi = lse.to(tl.float32)
    lo = (lse - hi.to(tl.float64)).to(tl.float32)
    none = m == float("-inf")
    return tl.where(none, m, hi), tl.where(none, 0.0, lo)


@triton.jit
def _exp_sum64(e, axis: tl.constexpr):
    """Sum of exponentials e (float32, each <= 1 relative to its line's max) along ``axis`` as
    float64, the entries >= 1/2 summed apart from the rest: the small ones are not added beside a
    1 in float32 (~6e-8 each), and no float64 tile is formed (it would spill registers)."""
    big = tl.sum(tl.where(e >= 0.5, e, 0.0), axis)
    small = tl.sum(tl.where(e >= 0.5, 0.0, e), axis)
    return big.to(tl.float64) + small.to(tl.float64)


@triton.jit
def _merge_column_partials_kernel(part_ptr, ref_ptr, out_ptr, lo_ptr, out_lo_ptr, n_blocks, M,
                                  n_col_tiles, TILE_N: tl.constexpr, BLOCK: tl.constexpr,
                                  LSE_LO: tl.constexpr):
    # Column LSEs of the symmetric forward from its per-row-block partials:
    #   col_lse_j = LSE_b part_bj,  part_bj = ln(A_bj) + ln(2) ref_bt  (plain tile t: raw sum)
    #                                      = A_bj (+ lo_bj: LSE_LO)    (ref_bt = -inf: a log)
    # 1. for each row block b: read A_bj and its tile's ref, form part_bj; 2. online LSE over b;
    # 3. LSE_LO: the result as hi + lo (a dominant log partial's lo enters as e^lo ~ 1 + lo).
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < M
    c64 = cols.to(tl.int64)
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    if LSE_LO:
        l = tl.zeros((BLOCK,), dtype=tl.float64)
    else:
        l = tl.zeros((BLOCK,), dtype=tl.float32)
    a_ptrs = part_ptr + c64  # advanced as pointers: 64-bit offsets however large the buffer
    lo_ptrs = lo_ptr + c64
    ref_ptrs = ref_ptr + cols // TILE_N
    for _ in range(0, n_blocks):
        a = tl.load(a_ptrs, mask=cmask, other=1.0)
        ref = tl.load(ref_ptrs, mask=cmask, other=float("-inf"))
        natural = ref == float("-inf")
        v = tl.where(natural, a, tl.log(a) + ref * LN2)
        m_new = tl.maximum(m, v)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = _exp(v - m_safe)
        if LSE_LO:
            lo_b = tl.where(natural, tl.load(lo_ptrs, mask=cmask, other=0.0), 0.0)
            l = l * _exp(m - m_safe).to(tl.float64) + e.to(tl.float64) * (1.0 + lo_b.to(tl.float64))
            lo_ptrs += M
        else:
            l = l * _exp(m - m_safe) + e
        m = m_new
        a_ptrs += M
        ref_ptrs += n_col_tiles
    if LSE_LO:
        hi, lo = _lse_parts(m, l)
        tl.store(out_ptr + c64, hi, mask=cmask)
        tl.store(out_lo_ptr + c64, lo, mask=cmask)
    else:
        tl.store(out_ptr + c64, m + tl.log(l), mask=cmask)


@triton.jit
def _exp(x):
    """e^x as 2^(x log2 e). tl.exp2 compiles to ex2.approx.ftz (one MUFU.EX2); tl.exp to the
    non-flushing ex2.approx, which ptxas wraps in a range fix-up for subnormal results (a compare
    and two predicated multiplies per entry). Results below 2^-126 become 0 here: every exponent
    is taken relative to a maximum or an LSE, where such terms vanish beside the leading 1."""
    return tl.exp2(x * LOG2E)


@triton.jit
def _lowp(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """float32 x in the features' dtype, rounded to nearest even. UPCAST (bfloat16 under the
    interpreter): the interpreter converts float32 to bfloat16 by truncation, a bias of about half
    a unit in the last place towards zero, where the GPU rounds; the bits are rounded here first,
    so the conversion is exact and CPU runs carry the GPU's rounding errors, not larger ones."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _sum_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _product(a, b):
    return a * b


@triton.jit
def _softplus_row_sums(x, BLOCK_N: tl.constexpr, SERIES: tl.constexpr):
    """sum_j softplus(x_ij) of each row = sum_j max(x_ij, 0) + log prod_j (1 + y_ij), y = e^-|x|:
    one logarithm per row instead of one per entry (each factor lies in [1, 2]; scaled by 3/4 past
    64 columns so that the product stays a normal float32). Entries at -inf add nothing.
    SERIES (float32 features): a factor 1 + y with y < 1/16 keeps few of y's bits (none below
    2^-24), which left a converged row's loss, made of such terms, ~1e-5 off; those terms are
    summed instead as log1p(y) = y - y^2/2 + y^3/3 - y^4/4 (truncation below y^5/5)."""
    return _softplus_sums(x, tl.exp2(tl.abs(x) * -LOG2E), BLOCK_N, SERIES)


@triton.jit
def _softplus_sums(x, y, BLOCK_N: tl.constexpr, SERIES: tl.constexpr):
    """_softplus_row_sums of x given y = e^-|x| (which the step's tiles share with sigmoid)."""
    relu = tl.sum(tl.maximum(x, 0.0), 1)
    if SERIES:
        small = y < 0.0625
        f = tl.where(small, 1.0, 1.0 + y)
        series = y * (1.0 - y * (0.5 - y * (0.33333334 - 0.25 * y)))
        relu += tl.sum(tl.where(small, series, 0.0), 1)
    else:
        f = 1.0 + y
    if BLOCK_N <= 64:
        out = relu + tl.log(tl.reduce(f, 1, _product))
    else:
        out = relu + (tl.log(tl.reduce(f * 0.75, 1, _product)) - BLOCK_N * LN_075)
    return out


@triton.jit
def _sigmoid_row_losses(S, valid, target, BLOCK_N: tl.constexpr, SERIES: tl.constexpr):
    """sum_j softplus(-z_ij S_ij) of each row of a tile over its valid entries (z = +1 on the
    targets, else -1)."""
    return _softplus_row_sums(tl.where(valid, tl.where(target, -S, S), float("-inf")), BLOCK_N,
                              SERIES)


@triton.jit
def _lses_close(r2, c2):
    """Whether P^col can be formed from P: the rows' and columns' LSEs (base 2) lie within
    _LSE_SPREAD of the largest row LSE, so neither factor of the rank-one rescaling over- or
    underflows and entries it flushes to zero are below 2^-66 of the column's mass."""
    top = tl.max(r2, 0)
    return (top - tl.min(r2, 0) <= _LSE_SPREAD) & (tl.max(tl.abs(top - c2), 0) <= _LSE_SPREAD)


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    """A dot operand; UPCAST (CPU interpreter with bf16 only, whose bf16 dot is unreliable) widens
    to float32 after the bf16 rounding the GPU path applies."""
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def _row_targets(rows, N, offset, pos_ptr, rlab_ptr, HAS_POS: tl.constexpr, LABELS: tl.constexpr,
                 TARGET_K: tl.constexpr):
    """Per-row target metadata: the row's class id (label mode, int64) or its positive column
    (int32: column indices are below 2^31 even where offsets into the features are not; with
    TARGET_K weighted targets, the first of the row's K)."""
    rmask = rows < N
    if LABELS:
        meta = tl.load(rlab_ptr + rows.to(tl.int64), mask=rmask, other=0)
    elif TARGET_K > 0:
        meta = tl.load(pos_ptr + rows.to(tl.int64) * TARGET_K, mask=rmask, other=-1).to(tl.int32)
    elif HAS_POS:
        meta = tl.load(pos_ptr + rows.to(tl.int64), mask=rmask, other=-1).to(tl.int32)
    else:
        meta = rows + offset
    return meta


@triton.jit
def _weighted_targets(rows, cols, N, pos_ptr, tw_ptr, TARGET_K: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """T_ij = sum_k w_ik [j == p_ik] of a tile: TARGET_K weighted index targets per row, indices
    and weights (N, K) row-major."""
    base = rows.to(tl.int64) * TARGET_K
    rmask = rows < N
    tw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.static_range(TARGET_K):
        idx = tl.load(pos_ptr + base + k, mask=rmask, other=-1).to(tl.int32)
        w = tl.load(tw_ptr + base + k, mask=rmask, other=0.0)
        tw += tl.where(cols[None, :] == idx[:, None], w[:, None], 0.0)
    return tw


@triton.jit
def _col_labels(cols, M, clab_ptr, LABELS: tl.constexpr):
    if LABELS:
        meta = tl.load(clab_ptr + cols.to(tl.int64), mask=cols < M, other=0)
    else:
        meta = cols
    return meta


@triton.jit
def _col_targets(cols, M, offset, cpos_ptr, HAS_CPOS: tl.constexpr):
    """Row index of each column's positive (symmetric losses)."""
    if HAS_CPOS:
        tgt = tl.load(cpos_ptr + cols.to(tl.int64), mask=cols < M, other=-1).to(tl.int32)
    else:
        tgt = cols - offset
    return tgt


@triton.jit
def _tile_masks(rows, cols, N, M, offset, row_meta, col_meta, LABELS: tl.constexpr,
                EXCLUDE_SELF: tl.constexpr):
    """valid_ij (inside the matrix, self excluded) and T_ij (target, and valid)."""
    valid = (rows < N)[:, None] & (cols < M)[None, :]
    if EXCLUDE_SELF:
        valid = valid & (cols[None, :] != (rows + offset)[:, None])
    if LABELS:
        target = valid & (row_meta[:, None] == col_meta[None, :])
    else:
        target = valid & (cols[None, :] == row_meta[:, None])
    return valid, target


@triton.jit
def _guide_tile(gq_ptr, gk_ptr, row0, col0, N, M, DG, stride_gqn, stride_gqd, stride_gkn,
                stride_gkd, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, FN_SPACE: tl.constexpr):
    """The guide's products g_ij = <u_i, v_j> of one tile (FN_SPACE 3: the false-negative rule
    compares them; the guide's features take the teacher's pointers); zeros otherwise."""
    if FN_SPACE == 3:
        g = _similarity_tile(gq_ptr, gk_ptr, row0, col0, N, M, DG, stride_gqn, stride_gqd,
                             stride_gkn, stride_gkd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST,
                             False)
    else:
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return g


@triton.jit
def _drop_false_negatives(valid, target, S, c, g, rows, cols, N, M, thr_ptr, rid_ptr, cid_ptr,
                          FN_SPACE: tl.constexpr, FN_IDS: tl.constexpr):
    """In-tile false-negative masking of non-target entries: FN_SPACE 1 drops S_ij > thr_i (a
    margin below the positive's logit), 2 drops c_ij > thr_i (a ratio of the positive's cosine),
    3 drops g_ij > thr_i (the guide's products, :func:`_guide_tile`); FN_IDS drops keys whose
    duplicate id equals that of the row's positive."""
    if FN_SPACE != 0:
        thr = tl.load(thr_ptr + rows.to(tl.int64), mask=rows < N, other=float("inf"))
        if FN_SPACE == 1:
            above = S > thr[:, None]
        elif FN_SPACE == 2:
            above = c > thr[:, None]
        else:
            above = g > thr[:, None]
        valid = valid & ((target != 0) | (above == 0))
    if FN_IDS:
        rid = tl.load(rid_ptr + rows.to(tl.int64), mask=rows < N, other=-1)
        cid = tl.load(cid_ptr + cols.to(tl.int64), mask=cols < M, other=-2)
        valid = valid & ((target != 0) | (rid[:, None] != cid[None, :]))
    return valid


@triton.jit
def _general_tile(c, g, s, b, rows, cols, N, M, offset, row_meta, clab_ptr, thr_ptr, rid_ptr,
                  cid_ptr, LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr, FN_SPACE: tl.constexpr,
                  FN_IDS: tl.constexpr):
    """(S, valid, target) of a tile on the general path: logits, then every mask of the closure
    (g: the guide's products, FN_SPACE 3)."""
    S = c * s + b
    col_meta = _col_labels(cols, M, clab_ptr, LABELS)
    valid, target = _tile_masks(rows, cols, N, M, offset, row_meta, col_meta, LABELS, EXCLUDE_SELF)
    valid = _drop_false_negatives(valid, target, S, c, g, rows, cols, N, M, thr_ptr, rid_ptr,
                                  cid_ptr, FN_SPACE, FN_IDS)
    return S, valid, target


@triton.jit
def _row_grad_meta(rows, N, row_lse_ptr, row_pos_ptr, row_npos_ptr, g_row_ptr, g_pos_ptr, stride_g,
                   stride_gp, aux_ptr, g_l2_ptr, stride_gl2, KIND: tl.constexpr,
                   TARGET_LSE: tl.constexpr, LSE2: tl.constexpr):
    """(row_lse, a_i, b_i, t_i, lse2_i, a2_i) of a block of rows: the weights of P and of the
    target term, the target term's statistic (1 / npos_i, or the target LSE), and the second
    LSE with its weight (LSE2; zeros otherwise)."""
    rmask = rows < N
    r64 = rows.to(tl.int64)
    lse = tl.load(row_lse_ptr + r64, mask=rmask, other=0.0)
    a = tl.load(g_row_ptr + r64 * stride_g, mask=rmask, other=0.0).to(tl.float32)
    if KIND == 0:
        b = tl.load(g_pos_ptr + r64 * stride_gp, mask=rmask, other=0.0).to(tl.float32)
        if TARGET_LSE:
            t = tl.load(row_pos_ptr + r64, mask=rmask, other=0.0)
        else:
            npos = tl.load(row_npos_ptr + r64, mask=rmask, other=0.0)
            t = tl.where(npos > 0, 1.0 / tl.where(npos > 0, npos, 1.0), 0.0)
    else:
        b = tl.zeros_like(a)
        t = tl.zeros_like(a)
    if LSE2:
        lse2 = tl.load(aux_ptr + 2 * N + r64, mask=rmask, other=0.0)
        a2 = tl.load(g_l2_ptr + r64 * stride_gl2, mask=rmask, other=0.0).to(tl.float32)
    else:
        lse2 = tl.zeros_like(a)
        a2 = tl.zeros_like(a)
    return lse, a, b, t, lse2, a2


@triton.jit
def _col_grad_meta(cols, M, col_lse_ptr, g_col_ptr, g_cpos_ptr, stride_g, stride_gp,
                   SYMMETRIC: tl.constexpr):
    """(col_lse, ac_j, bc_j) of a block of columns (zeros unless symmetric)."""
    cmask = cols < M
    c64 = cols.to(tl.int64)
    if SYMMETRIC:
        lse = tl.load(col_lse_ptr + c64, mask=cmask, other=0.0)
        a = tl.load(g_col_ptr + c64 * stride_g, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(g_cpos_ptr + c64 * stride_gp, mask=cmask, other=0.0).to(tl.float32)
    else:
        lse = tl.zeros(cols.shape, dtype=tl.float32)
        a = tl.zeros(cols.shape, dtype=tl.float32)
        b = tl.zeros(cols.shape, dtype=tl.float32)
    return lse, a, b


@triton.jit
def _grad_logits(S, valid, target, col_target, lse_r, a_r, b_r, t_r, lse_c, a_c, b_c, soft,
                 l2_r, a2_r, ratio2, KIND: tl.constexpr, SYMMETRIC: tl.constexpr,
                 EXCLUDE_TARGETS: tl.constexpr, TARGET_LSE: tl.constexpr, SOFT_SIM: tl.constexpr,
                 LSE2: tl.constexpr, TARGET_K: tl.constexpr):
    """(dL/dS, its row closure's part, its column closure's part) of one tile from the saved
    statistics (the loss closure): softmax: a_i P_ij + b_i dT_ij (rows) + ac_j Pc_ij + bc_j Tc_ij
    (columns, symmetric; else zeros);  sigmoid: -a_i z_ij sigmoid(-z_ij S_ij) (rows)."""
    if KIND == 0:
        if EXCLUDE_TARGETS:
            in_lse = valid & (target == 0)
        else:
            in_lse = valid
        p = tl.where(in_lse, _exp(S - lse_r[:, None]), 0.0)
        if SOFT_SIM:  # targets: the teacher's softmax, recomputed in the tile
            dT = soft
        elif TARGET_K > 0:  # weighted index targets (their weights in soft)
            dT = soft * t_r[:, None]
        elif TARGET_LSE:
            dT = tl.where(target, _exp(S - t_r[:, None]), 0.0)
        else:
            dT = tl.where(target, t_r[:, None], 0.0)
        dS = a_r[:, None] * p + b_r[:, None] * dT
        if LSE2:  # a second LSE over the same entries, of ratio2 * S
            dS += (a2_r * ratio2)[:, None] * tl.where(in_lse, _exp(S * ratio2 - l2_r[:, None]), 0.0)
        dS_rows = dS
        if SYMMETRIC:
            if EXCLUDE_TARGETS:
                in_col = valid & (col_target == 0)
            else:
                in_col = valid
            pc = tl.where(in_col, _exp(S - lse_c[None, :]), 0.0)
            dS_cols = a_c[None, :] * pc + b_c[None, :] * col_target.to(tl.float32)
            dS = dS_rows + dS_cols
        else:
            dS_cols = tl.zeros_like(dS)
    else:
        z = tl.where(target, 1.0, -1.0)  # -z sigmoid(-z S) = -z / (1 + e^(z S))
        dS = tl.where(valid, (-z * a_r[:, None]) / (1.0 + tl.exp2(z * S * LOG2E)), 0.0)
        dS_rows = dS
        dS_cols = tl.zeros_like(dS)
    return dS, dS_rows, dS_cols


@triton.jit
def _teacher_probs(tq_ptr, tk_ptr, tscale_ptr, aux_ptr, row0, col0, rows, valid, target, N, M, DT,
                   stride_tqn, stride_tqd, stride_tkn, stride_tkd, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, SOFT_SIM: tl.constexpr):
    """Targets T_ij = w Tt_ij + (1 - w) [j = p(i)] of one tile (SOFT_SIM), Tt_ij =
    exp(st <u_i, v_j> - teacher_lse_i) from the teacher LSE saved by the forward (aux row 0), w
    the teacher's weight (tscale_ptr[1]), p(i) the row's index target; zeros otherwise."""
    if SOFT_SIM:
        ts = tl.load(tscale_ptr).to(tl.float32)
        tw = tl.load(tscale_ptr + 1).to(tl.float32)
        t_lse = tl.load(aux_ptr + rows.to(tl.int64), mask=rows < N, other=0.0)
        c2 = _similarity_tile(tq_ptr, tk_ptr, row0, col0, N, M, DT, stride_tqn, stride_tqd, stride_tkn,
                              stride_tkd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST, False)
        soft = tl.where(valid, tw * _exp(c2 * ts - t_lse[:, None]), 0.0)
        soft += tl.where(target, 1.0 - tw, 0.0)
    else:
        soft = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return soft


@triton.jit
def _grad_logits_transposed(S, valid, target, rows, cols, M, offset, ratio2, pos_ptr, rlab_ptr,
                            row_lse_ptr, row_pos_ptr, row_npos_ptr, g_row_ptr, g_rpos_ptr, stride_gr,
                            stride_grp, aux_ptr, g_l2_ptr, stride_gl2, KIND: tl.constexpr,
                            HAS_POS: tl.constexpr, LABELS: tl.constexpr, TARGET_K: tl.constexpr,
                            EXCLUDE_TARGETS: tl.constexpr, TARGET_LSE: tl.constexpr,
                            LSE2: tl.constexpr):
    """dS_ji laid out as tile (i, j), for a self-similarity (queries == keys: S_ji = S_ij), from
    the statistics of rows j (the columns); ``target`` is the tile's T_ij (label targets are
    symmetric, index targets are T_ji = [p_j == i])."""
    lse_j, a_j, b_j, t_j, l2_j, a2_j = _row_grad_meta(
        cols, M, row_lse_ptr, row_pos_ptr, row_npos_ptr, g_row_ptr, g_rpos_ptr, stride_gr,
        stride_grp, aux_ptr, g_l2_ptr, stride_gl2, KIND, TARGET_LSE, LSE2)
    if LABELS:
        target_t = target
    else:
        tgt_j = _row_targets(cols, M, offset, pos_ptr, rlab_ptr, HAS_POS, LABELS, TARGET_K)
        target_t = valid & (rows[:, None] == tgt_j[None, :])
    if EXCLUDE_TARGETS:
        in_lse = valid & (target_t == 0)
    else:
        in_lse = valid
    p = tl.where(in_lse, _exp(S - lse_j[None, :]), 0.0)
    if TARGET_LSE:
        dT = tl.where(target_t, _exp(S - t_j[None, :]), 0.0)
    else:
        dT = tl.where(target_t, t_j[None, :], 0.0)
    dS_t = a_j[None, :] * p + b_j[None, :] * dT
    if LSE2:
        dS_t += (a2_j * ratio2)[None, :] * tl.where(in_lse, _exp(S * ratio2 - l2_j[None, :]), 0.0)
    return dS_t


@triton.jit
def _tile_grad(c, row0, col0, rows, cols, N, M, offset, s, b, row_meta, lse_r, a_r, b_r, t_r, l2_r,
               a2_r, ratio2,
               pos_ptr, tw_ptr, cpos_ptr, clab_ptr, thr_ptr, rid_ptr, cid_ptr,
               tq_ptr, tk_ptr, tscale_ptr, aux_ptr, DT, stride_tqn, stride_tqd, stride_tkn, stride_tkd,
               col_lse_ptr, g_col_ptr, g_cpos_ptr, stride_gc, stride_gcp,
               KIND: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_POS: tl.constexpr,
               HAS_CPOS: tl.constexpr, LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
               EXCLUDE_TARGETS: tl.constexpr, TARGET_LSE: tl.constexpr, FN_SPACE: tl.constexpr,
               FN_IDS: tl.constexpr, SOFT_SIM: tl.constexpr, LSE2: tl.constexpr,
               TARGET_K: tl.constexpr, PLAIN: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               INTERIOR: tl.constexpr, CENTRE: tl.constexpr, CENTRE_COLS: tl.constexpr,
               CS_AXIS: tl.constexpr, LINE_SUMS: tl.constexpr = False,
               ROW_LOSS: tl.constexpr = False, SP_SERIES: tl.constexpr = False):
    """dL/dS of one tile from its recomputed products c = Q_blk K_blk^T and the saved statistics
    (the rows' side pre-loaded): returns (dS, S, valid, target, rs, rb, cs, cb, loss), with rs_i =
    sum_j R_ij c_ij (CENTRE: sum_j R_ij (c_ij - m_i), m the rows' _centres) and rb_i = sum_j R_ij
    for R the row closure's part of dS, and cs = sum C_ij c_ij (CENTRE_COLS: c_ij - n_j, n the
    columns' _centres), cb = sum C_ij along axis CS_AXIS (1: per row, 0: per column) for C the
    symmetric closure's column part (zeros for the others); dS = R + C, and unused sums are not
    computed. LINE_SUMS: rb and cb sum the entries as formed (the lean path otherwise sums a
    tile's target terms apart from its P terms, whose float32 sums lose what the entries keep
    where the two nearly cancel; see correct_line_totals). PLAIN: tiles inside the matrix and
    off the band j = i + offset take a lean path without masks (valid all true; targets only where the closure has index or label
    targets, which lie anywhere: a compare per entry); INTERIOR: the caller sweeps only such
    tiles (the masked path is not compiled). Symmetric closures with label targets: column j's
    targets are the rows of its class. ROW_LOSS (sigmoid): loss_i = sum_j softplus(-z_ij S_ij)
    over the tile (the lean path takes it from dS's exponential; zeros without ROW_LOSS)."""
    lse_c, a_c, b_c = _col_grad_meta(cols, M, col_lse_ptr, g_col_ptr, g_cpos_ptr, stride_gc,
                                     stride_gcp, SYMMETRIC)
    if CENTRE:
        cm = c - _centres(lse_r, s, b, M, KIND)[:, None]
    else:
        cm = c
    if CENTRE_COLS:
        cn = c - _centres(lse_c, s, b, N, KIND)[None, :]
    else:
        cn = c
    if CS_AXIS == 1:
        cs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        cs = tl.zeros((BLOCK_N,), dtype=tl.float32)
    cb = cs
    if INTERIOR:
        plain = True
    elif PLAIN:
        plain = _plain_tile(row0, col0, N, M, offset, BLOCK_M, BLOCK_N)
    else:
        plain = False
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if plain and KIND == 1:  # every entry a valid negative (z = -1): dS = a_i sigmoid(S_ij)
        S = c * s + b
        if ROW_LOSS:  # one exponential y = e^-|S| for both: sigmoid(S) = (1 or y) / (1 + y)
            y = tl.exp2(tl.abs(S) * -LOG2E)
            dS = a_r[:, None] * tl.where(S >= 0.0, 1.0, y) / (1.0 + y)
            loss = _softplus_sums(S, y, BLOCK_N, SP_SERIES)
        else:
            dS = a_r[:, None] / (1.0 + tl.exp2(-(c * (s * LOG2E) + b * LOG2E)))
        valid = (rows < N)[:, None] & (cols < M)[None, :]
        target = valid & (cols < 0)[None, :]
        rs = tl.sum(dS * cm, 1)
        rb = tl.sum(dS, 1)
    elif plain:  # every entry valid: dS = a_i P_ij + ac_j Pc_ij, one exponential each (+ targets)
        sl2 = s * LOG2E
        r2 = lse_r * LOG2E
        # (the tensor first: Triton 3.0's interpreter turns `constexpr - tensor` into a constexpr)
        p = tl.exp2(c * sl2 + (-r2 + b * LOG2E)[:, None])
        # the row part's sums: a_i P_ij, then its target term (apart: a tile of the row part
        # alive beside dS costs registers the wide tiles do not have; centred, neither sum is
        # large next to their total)
        rs = a_r * tl.sum(p * cm, 1)
        rb = a_r * tl.sum(p, 1)
        if SYMMETRIC:
            # Pc_ij = 2^(x_ij - c_j) = P_ij 2^(r_i - top) 2^(top - c_j) when the LSEs are close
            c2 = lse_c * LOG2E
            top = tl.max(r2, 0)
            if _lses_close(r2, c2):
                w = (a_c * tl.exp2(top - c2))[None, :] * tl.exp2(r2 - top)[:, None]
                dS = p * (w + a_r[:, None])
                dS_cols = p * w  # (only where its sums are used)
            else:
                dS_cols = a_c[None, :] * tl.exp2(c * sl2 + (-c2 + b * LOG2E)[None, :])
                dS = a_r[:, None] * p + dS_cols
            cs = tl.sum(dS_cols * cn, CS_AXIS)
            cb = tl.sum(dS_cols, CS_AXIS)
        else:
            dS = a_r[:, None] * p
        S = c * s + b
        valid = (rows < N)[:, None] & (cols < M)[None, :]
        if HAS_POS or LABELS:  # targets anywhere: + b_i t_i T_ij (+ bc_j Tc_ij, symmetric)
            if TARGET_K > 0:
                tw = _weighted_targets(rows, cols, N, pos_ptr, tw_ptr, TARGET_K, BLOCK_M, BLOCK_N)
                target = tw != 0.0
                dT = tw * (b_r * t_r)[:, None]
            else:
                target = row_meta[:, None] == _col_labels(cols, M, clab_ptr, LABELS)[None, :]
                dT = tl.where(target, (b_r * t_r)[:, None], 0.0)
            rs += tl.sum(dT * cm, 1)
            if LINE_SUMS:
                rb = tl.sum(a_r[:, None] * p + dT, 1)
            else:
                rb += tl.sum(dT, 1)
            dS += dT
            if SYMMETRIC:
                if LABELS:
                    col_target = target
                else:
                    ctgt = _col_targets(cols, M, offset, cpos_ptr, HAS_CPOS)
                    col_target = rows[:, None] == ctgt[None, :]
                dTc = tl.where(col_target, b_c[None, :], 0.0)
                cs += tl.sum(dTc * cn, CS_AXIS)
                if LINE_SUMS:  # each part's target cancels its own P before they are added
                    row_part = a_r[:, None] * p + dT
                    col_part = dS_cols + dTc
                    rb = tl.sum(row_part, 1)
                    cb = tl.sum(col_part, CS_AXIS)
                    dS = row_part + col_part
                else:
                    cb += tl.sum(dTc, CS_AXIS)
                    dS += dTc
        else:
            target = valid & (cols < 0)[None, :]
    else:
        g = _guide_tile(tq_ptr, tk_ptr, row0, col0, N, M, DT, stride_tqn, stride_tqd, stride_tkn,
                        stride_tkd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST, FN_SPACE)
        S, valid, target = _general_tile(c, g, s, b, rows, cols, N, M, offset, row_meta, clab_ptr,
                                         thr_ptr, rid_ptr, cid_ptr, LABELS, EXCLUDE_SELF, FN_SPACE,
                                         FN_IDS)
        if LABELS:
            col_target = target
        else:
            ctgt = _col_targets(cols, M, offset, cpos_ptr, HAS_CPOS)
            col_target = valid & (rows[:, None] == ctgt[None, :])
        if TARGET_K > 0:  # weighted index targets: their weights where soft targets go
            soft = tl.where(valid, _weighted_targets(rows, cols, N, pos_ptr, tw_ptr, TARGET_K,
                                                     BLOCK_M, BLOCK_N), 0.0)
            target = soft != 0.0
        else:
            soft = _teacher_probs(tq_ptr, tk_ptr, tscale_ptr, aux_ptr, row0, col0, rows, valid,
                                  target, N, M, DT, stride_tqn, stride_tqd, stride_tkn, stride_tkd,
                                  BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST, SOFT_SIM)
        dS, dS_rows, dS_cols = _grad_logits(S, valid, target, col_target, lse_r, a_r, b_r, t_r,
                                            lse_c, a_c, b_c, soft, l2_r, a2_r, ratio2, KIND,
                                            SYMMETRIC, EXCLUDE_TARGETS, TARGET_LSE, SOFT_SIM, LSE2,
                                            TARGET_K)
        rs = tl.sum(dS_rows * cm, 1)
        rb = tl.sum(dS_rows, 1)
        if SYMMETRIC:
            cs = tl.sum(dS_cols * cn, CS_AXIS)
            cb = tl.sum(dS_cols, CS_AXIS)
        if ROW_LOSS:
            loss = _sigmoid_row_losses(S, valid, target, BLOCK_N, SP_SERIES)
    return dS, S, valid, target, rs, rb, cs, cb, loss


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, pos_ptr, tw_ptr, cpos_ptr, rlab_ptr, clab_ptr, thr_ptr, rid_ptr,
    cid_ptr,
    tq_ptr, tk_ptr, tscale_ptr, aux_ptr, DT, stride_tqn, stride_tqd, stride_tkn, stride_tkd,
    row_lse_ptr, row_pos_ptr, row_npos_ptr, col_part_ptr, col_ref_ptr, col_pos_ptr, row_init_ptr,
    flag_ptr, row_lo_ptr, col_lo_ptr, N, M, D, row_block_start, offset, ratio2,
    stride_qn, stride_qd, stride_kn, stride_kd,
    KIND: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_CPOS: tl.constexpr, LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    EXCLUDE_TARGETS: tl.constexpr, TARGET_LSE: tl.constexpr, FN_SPACE: tl.constexpr,
    FN_IDS: tl.constexpr, SOFT_SIM: tl.constexpr, LSE2: tl.constexpr,
    COUNT: tl.constexpr, TILES: tl.constexpr, TILE_N: tl.constexpr, RESIDENT: tl.constexpr,
    TMA: tl.constexpr, COLSUM_MMA: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SP_SERIES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LSE_LO: tl.constexpr = False,
):
    # Forward sweep of one row block over every column block.
    #   softmax: row_lse_i = LSE_{j valid} S_ij, row_pos_i = sum_j T_ij S_ij, row_npos_i = sum_j T_ij;
    #            symmetric: partial column LSE over this block's rows, and S_{pc(j), j}.
    #            EXCLUDE_TARGETS leaves targets out of the LSEs; TARGET_LSE makes row_pos the LSE
    #            over targets; FN_SPACE / FN_IDS drop false negatives from every sum.
    #   COUNT (retrieval metrics): row_lse_i = #{valid non-target j : S_ij > thr_i}, nothing else;
    #         COUNT = 1: thr_i from thr_ptr; 2: thr_i = row i's target logit (one target per row),
    #         from a first sweep over the same tiles, so a key equal to the target ties with it.
    #   sigmoid: row_lse_i = sum_{j valid} softplus(-z_ij S_ij), z = +1 on targets else -1.
    # 1. load the row block's target metadata, scale and bias;
    # 2. for each column block: c = Q_blk K_blk^T (fp32 accumulate over D), S = s c + b;
    # 3. masks: valid (in range, self excluded), T (targets);
    # 4. online row max / sum-exp update (or softplus sum), target logit sums;
    # 5. symmetric: the tile's column max / sum-exp -> one partial LSE per column, stored for
    #    this row block; the column's positive logit stored by the block that holds its row;
    # 6. store the row statistics.
    # TILES (closures whose targets and exclusions lie on the band j = i + offset are swept in
    # two launches over disjoint tiles): 1 = the band and edge tiles, through steps 2-6, leaving
    # the row LSE in row_init; 2 = the interior ("plain") tiles, which skip steps 3-5 and take a
    # lean path in base 2 with one exponential per entry (x = S log2(e), p = 2^(x - tile row
    # max)), the column sums from the same p weighted by 2^(row max - tile max), guarded against
    # underflow (a flag per row block); its online row LSE starts from row_init. 3 (symmetric,
    # after 2) = the rare fix-up: the flagged row blocks redo their interior tiles' column partials
    # with per-column maxima (a launch of its own, so its registers do not weigh on launch 2).
    # 0 = every tile through steps 2-6.
    # TILE_N: the width of the column tiles that hold one reference each in col_ref (and the
    # granularity of the plain spans); the plain launch has BLOCK_N = TILE_N, the others sweep
    # their columns in BLOCK_N-wide pieces, TILE_N a multiple of BLOCK_N.
    # RESIDENT (plain launch, BLOCK_D >= D): the query block is loaded once and each tile is one
    # product with a key tile, so the key loads are pipelined across the column loop.
    # TMA (not with RESIDENT or COUNT): q_ptr / k_ptr are tensor descriptors and the streamed D
    # chunks are copied by the tensor memory accelerator instead of per-thread copies.
    # COLSUM_MMA (launch 2, 16-bit features): the column sums of step 5 as the product P^T w on the
    # tensor cores (P and w rounded to bfloat16, float32 sums) instead of reductions across lanes
    # and warps. SP_SERIES (sigmoid, float32 features): small softplus terms summed as a series
    # (see _softplus_row_sums). LSE_LO (softmax, float32 IEEE products): the sums of exponentials
    # in float64 (_exp_sum64) and the LSEs also as their float32 rounding errors, lse = hi + lo
    # (_lse_parts): the row's in row_lo (the band launch hands on (hi, lo) in row_init's two halves,
    # the interior launch starts from l = 1 + lo), the natural-log column partials' in col_lo
    # beside col_part.
    pid = tl.program_id(0)
    row0 = (row_block_start + pid) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    s, b = _scale_bias(scale_ptr, bias_ptr, HAS_BIAS)
    n_col_tiles = tl.cdiv(M, TILE_N)
    lo_end, hi_start, hi_end = _plain_spans(row0, N, M, offset, BLOCK_M, TILE_N)
    # the fix-up (3) sweeps the interior tiles again
    a0, a_len, b0, n_sweep = _sweep(2 if TILES == 3 else TILES, lo_end, hi_start, hi_end, M)
    if TILES == 2:
        if KIND == 0:
            m_i = tl.load(row_init_ptr + r64, mask=rmask, other=float("-inf"))
            if LSE_LO:  # (float64 sums: see _lse_parts)
                lo = tl.load(row_init_ptr + N + r64, mask=rmask, other=0.0)
                l_i = 1.0 + lo.to(tl.float64)
            else:
                l_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        else:  # sigmoid: the band launch's softplus sums
            m_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            l_i = tl.load(row_init_ptr + r64, mask=rmask, other=0.0)
        underflow = tl.zeros((BLOCK_N,), dtype=tl.int32)  # SYMMETRIC: a raw column sum < floor
        if RESIDENT:
            q_res = _feature_block(q_ptr, row0, N, D, stride_qn, stride_qd, BLOCK_M, BLOCK_D)
        for u in range(0, n_sweep, BLOCK_N):
            col0 = tl.where(u < a_len, a0 + u, b0 + (u - a_len))
            cols = col0 + tl.arange(0, BLOCK_N)
            if RESIDENT:
                c = _resident_tile(q_res, k_ptr, col0, M, D, stride_kn, stride_kd, BLOCK_N, BLOCK_D,
                                   PRECISION, UPCAST)
            else:
                c = _similarity_tile(q_ptr, k_ptr, row0, col0, N, M, D, stride_qn, stride_qd,
                                     stride_kn, stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
                                     UPCAST, TMA)
            if KIND == 0:
                x = c * (s * LOG2E) + b * LOG2E
                tm2 = tl.max(x, 1)
                p = tl.exp2(x - tm2[:, None])
                tm = tm2 * LN2
                m_new = tl.maximum(m_i, tm)
                if LSE_LO:
                    l_i = (l_i * _exp(m_i - m_new).to(tl.float64)
                           + (tl.sum(p, 1) * _exp(tm - m_new)).to(tl.float64))
                else:
                    l_i = l_i * _exp(m_i - m_new) + tl.sum(p, 1) * _exp(tm - m_new)
                m_i = m_new
            else:  # every entry a negative (z = -1): softplus(S_ij)
                l_i += _softplus_row_sums(c * s + b, BLOCK_N, SP_SERIES)
            if SYMMETRIC:  # raw sums 2^-top2 sum_i 2^x_ij; the merge takes their logarithms
                top2 = tl.max(tm2, 0)
                w = tl.exp2(tm2 - top2)
                if COLSUM_MMA and RESIDENT:  # sum_i w_i P_ij = (W P)_0j, W: 16 rows of w
                    # (P stays the untransposed operand: one staging buffer less in shared
                    # memory, where the query block and two key tiles take ~192 KiB at D = 256)
                    wm = _lowp(tl.broadcast_to(w[None, :], (16, BLOCK_M)), tl.bfloat16, UPCAST)
                    pb = _lowp(p, tl.bfloat16, UPCAST)
                    colsum = tl.max(tl.dot(_operand(wm, UPCAST), _operand(pb, UPCAST)), 0)
                elif COLSUM_MMA:  # sum_i P_ij w_i = (P^T W)_j0, W: 16 columns of w
                    wm = _lowp(tl.broadcast_to(w[:, None], (BLOCK_M, 16)), tl.bfloat16, UPCAST)
                    pt = _lowp(tl.trans(p), tl.bfloat16, UPCAST)
                    colsum = tl.max(tl.dot(_operand(pt, UPCAST), _operand(wm, UPCAST)), 1)
                else:
                    colsum = tl.sum(p * w[:, None], 0)
                underflow = tl.maximum(underflow, (colsum < _COLSUM_FLOOR).to(tl.int32))
                tl.store(col_part_ptr + pid.to(tl.int64) * M + cols, colsum)
                tl.store(col_ref_ptr + pid.to(tl.int64) * n_col_tiles + col0 // TILE_N, top2)
        if SYMMETRIC:
            tl.store(flag_ptr + pid, tl.where(_any_underflow(underflow), 1, 0))
        if KIND == 0 and LSE_LO:
            hi, lo = _lse_parts(m_i, l_i)
            tl.store(row_lse_ptr + r64, hi, mask=rmask)
            tl.store(row_lo_ptr + r64, lo, mask=rmask)
        elif KIND == 0:
            tl.store(row_lse_ptr + r64, m_i + tl.log(l_i), mask=rmask)
        else:
            tl.store(row_lse_ptr + r64, l_i, mask=rmask)
    elif TILES == 3:
        if tl.load(flag_ptr + pid) != 0:  # rare: redo these columns with their own maxima
            if RESIDENT:
                q_res = _feature_block(q_ptr, row0, N, D, stride_qn, stride_qd, BLOCK_M, BLOCK_D)
            for u in range(0, n_sweep, BLOCK_N):
                col0 = tl.where(u < a_len, a0 + u, b0 + (u - a_len))
                cols = col0 + tl.arange(0, BLOCK_N)
                if RESIDENT:
                    c = _resident_tile(q_res, k_ptr, col0, M, D, stride_kn, stride_kd, BLOCK_N,
                                       BLOCK_D, PRECISION, UPCAST)
                else:
                    c = _similarity_tile(q_ptr, k_ptr, row0, col0, N, M, D, stride_qn,
                                         stride_qd, stride_kn, stride_kd, BLOCK_M, BLOCK_N,
                                         BLOCK_D, PRECISION, UPCAST, TMA)
                x = c * (s * LOG2E) + b * LOG2E
                cm2 = tl.max(x, 0)
                if LSE_LO:
                    part, lo = _two_sum(cm2 * LN2, tl.log(tl.sum(tl.exp2(x - cm2[None, :]), 0)))
                    tl.store(col_lo_ptr + pid.to(tl.int64) * M + cols, lo)
                else:
                    part = (cm2 + tl.log2(tl.sum(tl.exp2(x - cm2[None, :]), 0))) * LN2
                tl.store(col_part_ptr + pid.to(tl.int64) * M + cols, part)
                tl.store(col_ref_ptr + pid.to(tl.int64) * n_col_tiles + col0 // TILE_N,
                         float("-inf"))
    else:
        row_meta = _row_targets(rows, N, offset, pos_ptr, rlab_ptr, HAS_POS, LABELS, 0)

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        if LSE_LO:  # (float64 sums: see _lse_parts)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float64)
        else:
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        pos_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # target sum, or target sum-exp (TARGET_LSE)
        mt_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # target / teacher max
        npos_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # LSE2: max of ratio2 * S
        l2_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # LSE2: sum-exp
        if LSE_LO:  # SOFT_SIM: teacher sum-exp (float64 as l_i)
            lt_i = tl.zeros((BLOCK_M,), dtype=tl.float64)
        else:
            lt_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        tt_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # SOFT_SIM: sum_j e^(St_ij - mt) (St_ij - mt)
        arg_i = tl.zeros((BLOCK_M,), dtype=tl.int32)  # SOFT_SIM, LSE_LO: the column of the max S
        if SOFT_SIM:  # the teacher scale and the teacher's weight in the targets
            ts = tl.load(tscale_ptr).to(tl.float32)
            tw = tl.load(tscale_ptr + 1).to(tl.float32)
        else:
            ts = 0.0
            tw = 1.0
        if COUNT == 1:
            thr = tl.load(thr_ptr + r64, mask=rmask, other=float("inf"))
        elif COUNT == 2:  # the target logit, bit for bit as the counting sweep computes it
            thr = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for u in range(0, n_sweep, BLOCK_N):
                col0 = tl.where(u < a_len, a0 + u, b0 + (u - a_len))
                cols = col0 + tl.arange(0, BLOCK_N)
                c = _similarity_tile(q_ptr, k_ptr, row0, col0, N, M, D, stride_qn, stride_qd,
                                     stride_kn, stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
                                     UPCAST, TMA)
                g = _guide_tile(tq_ptr, tk_ptr, row0, col0, N, M, DT, stride_tqn, stride_tqd,
                                stride_tkn, stride_tkd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
                                UPCAST, FN_SPACE)
                S, valid, target = _general_tile(c, g, s, b, rows, cols, N, M, offset, row_meta,
                                                 clab_ptr, thr_ptr, rid_ptr, cid_ptr, LABELS,
                                                 EXCLUDE_SELF, FN_SPACE, FN_IDS)
                thr += tl.sum(tl.where(valid & target, S, 0.0), 1)
        # the band and edge tiles (TILES = 1), or every tile (TILES = 0)
        for u in range(0, n_sweep, BLOCK_N):
            col0 = tl.where(u < a_len, a0 + u, b0 + (u - a_len))
            cols = col0 + tl.arange(0, BLOCK_N)
            cmask = cols < M
            c = _similarity_tile(q_ptr, k_ptr, row0, col0, N, M, D, stride_qn, stride_qd, stride_kn,
                                 stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST, TMA)
            g = _guide_tile(tq_ptr, tk_ptr, row0, col0, N, M, DT, stride_tqn, stride_tqd,
                            stride_tkn, stride_tkd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST,
                            FN_SPACE)
            S, valid, target = _general_tile(c, g, s, b, rows, cols, N, M, offset, row_meta,
                                             clab_ptr, thr_ptr, rid_ptr, cid_ptr, LABELS,
                                             EXCLUDE_SELF, FN_SPACE, FN_IDS)
            if COUNT:
                above = (target == 0) & valid & (S > thr[:, None])
                l_i += tl.sum(above.to(tl.float32), 1)
            elif KIND == 0:
                if EXCLUDE_TARGETS:
                    Sm = tl.where(valid & (target == 0), S, float("-inf"))
                else:
                    Sm = tl.where(valid, S, float("-inf"))
                tile_max = tl.max(Sm, 1)
                m_new = tl.maximum(m_i, tile_max)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                if LSE_LO:
                    l_i = (l_i * _exp(m_i - m_safe).to(tl.float64)
                           + _exp_sum64(_exp(Sm - m_safe[:, None]), 1))
                else:
                    l_i = l_i * _exp(m_i - m_safe) + tl.sum(_exp(Sm - m_safe[:, None]), 1)
                m_old = m_i
                m_i = m_new
                if LSE2:
                    S2 = Sm * ratio2
                    m2_new = tl.maximum(m2_i, tl.max(S2, 1))
                    m2_safe = tl.where(m2_new == float("-inf"), 0.0, m2_new)
                    l2_i = l2_i * _exp(m2_i - m2_safe) + tl.sum(_exp(S2 - m2_safe[:, None]), 1)
                    m2_i = m2_new
                if SOFT_SIM:  # teacher softmax targets: online LSE and rescaled weighted sums,
                    # taken of S - m and St - mt (the running maxima; ~0 on a dominant entry) so
                    # that lse - target and sum Tt St - LSEt come out without cancelling two ~|S|
                    # values (moving to a new maximum m' adds (m - m') sum e: 0 on the first tile)
                    c2 = _similarity_tile(tq_ptr, tk_ptr, row0, col0, N, M, DT, stride_tqn, stride_tqd,
                                          stride_tkn, stride_tkd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
                                          UPCAST, False)
                    St = tl.where(valid, c2 * ts, 0.0)
                    mt_new = tl.maximum(mt_i, tl.max(tl.where(valid, St, float("-inf")), 1))
                    mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
                    alpha = _exp(mt_i - mt_safe)
                    e = tl.where(valid, _exp(St - mt_safe[:, None]), 0.0)
                    lt32 = lt_i.to(tl.float32)
                    seen = lt32 > 0
                    pos_i = (pos_i + (tl.where(seen, m_old, m_safe) - m_safe) * lt32) * alpha + \
                        tl.sum(e * tl.where(valid, S - m_safe[:, None], 0.0), 1)
                    tt_i = (tt_i + (tl.where(seen, mt_i, mt_safe) - mt_safe) * lt32) * alpha + \
                        tl.sum(e * (St - mt_safe[:, None]), 1)
                    if LSE_LO:
                        lt_i = lt_i * alpha.to(tl.float64) + _exp_sum64(e, 1)
                    else:
                        lt_i = lt_i * alpha + tl.sum(e, 1)
                    mt_i = mt_new
                    if LSE_LO:  # (for correct_line_totals; through int64: Triton 3.0's
                        # interpreter keeps argmax's int64 under int32)
                        t_arg = tl.argmax(Sm, 1).to(tl.int64).to(tl.int32)
                        arg_i = tl.where(tile_max > m_old, col0 + t_arg, arg_i)
                    npos_i += tl.sum(tl.where(target, S, 0.0), 1)  # the index target's logit
                elif TARGET_LSE:
                    St = tl.where(target, S, float("-inf"))
                    mt_new = tl.maximum(mt_i, tl.max(St, 1))
                    mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
                    # the target count reduced with a sum over S: in the tile's own layout
                    t_sum, t_cnt = tl.reduce((_exp(St - mt_safe[:, None]), target.to(tl.float32)),
                                             1, _sum_pair)
                    pos_i = pos_i * _exp(mt_i - mt_safe) + t_sum
                    npos_i += t_cnt
                    mt_i = mt_new
                else:
                    t_sum, t_cnt = tl.reduce((tl.where(target, S, 0.0), target.to(tl.float32)), 1,
                                             _sum_pair)
                    pos_i += t_sum
                    npos_i += t_cnt
                if SYMMETRIC:
                    ctgt = _col_targets(cols, M, offset, cpos_ptr, HAS_CPOS)
                    col_target = valid & (rows[:, None] == ctgt[None, :])
                    if EXCLUDE_TARGETS:
                        Sc = tl.where(valid & (col_target == 0), S, float("-inf"))
                    else:
                        Sc = Sm
                    cm = tl.max(Sc, 0)
                    cm_safe = tl.where(cm == float("-inf"), 0.0, cm)
                    if LSE_LO:
                        part, lo = _lse_parts(cm, _exp_sum64(_exp(Sc - cm_safe[None, :]), 0))
                        tl.store(col_lo_ptr + pid.to(tl.int64) * M + cols, lo, mask=cmask)
                    else:
                        part = cm_safe + tl.log(tl.sum(_exp(Sc - cm_safe[None, :]), 0))
                    tl.store(col_part_ptr + pid.to(tl.int64) * M + cols, part, mask=cmask)
                    tl.store(col_ref_ptr + pid.to(tl.int64) * n_col_tiles + col0 // TILE_N,
                             float("-inf"))  # marks natural-log partials
                    hit = tl.max(col_target.to(tl.int32), 0) > 0
                    tl.store(col_pos_ptr + cols.to(tl.int64), tl.sum(tl.where(col_target, S, 0.0), 0),
                             mask=cmask & hit)
            else:
                l_i += _sigmoid_row_losses(S, valid, target, BLOCK_N, SP_SERIES)

        if COUNT:
            tl.store(row_lse_ptr + r64, l_i, mask=rmask)
        else:
            if TILES == 1:  # the plain tiles' launch continues from here
                if KIND == 0 and LSE_LO:
                    hi, lo = _lse_parts(m_i, l_i)
                    tl.store(row_init_ptr + r64, hi, mask=rmask)
                    tl.store(row_init_ptr + N + r64, lo, mask=rmask)
                elif KIND == 0:
                    tl.store(row_init_ptr + r64, m_i + tl.log(l_i), mask=rmask)
                else:
                    tl.store(row_init_ptr + r64, l_i, mask=rmask)
            elif KIND == 0 and LSE_LO:
                hi, lo = _lse_parts(m_i, l_i)
                tl.store(row_lse_ptr + r64, hi, mask=rmask)
                tl.store(row_lo_ptr + r64, lo, mask=rmask)
            elif KIND == 0:
                tl.store(row_lse_ptr + r64, m_i + tl.log(l_i), mask=rmask)
            else:
                tl.store(row_lse_ptr + r64, l_i, mask=rmask)
            if LSE2:
                tl.store(aux_ptr + 2 * N + r64, m2_i + tl.log(l2_i), mask=rmask)
            if SOFT_SIM:  # row_pos = sum_j T_ij S_ij, T = w Tt + (1 - w) [j = p(i)], as m + delta
                # rounded to float32 (hi, lo); aux = (teacher LSE, sum_j Tt_ij St_ij - teacher LSE,
                # row_pos's lo, the column of the row's largest logit as int32 bits)
                lt_safe = tl.where(lt_i > 0, lt_i, 1.0)  # padding rows have no teacher mass
                log_lt = tl.log(lt_safe).to(tl.float32)
                lt_safe = lt_safe.to(tl.float32)
                m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
                delta = tw * (pos_i / lt_safe) + (1.0 - tw) * (npos_i - m_fin)
                pos_hi, pos_lo = _two_sum(m_fin, delta)
                tl.store(row_pos_ptr + r64, pos_hi, mask=rmask)
                tl.store(row_npos_ptr + r64, tl.full((BLOCK_M,), 1.0, dtype=tl.float32), mask=rmask)
                tl.store(aux_ptr + r64, mt_i + log_lt, mask=rmask)
                tl.store(aux_ptr + N + r64, tt_i / lt_safe - log_lt, mask=rmask)
                tl.store(aux_ptr + 2 * N + r64, pos_lo, mask=rmask)
                tl.store(aux_ptr + 3 * N + r64, arg_i.to(tl.float32, bitcast=True), mask=rmask)
            else:
                if TARGET_LSE:
                    tl.store(row_pos_ptr + r64, mt_i + tl.log(pos_i), mask=rmask)
                else:
                    tl.store(row_pos_ptr + r64, pos_i, mask=rmask)
                tl.store(row_npos_ptr + r64, npos_i, mask=rmask)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _backward_rows_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, pos_ptr, tw_ptr, cpos_ptr, rlab_ptr, clab_ptr, thr_ptr, rid_ptr,
    cid_ptr,
    tq_ptr, tk_ptr, tscale_ptr, aux_ptr, DT, stride_tqn, stride_tqd, stride_tkn, stride_tkd,
    row_lse_ptr, row_pos_ptr, row_npos_ptr, col_lse_ptr, g_row_ptr, g_rpos_ptr, g_col_ptr, g_cpos_ptr,
    g_l2_ptr, dq_ptr, part_ptr, dsb_ptr, rt_ptr, N, M, D, offset, ratio2,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_dqn, stride_gr, stride_grp, stride_gc, stride_gcp,
    stride_gl2,
    KIND: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_CPOS: tl.constexpr, LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    EXCLUDE_TARGETS: tl.constexpr, TARGET_LSE: tl.constexpr, FN_SPACE: tl.constexpr,
    FN_IDS: tl.constexpr, SOFT_SIM: tl.constexpr, LSE2: tl.constexpr, TARGET_K: tl.constexpr,
    PLAIN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, COMPUTE_DQ: tl.constexpr,
    COMPUTE_SB: tl.constexpr,
    COMPUTE_SBC: tl.constexpr, GRAM: tl.constexpr, SELF_SYM: tl.constexpr, RESIDENT: tl.constexpr,
    TILES: tl.constexpr,
    SPAN_M: tl.constexpr, SPAN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LINE_SUMS: tl.constexpr = False, ROW_LOSS: tl.constexpr = False, SP_SERIES: tl.constexpr = False,
):
    # Backward over one row block (and one chunk of D for dQ):
    #   dS_ij = a_i P_ij + b_i dT_ij + ac_j Pc_ij + bc_j Tc_ij   (softmax; a, b, ac, bc are the
    #           gradients of row_lse, the target statistic, col_lse, col_pos; dT = T / npos)
    #   dS_ij = -a_i z_ij sigmoid(-z_ij S_ij)                   (sigmoid)
    #   dQ_i = s sum_j dS_ij k_j;  d_scale += sum dS_ij c_ij;  d_bias += sum dS_ij
    #   (softmax: the scale sum centred, sum R_ij (c_ij - m_i) + sum C_ij (c_ij - n_j) for dS's row
    #   and column parts R, C; the launcher adds the rest, see _centres)
    # 1. load the rows' statistics (row_lse, weights g_i, 1/npos_i) and targets;
    # 2. for each column block: recompute c and S, the masks, and dS from the statistics
    #    (TARGET_K weighted index targets per row: T's tile from K compares, _weighted_targets);
    # 3. accumulate dS . K[:, d chunk] in float32 (inputs' dtype on the tensor cores);
    # 4. accumulate the scale/bias partial sums (first D chunk only) and store everything:
    #    COMPUTE_SB the row part's, centred on the rows; COMPUTE_SBC (symmetric closures) the
    #    column part's apart, centred entry by entry on the columns (without it, a symmetric
    #    closure's sums are of dS as a whole, uncentred: 16-bit features, see the launcher);
    #    LINE_SUMS each row's sum of its row part R_ij as formed (correct_line_totals; with
    #    COMPUTE_DQ off the sweep computes sums only).
    # ROW_LOSS (sigmoid, the step: no forward sweep before it): step 2 also sums each row's loss
    # sum_j softplus(-z_ij S_ij) from the same tiles (SP_SERIES as in the forward), stored where
    # LINE_SUMS stores its sums (the two are never asked for together).
    # GRAM (queries are the keys, softmax, no column statistics): S is symmetric, so the whole
    # gradient of row i, s sum_j (dS_ij + dS_ji) z_j, comes from the same tiles using the
    # statistics of rows j too -- the column kernel is not needed.
    # SELF_SYM: the symmetric closure of a self-similarity (its column statistics are the rows'),
    # whose column terms are its row terms transposed: the scale / bias sums of the row terms.
    # RESIDENT (BLOCK_D = BLOCK_DV >= D): the row block's features are loaded once; each key tile
    # serves both products (S and dS . K), so there is no D loop.
    # TILES: 0 = every column tile; split launches over the (SPAN_M x SPAN_N) tiling: 1 = the
    # band and edge tiles, storing the float32 sums of step 3 in part; 2 = the interior tiles on
    # the lean path only, continuing from part, then step 4.
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    row0 = pid * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dvmask = dv < D
    s, b = _scale_bias(scale_ptr, bias_ptr, HAS_BIAS)
    row_meta = _row_targets(rows, N, offset, pos_ptr, rlab_ptr, HAS_POS, LABELS, TARGET_K)
    lse_r, a_r, b_r, t_r, l2_r, a2_r = _row_grad_meta(
        rows, N, row_lse_ptr, row_pos_ptr, row_npos_ptr, g_row_ptr, g_rpos_ptr, stride_gr, stride_grp,
        aux_ptr, g_l2_ptr, stride_gl2, KIND, TARGET_LSE, LSE2)

    part = part_ptr + rows.to(tl.int64)[:, None] * D + dv.to(tl.int64)[None, :]
    if TILES == 2 and COMPUTE_DQ:  # continue the band launch's float32 sums
        acc = tl.load(part, mask=rmask[:, None] & dvmask[None, :], other=0.0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_cs = tl.zeros((BLOCK_M,), dtype=tl.float32)  # COMPUTE_SBC: the column part's sums
    acc_cb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_rt = tl.zeros((BLOCK_M,), dtype=tl.float32)  # LINE_SUMS
    if RESIDENT:  # BLOCK_D = BLOCK_DV >= D: the row block's features, loaded once
        q_res = _feature_block(q_ptr, row0, N, D, stride_qn, stride_qd, BLOCK_M, BLOCK_D)
    # split launches (TILES 1, 2): the spans of the interior tiling (SPAN_M x SPAN_N)
    lo_end, hi_start, hi_end = _plain_spans(row0 // SPAN_M * SPAN_M, N, M, offset, SPAN_M, SPAN_N)
    a0, a_len, b0, n_sweep = _sweep(TILES, lo_end, hi_start, hi_end, M)
    for u in range(0, n_sweep, BLOCK_N):
        col0 = tl.where(u < a_len, a0 + u, b0 + (u - a_len))
        cols = col0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        if RESIDENT:  # one product with the key tile, reused for dQ
            kt = _feature_block(k_ptr, col0, M, D, stride_kn, stride_kd, BLOCK_N, BLOCK_D)
            c = tl.dot(_operand(q_res, UPCAST), _operand(tl.trans(kt), UPCAST),
                       input_precision=PRECISION)
        else:
            c = _similarity_tile(q_ptr, k_ptr, row0, col0, N, M, D, stride_qn, stride_qd,
                                 stride_kn, stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST,
                                 False)
        dS, S, valid, target, rs, rb, cs, cb, loss = _tile_grad(
            c, row0, col0, rows, cols, N, M, offset, s, b, row_meta, lse_r, a_r, b_r, t_r, l2_r,
            a2_r, ratio2,
            pos_ptr, tw_ptr, cpos_ptr, clab_ptr, thr_ptr, rid_ptr, cid_ptr, tq_ptr, tk_ptr, tscale_ptr,
            aux_ptr, DT,
            stride_tqn, stride_tqd, stride_tkn, stride_tkd,
            col_lse_ptr, g_col_ptr, g_cpos_ptr, stride_gc, stride_gcp,
            KIND, SYMMETRIC, HAS_POS, HAS_CPOS, LABELS, EXCLUDE_SELF, EXCLUDE_TARGETS, TARGET_LSE,
            FN_SPACE, FN_IDS, SOFT_SIM, LSE2, TARGET_K, PLAIN, PRECISION, UPCAST, BLOCK_M, BLOCK_N,
            BLOCK_D,
            TILES == 2, SELF_SYM, COMPUTE_SBC, 1, LINE_SUMS, ROW_LOSS, SP_SERIES)
        if LINE_SUMS:
            acc_rt += rb
        if ROW_LOSS:
            acc_rt += loss
        if COMPUTE_DQ:
            if RESIDENT:
                kv = kt
            else:
                kv = tl.load(k_ptr + cols.to(tl.int64)[:, None] * stride_kn
                             + dv.to(tl.int64)[None, :] * stride_kd,
                             mask=cmask[:, None] & dvmask[None, :], other=0.0)
            if GRAM:
                dS_all = dS + _grad_logits_transposed(
                    S, valid, target, rows, cols, M, offset, ratio2, pos_ptr, rlab_ptr, row_lse_ptr,
                    row_pos_ptr, row_npos_ptr, g_row_ptr, g_rpos_ptr, stride_gr, stride_grp, aux_ptr,
                    g_l2_ptr, stride_gl2, KIND, HAS_POS, LABELS, TARGET_K, EXCLUDE_TARGETS,
                    TARGET_LSE, LSE2)
            else:
                dS_all = dS
            acc = tl.dot(_operand(_lowp(dS_all, kv.dtype, UPCAST), UPCAST), _operand(kv, UPCAST), acc,
                         input_precision=PRECISION)
        if COMPUTE_SB:
            if SELF_SYM or COMPUTE_SBC:  # the row part apart
                acc_s += rs
                acc_b += rb
            else:  # dS is the row part, or (symmetric, 16-bit) both parts uncentred
                acc_s += tl.sum(dS * c, 1)
                acc_b += tl.sum(dS, 1)
        if COMPUTE_SBC:
            acc_cs += cs
            acc_cb += cb

    if COMPUTE_DQ:
        if TILES == 1:  # the interior launch continues from these sums
            tl.store(part, acc, mask=rmask[:, None] & dvmask[None, :])
        else:
            out = dq_ptr + rows.to(tl.int64)[:, None] * stride_dqn + dv.to(tl.int64)[None, :]
            tl.store(out, _lowp(acc * s, dq_ptr.dtype.element_ty, UPCAST),
                     mask=rmask[:, None] & dvmask[None, :])
    if COMPUTE_SB:
        first = pid_d == 0
        if not SELF_SYM:  # (SELF_SYM: the row part's sums came centred)
            if COMPUTE_SBC or not SYMMETRIC:
                acc_s -= _centres(lse_r, s, b, M, KIND) * acc_b
        tl.store(dsb_ptr + pid.to(tl.int64) * 2, tl.sum(acc_s, 0) + tl.sum(acc_cs, 0), mask=first)
        tl.store(dsb_ptr + pid.to(tl.int64) * 2 + 1, tl.sum(acc_b, 0) + tl.sum(acc_cb, 0),
                 mask=first)
    if LINE_SUMS or ROW_LOSS:
        tl.store(rt_ptr + rows.to(tl.int64), acc_rt, mask=rmask & (pid_d == 0))


@triton.jit
def _backward_cols_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, pos_ptr, tw_ptr, cpos_ptr, rlab_ptr, clab_ptr, thr_ptr, rid_ptr,
    cid_ptr,
    tq_ptr, tk_ptr, tscale_ptr, aux_ptr, DT, stride_tqn, stride_tqd, stride_tkn, stride_tkd,
    row_lse_ptr, row_pos_ptr, row_npos_ptr, col_lse_ptr, g_row_ptr, g_rpos_ptr, g_col_ptr, g_cpos_ptr,
    g_l2_ptr, dk_ptr, part_ptr, dsb_ptr, ct_ptr, N, M, D, offset, ratio2,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_dkn, stride_gr, stride_grp, stride_gc, stride_gcp,
    stride_gl2,
    KIND: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_CPOS: tl.constexpr, LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    EXCLUDE_TARGETS: tl.constexpr, TARGET_LSE: tl.constexpr, FN_SPACE: tl.constexpr,
    FN_IDS: tl.constexpr, SOFT_SIM: tl.constexpr, LSE2: tl.constexpr, TARGET_K: tl.constexpr,
    PLAIN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, COMPUTE_SB: tl.constexpr,
    RESIDENT: tl.constexpr,
    TILES: tl.constexpr, SPAN_M: tl.constexpr, SPAN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LINE_SUMS: tl.constexpr = False, COMPUTE_DK: tl.constexpr = True,
):
    # Backward over one column block (and one chunk of D for dK), the transpose of the rows kernel:
    #   dK_j = s sum_i dS_ij q_i, with dS_ij as in _backward_rows_kernel.
    # 1. for each row block: load the rows' statistics and targets, recompute c, S, the masks and
    #    dS (the columns' statistics are read with the tile);
    # 2. accumulate dS^T . Q[:, d chunk]; 3. scale/bias partial sums when asked (only dK is
    #    needed: the row part's and the symmetric closure's column part's, centred entry by
    #    entry); store. LINE_SUMS (symmetric): each column's sum of its column part C_ij as
    #    formed (correct_line_totals; with COMPUTE_DK off the sweep computes sums only).
    # RESIDENT and TILES as in the rows kernel, transposed: the column block's keys stay loaded,
    # the split launches sweep the row tiles of this column block's spans (_plain_row_spans).
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    col0 = pid * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    cmask = cols < M
    dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dvmask = dv < D
    s, b = _scale_bias(scale_ptr, bias_ptr, HAS_BIAS)
    part = part_ptr + cols.to(tl.int64)[:, None] * D + dv.to(tl.int64)[None, :]
    if TILES == 2 and COMPUTE_DK:  # continue the band launch's float32 sums
        acc = tl.load(part, mask=cmask[:, None] & dvmask[None, :], other=0.0)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # the column part's sums (symmetric)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_rs = tl.zeros((BLOCK_M,), dtype=tl.float32)  # the row part's sums
    acc_rb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_ct = tl.zeros((BLOCK_N,), dtype=tl.float32)  # LINE_SUMS
    if RESIDENT:  # BLOCK_D = BLOCK_DV >= D: the column block's features, loaded once
        k_res = _feature_block(k_ptr, col0, M, D, stride_kn, stride_kd, BLOCK_N, BLOCK_D)
    # split launches (TILES 1, 2): the spans of the interior tiling (SPAN_M x SPAN_N)
    lo_end, hi_start, hi_end = _plain_row_spans(col0 // SPAN_N * SPAN_N, N, M, offset, SPAN_M,
                                                SPAN_N)
    a0, a_len, b0, n_sweep = _sweep(TILES, lo_end, hi_start, hi_end, N)
    for u in range(0, n_sweep, BLOCK_M):
        row0 = tl.where(u < a_len, a0 + u, b0 + (u - a_len))
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < N
        row_meta = _row_targets(rows, N, offset, pos_ptr, rlab_ptr, HAS_POS, LABELS, TARGET_K)
        lse_r, a_r, b_r, t_r, l2_r, a2_r = _row_grad_meta(
            rows, N, row_lse_ptr, row_pos_ptr, row_npos_ptr, g_row_ptr, g_rpos_ptr, stride_gr,
            stride_grp, aux_ptr, g_l2_ptr, stride_gl2, KIND, TARGET_LSE, LSE2)
        if RESIDENT:  # one product with the query tile, reused for dK
            qt = _feature_block(q_ptr, row0, N, D, stride_qn, stride_qd, BLOCK_M, BLOCK_D)
            c = tl.dot(_operand(qt, UPCAST), _operand(tl.trans(k_res), UPCAST),
                       input_precision=PRECISION)
        else:
            c = _similarity_tile(q_ptr, k_ptr, row0, col0, N, M, D, stride_qn, stride_qd,
                                 stride_kn, stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST,
                                 False)
        dS, S, valid, target, rs, rb, cs, cb, loss = _tile_grad(
            c, row0, col0, rows, cols, N, M, offset, s, b, row_meta, lse_r, a_r, b_r, t_r, l2_r,
            a2_r, ratio2,
            pos_ptr, tw_ptr, cpos_ptr, clab_ptr, thr_ptr, rid_ptr, cid_ptr, tq_ptr, tk_ptr, tscale_ptr,
            aux_ptr, DT,
            stride_tqn, stride_tqd, stride_tkn, stride_tkd,
            col_lse_ptr, g_col_ptr, g_cpos_ptr, stride_gc, stride_gcp,
            KIND, SYMMETRIC, HAS_POS, HAS_CPOS, LABELS, EXCLUDE_SELF, EXCLUDE_TARGETS, TARGET_LSE,
            FN_SPACE, FN_IDS, SOFT_SIM, LSE2, TARGET_K, PLAIN, PRECISION, UPCAST, BLOCK_M, BLOCK_N,
            BLOCK_D,
            TILES == 2, COMPUTE_SB, COMPUTE_SB, 0, LINE_SUMS)
        if LINE_SUMS:
            acc_ct += cb
        if COMPUTE_DK:
            if RESIDENT:
                qv = qt
            else:
                qv = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qn
                             + dv.to(tl.int64)[None, :] * stride_qd,
                             mask=rmask[:, None] & dvmask[None, :], other=0.0)
            acc = tl.dot(_operand(_lowp(tl.trans(dS), qv.dtype, UPCAST), UPCAST), _operand(qv, UPCAST),
                         acc, input_precision=PRECISION)
        if COMPUTE_SB:
            acc_rs += rs
            acc_rb += rb
            if SYMMETRIC:
                acc_s += cs
                acc_b += cb

    if COMPUTE_DK:
        if TILES == 1:  # the interior launch continues from these sums
            tl.store(part, acc, mask=cmask[:, None] & dvmask[None, :])
        else:
            out = dk_ptr + cols.to(tl.int64)[:, None] * stride_dkn + dv.to(tl.int64)[None, :]
            tl.store(out, _lowp(acc * s, dk_ptr.dtype.element_ty, UPCAST),
                     mask=cmask[:, None] & dvmask[None, :])
    if LINE_SUMS:
        tl.store(ct_ptr + cols.to(tl.int64), acc_ct, mask=cmask & (pid_d == 0))
    if COMPUTE_SB:
        first = pid_d == 0
        tl.store(dsb_ptr + pid.to(tl.int64) * 2, tl.sum(acc_s, 0) + tl.sum(acc_rs, 0), mask=first)
        tl.store(dsb_ptr + pid.to(tl.int64) * 2 + 1, tl.sum(acc_b, 0) + tl.sum(acc_rb, 0),
                 mask=first)


@triton.jit
def _grad_tiles_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, pos_ptr, tw_ptr, cpos_ptr, rlab_ptr, clab_ptr, thr_ptr, rid_ptr,
    cid_ptr,
    tq_ptr, tk_ptr, tscale_ptr, aux_ptr, DT, stride_tqn, stride_tqd, stride_tkn, stride_tkd,
    row_lse_ptr, row_pos_ptr, row_npos_ptr, col_lse_ptr, g_row_ptr, g_rpos_ptr, g_col_ptr, g_cpos_ptr,
    g_l2_ptr, ds_ptr, dsb_ptr, rt_ptr, ct_ptr, N, M, D, offset, ratio2, row_start, col_start,
    n_rows_blk, n_cols_blk,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_ds, stride_gr, stride_grp, stride_gc, stride_gcp,
    stride_gl2,
    KIND: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_CPOS: tl.constexpr, LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    EXCLUDE_TARGETS: tl.constexpr, TARGET_LSE: tl.constexpr, FN_SPACE: tl.constexpr,
    FN_IDS: tl.constexpr, SOFT_SIM: tl.constexpr, LSE2: tl.constexpr, TARGET_K: tl.constexpr,
    PLAIN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, COMPUTE_SB: tl.constexpr,
    COMPUTE_SBC: tl.constexpr, SELF_SYM: tl.constexpr,
    TILES: tl.constexpr, SPAN_M: tl.constexpr, SPAN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LINE_SUMS: tl.constexpr = False, GRAM: tl.constexpr = False, ROW_LOSS: tl.constexpr = False,
    SP_SERIES: tl.constexpr = False,
):
    # Backward for wide features: one tile per program writes dL/dS (same closure as the fused
    # kernels), times s, into the block [row_start, row_start + R) x [col_start, col_start + W) of
    # the matrix, a buffer in the inputs' dtype with row stride stride_ds; the launcher then forms
    # dQ += (s dS) K and dK += (s dS)^T Q with tensor-core GEMMs. Costs 2 N M D (recompute) +
    # 4 N M D (GEMMs) FLOPs and 3 passes over the block, instead of recomputing S once per D chunk
    # of the fused kernels.
    # 1. load the rows' statistics; 2. recompute the tile and dS; 3. store dS and the tile's
    # scale / bias partial sums; LINE_SUMS: the tile's sums of the row part per row at
    # rt[pid_n, row - row_start] and (symmetric) of the column part per column at
    # ct[pid_m, col - col_start], as formed (correct_line_totals); ROW_LOSS (sigmoid, the step)
    # the tile's row sums of the loss softplus(-z_ij S_ij) at the same place as LINE_SUMS' rows.
    # TILES (lean closures): 0 = every tile; split launches over the SPAN_M x SPAN_N tiling of
    # the matrix: 1 = the tiles of non-plain spans (the band and the edges), 2 = the plain spans
    # (BLOCK = SPAN) on the lean path only; the other launch's programs return at once.
    # GRAM (as in the rows kernel: the queries are the keys, dS taken one row at a time): the
    # tile stores dS_ij + dS_ji, the second term from the statistics of rows j, so that the rows'
    # GEMM (s dS) Q gives the whole gradient; its sums are those of dS_ij alone (the row part).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    row0 = row_start + pid_m * BLOCK_M
    col0 = col_start + pid_n * BLOCK_N
    if TILES == 0:
        work = True
    else:
        plain = _plain_tile(row0 // SPAN_M * SPAN_M, col0 // SPAN_N * SPAN_N, N, M, offset, SPAN_M,
                            SPAN_N)
        work = plain == (TILES == 2)
    if work:
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = col0 + tl.arange(0, BLOCK_N)
        s, b = _scale_bias(scale_ptr, bias_ptr, HAS_BIAS)
        row_meta = _row_targets(rows, N, offset, pos_ptr, rlab_ptr, HAS_POS, LABELS, TARGET_K)
        lse_r, a_r, b_r, t_r, l2_r, a2_r = _row_grad_meta(
            rows, N, row_lse_ptr, row_pos_ptr, row_npos_ptr, g_row_ptr, g_rpos_ptr, stride_gr,
            stride_grp, aux_ptr, g_l2_ptr, stride_gl2, KIND, TARGET_LSE, LSE2)
        c = _similarity_tile(q_ptr, k_ptr, row0, col0, N, M, D, stride_qn, stride_qd, stride_kn,
                             stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST, False)
        dS, S, valid, target, rs, rb, cs, cb, loss = _tile_grad(
            c, row0, col0, rows, cols, N, M, offset, s, b, row_meta, lse_r, a_r, b_r, t_r, l2_r,
            a2_r, ratio2,
            pos_ptr, tw_ptr, cpos_ptr, clab_ptr, thr_ptr, rid_ptr, cid_ptr, tq_ptr, tk_ptr, tscale_ptr,
            aux_ptr, DT,
            stride_tqn, stride_tqd, stride_tkn, stride_tkd,
            col_lse_ptr, g_col_ptr, g_cpos_ptr, stride_gc, stride_gcp,
            KIND, SYMMETRIC, HAS_POS, HAS_CPOS, LABELS, EXCLUDE_SELF, EXCLUDE_TARGETS, TARGET_LSE,
            FN_SPACE, FN_IDS, SOFT_SIM, LSE2, TARGET_K, PLAIN, PRECISION, UPCAST, BLOCK_M, BLOCK_N,
            BLOCK_D,
            TILES == 2, False, False, 0, LINE_SUMS, ROW_LOSS, SP_SERIES)
        if LINE_SUMS or ROW_LOSS:
            if ROW_LOSS:
                rb = loss
            rin = (rows < N) & (rows - row_start < n_rows_blk)
            tl.store(rt_ptr + pid_n.to(tl.int64) * n_rows_blk + (rows - row_start), rb, mask=rin)
            if SYMMETRIC:
                cin = (cols < M) & (cols - col_start < n_cols_blk)
                tl.store(ct_ptr + pid_m.to(tl.int64) * n_cols_blk + (cols - col_start), cb,
                         mask=cin)
        if GRAM:
            dS_all = dS + _grad_logits_transposed(
                S, valid, target, rows, cols, M, offset, ratio2, pos_ptr, rlab_ptr, row_lse_ptr,
                row_pos_ptr, row_npos_ptr, g_row_ptr, g_rpos_ptr, stride_gr, stride_grp, aux_ptr,
                g_l2_ptr, stride_gl2, KIND, HAS_POS, LABELS, TARGET_K, EXCLUDE_TARGETS, TARGET_LSE,
                LSE2)
        else:
            dS_all = dS
        out = (ds_ptr + (rows - row_start).to(tl.int64)[:, None] * stride_ds
               + (cols - col_start)[None, :])
        tl.store(out, _lowp(dS_all * s, ds_ptr.dtype.element_ty, UPCAST),
                 mask=(rows < N)[:, None] & (cols < M)[None, :])
        if COMPUTE_SB:  # scale / bias sums as in the fused kernels, centred on the rows (and,
            # COMPUTE_SBC, the column part on the columns)
            slot = (pid_m.to(tl.int64) * tl.num_programs(1) + pid_n) * 2
            if SELF_SYM or COMPUTE_SBC:
                tot_s = tl.sum(rs - _centres(lse_r, s, b, M, KIND) * rb, 0)
                tot_b = tl.sum(rb, 0)
                if COMPUTE_SBC:
                    lse_c = tl.load(col_lse_ptr + cols.to(tl.int64), mask=cols < M, other=0.0)
                    tot_s += tl.sum(cs - _centres(lse_c, s, b, N, KIND) * cb, 0)
                    tot_b += tl.sum(cb, 0)
            else:
                rb = tl.sum(dS, 1)
                rs = tl.sum(dS * c, 1)
                if not SYMMETRIC:
                    rs -= _centres(lse_r, s, b, M, KIND) * rb
                tot_s = tl.sum(rs, 0)
                tot_b = tl.sum(rb, 0)
            tl.store(dsb_ptr + slot, tot_s)
            tl.store(dsb_ptr + slot + 1, tot_b)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _arch(device: torch.device) -> int:
    """Compute capability as 10 * major + minor (a cached host query, no synchronisation)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _config(queries: torch.Tensor, pass_: str, lean: bool = True, exact: bool = False) -> dict:
    return config_for(queries.device.type, queries.dtype, queries.shape[1], pass_,
                      _arch(queries.device), lean, exact)


def _fused_width(dtype: torch.dtype, arch: int) -> int:
    """Widest D chunk a fused backward program accumulates: 256 for 16-bit features on Hopper
    (warpgroup MMAs keep the accumulator compact), 128 otherwise (wider spills registers)."""
    return 256 if (dtype != torch.float32 and arch >= 90) else 128


def config_for(device_type: str, dtype: torch.dtype, D: int, pass_: str, arch: int = 90,
               lean: bool = True, exact: bool = False) -> dict:
    """Fixed block sizes per (device, dtype, D range) for pass_ "fwd", "fwd_plain" (the interior
    tiles' launch of the forward; its tile shape is the forward's whole tiling when it runs),
    "bwd" or "bwd_gram", on a CUDA device of compute capability ``arch`` (10 * major + minor), for
    a closure whose interior tiles take the lean path (``lean``: the fused backward can then keep
    its feature block resident without spilling), with IEEE float32 products when ``exact`` (FMA
    loops, not the tensor cores); ``config_override`` wins."""
    if device_type != "cuda":  # interpreter: small tiles keep CPU runs fast
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=16, BLOCK_DV=32, num_warps=4, num_stages=1)
    elif pass_ == "dense_plain":
        # the wide-feature backward's dS tiles inside plain spans (the lean path alone fits
        # 128 x 128 without spilling; the band launch keeps the "fwd" tiles)
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=32 if dtype == torch.float32 else 64,
                   num_warps=8, num_stages=3)
    elif dtype == torch.float32 and pass_ == "fwd_plain":
        # TF32 interior tiles: as wide as the 16-bit ones (half the D step, same bytes per stage);
        # 64 x 64 tiles issue ~2 clocks per tensor-core clock (bench/ANALYSIS.md). IEEE products:
        # FMA loops, 64 x 64 (128 x 128 spills inside the loop; 128 x 64 too once the band launch
        # keeps its LSEs' lo parts, LSE_LO)
        cfg = dict(BLOCK_M=64 if exact else 128, BLOCK_N=64 if exact else 128, BLOCK_D=32,
                   num_warps=4 if exact else 8, num_stages=3)
    elif dtype == torch.float32:  # TF32 / fp32 tiles are twice the bytes: smaller row blocks
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=8, num_stages=2)
    elif pass_ == "fwd_plain":
        # Without the masked path in the same kernel, a 128 x 128 tile fits in registers: twice
        # the tensor-core work per tile for the same per-row epilogue; with D <= 256 the query
        # block stays in shared memory (~200 KiB with two key stages at D = 256: Hopper only).
        # See bench/ANALYSIS.md.
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3,
                   RESIDENT=arch >= 90)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=3)
    if pass_ in ("bwd", "bwd_gram", "bwd_rows_plain", "bwd_cols_plain") and device_type == "cuda":
        # dQ / dK accumulate a (64, BLOCK_DV) float32 tile per program; wider D is split across
        # programs (each recomputes the similarity). These sizes compile without register spills
        # on sm_90 (checked in tests/test_triton_compile.py): 16-bit features up to D = 256 in one
        # chunk, so the fused backward covers D <= 256 without recomputing S.
        widest = _fused_width(dtype, arch)
        if pass_ == "bwd_gram" and dtype == torch.float32:
            widest = 64
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64 if widest == 256 else 32,
                   BLOCK_DV=min(widest, max(16, _next_pow2(D))), num_warps=8, num_stages=2,
                   RESIDENT=widest == 256 and lean and pass_ != "bwd_gram")
        if pass_.endswith("_plain") and widest == 256:
            # interior tiles only: 128 query rows per tile (a 64-row tile is computed twice by
            # the two warpgroups of a resident program); the dQ program's 128 x 256 float32 sums
            # leave room for 32-column tiles without spilling. See bench/ANALYSIS.md.
            cfg.update(BLOCK_M=128, BLOCK_N=32 if pass_ == "bwd_rows_plain" else 64)
    pinned = {k: v for k, v in config_override.items() if k not in POLICY_KEYS and "." not in k}
    pinned.update({k.partition(".")[2]: v for k, v in config_override.items()
                   if k.partition(".")[0] == pass_})
    cfg.update(pinned)
    if "RESIDENT" not in pinned and ("BLOCK_D" in pinned or "BLOCK_DV" in pinned):
        cfg["RESIDENT"] = False  # pinned D steps are taken as asked
    if pass_ in ("fwd", "fwd_plain"):
        cfg.pop("BLOCK_DV", None)
    # RESIDENT (interior forward, fused backward): a program's own feature block stays loaded
    # across its loop and each tile is one product over the whole D, when D fits one block
    width = max(16, _next_pow2(D))
    if pass_ == "fwd_plain":
        cfg["RESIDENT"] = bool(cfg.get("RESIDENT", False)) and width <= 256
        if cfg["RESIDENT"]:
            cfg["BLOCK_D"] = width
            if width >= 256 and not any(k.endswith("num_stages") for k in config_override):
                cfg["num_stages"] = 2  # query block + 2 key tiles of 64 KiB in shared memory
    elif pass_.startswith("bwd"):
        cfg["RESIDENT"] = bool(cfg.get("RESIDENT", False)) and width <= 256
        if cfg["RESIDENT"]:
            cfg["BLOCK_D"] = cfg["BLOCK_DV"] = width
    else:
        cfg.pop("RESIDENT", None)
    if pass_ in ("fwd", "fwd_plain"):
        cfg["TMA"] = bool(cfg.get("TMA", False))
        if cfg["TMA"] and cfg.get("RESIDENT"):
            cfg["RESIDENT"] = False  # the descriptors stream the query block's D chunks
        # the interior forward's symmetric column sums on the tensor cores: 16-bit features on a
        # GPU (their bfloat16 rounding is below the features' own; float32 features keep exact
        # sums). See bench/ANALYSIS.md.
        cfg["COLSUM_MMA"] = bool(cfg.get("COLSUM_MMA", pass_ == "fwd_plain" and device_type == "cuda"
                                         and dtype != torch.float32))
    else:
        cfg.pop("TMA", None)
        cfg.pop("COLSUM_MMA", None)
    return cfg


# the wide-feature backward's dS block may take this much whatever the inputs' size; and a
# matrix whose whole dS and sums take at most 8 times this is one block: each block costs the
# host ~10 operators and 1-2 launches, which small blocks' tensor-core work does not cover
# (N = M = 4096, D = 512, bf16: 8 blocks of ~0.013 ms of tensor-core work each)
_DENSE_BYTES_MIN = 8 << 20


def _dense_backward(queries: torch.Tensor, exact_symmetric: bool = False) -> bool:
    """The backward through dS chunks + GEMMs when a row block's gradient does not fit one D chunk
    of the fused kernels (which would recompute S once per chunk: D > 256 for 16-bit features on
    Hopper, D > 128 otherwise), and for a symmetric closure with IEEE float32 products
    (``exact_symmetric``) at any D: its fused kernels spill with those products (~1.8 KB per
    rows program at D = 128, bench/ANALYSIS.md), its dS tiles do not. ``config_override["DENSE"]``
    forces either path."""
    if "DENSE" in config_override:
        return bool(config_override["DENSE"])
    return queries.device.type == "cuda" and (exact_symmetric or queries.shape[1] > _fused_width(
        queries.dtype, _arch(queries.device)))


def _split_backward(queries: torch.Tensor) -> bool:
    """Whether the fused backward of a lean closure sweeps its interior tiles in launches of their
    own ("bwd_*_plain" tiles, no masked path in the kernel: 128-row tiles fit in registers), after
    launches over the band and edge tiles: 16-bit features on Hopper with D <= 256 (where the
    fused backward keeps its feature blocks resident); ``config_override["SPLIT"]`` forces it."""
    if "SPLIT" in config_override:
        return bool(config_override["SPLIT"])
    return (queries.device.type == "cuda" and queries.dtype != torch.float32
            and _arch(queries.device) >= 90 and queries.shape[1] <= 256)


_fp32_acc_gemm_ok: Optional[bool] = None


def _fp32_acc_gemm(a: torch.Tensor) -> bool:
    """Whether this torch adds a 16-bit GEMM into a float32 tensor in place on the GPU, inside
    the GEMM (``addmm(acc, a, b, out_dtype=float32, out=acc)``: float32 sums, no rounded partial
    products). Checked once on 2 x 2 tensors of a's device: torch versions differ on the dtype
    that addmm's float32-output overload accepts for its addend, and the check raises before
    launching anything. Not inside torch.compile, which would trace the check (and may not keep
    the module's answer from a traced function): there, until an eager call has checked, the
    rounded products (the fallback of torches without the overload)."""
    global _fp32_acc_gemm_ok
    if _fp32_acc_gemm_ok is None:
        if compiling():
            return False
        try:
            m = torch.ones((2, 2), dtype=a.dtype, device=a.device)
            acc = torch.zeros((2, 2), dtype=torch.float32, device=a.device)
            torch.addmm(acc, m, m, out_dtype=torch.float32, out=acc)
            _fp32_acc_gemm_ok = True
        except (TypeError, RuntimeError, NotImplementedError):
            _fp32_acc_gemm_ok = False
    return _fp32_acc_gemm_ok


def _gemm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: list) -> None:
    """``acc += a @ b`` in place, ``acc`` float32. 16-bit operands: float32 sums inside the GEMM
    where torch can (CUDA, see _fp32_acc_gemm), else the product rounded to the operands' dtype in
    ``scratch[0]`` (allocated on first use, then reused) and added."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.device.type == "cuda" and _fp32_acc_gemm(a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        if not scratch or scratch[0].shape != acc.shape:
            scratch[:] = [torch.empty(acc.shape, dtype=a.dtype, device=a.device)]
        torch.mm(a, b, out=scratch[0])
        acc.add_(scratch[0])


_DENSE_SLABS = 4  # at most this many column slabs (twice as many: dense_plan's same_rows)


def dense_plan(N: int, M: int, D: int, elt: int, BM: int, BN: int, dk_sums: bool,
               same_rows: bool = False, rows_acc: bool = False):
    """(R, W): the dS block of the wide-feature backward, R x W entries of ``elt`` bytes, R a
    multiple of BM and W of BN, the columns in slabs of W (at most _DENSE_SLABS, or twice as many:
    ``same_rows`` below).

    General (two feature sets): the rows are swept in chunks of R within each slab; per slab dK
    accumulates over the row chunks in a W x D float32 buffer (``dk_sums``), dQ over the slabs in
    the gradient itself, rounded once per slab. The block and those sums take at most
    max(_DENSE_BYTES_MIN, (N + M) min(D, 512) elt, twice the sums): the bytes of the inputs up to
    D = 512 (beyond, the gradients themselves outweigh them). Each row chunk's dK GEMM reads and
    writes the slab's float32 sums, so narrow slabs (small sums) and long chunks are best: its
    intensity is 1 / (1/D + 1/W + 4/R) FLOP per byte for bf16.

    ``same_rows`` (a self-similarity: the queries are the keys) counts their bytes once,
    max(_DENSE_BYTES_MIN, N min(D, 512) elt).

    ``rows_acc`` (same_rows with dS + dS^T in the block, whose rows' gradient is the whole one):
    each row chunk's gradient accumulates over the slabs in an R x D float32 buffer, rounded
    once, within that budget. The GEMM's float32 traffic is then on the short side of the block
    (R x D against W x D): 1 / (1/D + 1/R + 4/W), N = M = 65536, D = 512: R = 1920, ~370.

    same_rows with dK's sums (a self-similarity's dS alone, ``config_override["DENSE_ROWS"]``
    False: its columns' part from dK, folded into the one gradient): the columns go in twice as
    many slabs, so that the sums stay a quarter of the budget (bf16) and the row chunks as long
    as the general plan's at twice the bytes (R = 3072 there, ~300 FLOP per byte); dQ is then
    rounded once per slab, 8 times.

    A matrix whose whole dS and sums take at most max(8 _DENSE_BYTES_MIN, the rows' bytes) is
    one block."""
    ceil = lambda x, m: -(-x // m) * m  # noqa: E731
    fold = same_rows and dk_sums and not rows_acc
    rows_bytes = (N if same_rows else N + M) * min(D, 512) * elt
    whole = N * M * elt + (N * D * 4 if rows_acc else M * D * 4 if dk_sums else 0)
    if whole <= max(8 * _DENSE_BYTES_MIN, rows_bytes):
        return ceil(N, BM), ceil(M, BN)
    W = ceil(-(-M // (_DENSE_SLABS * (2 if fold else 1))), BN)
    if rows_acc:
        budget = max(_DENSE_BYTES_MIN, rows_bytes)
        R = max(BM, budget // (W * elt + D * 4) // BM * BM)
    else:
        budget = max(_DENSE_BYTES_MIN, rows_bytes, 2 * W * D * 4)
        R = max(BM, (budget - (W * D * 4 if dk_sums else 0)) // (W * elt) // BM * BM)
    n_chunks = -(-N // R)  # balanced chunks
    return min(ceil(-(-N // n_chunks), BM), ceil(N, BM)), min(W, ceil(M, BN))


def _row_strides(x: torch.Tensor):
    """(row stride, feature stride) of a 2-D tensor, from its shape when it is contiguous:
    under torch.compile a view's strides can stay symbolic where its sizes are already
    specialised, and dynamo then cannot read them one by one."""
    if x.is_contiguous():
        return x.shape[1], 1
    return x.stride(0), x.stride(1)


def span_work(r0: int, r1: int, c0: int, c1: int, N: int, M: int, offset: int, BM: int,
              BN: int):
    """(band, plain): whether the block [r0, r1) x [c0, c1) of the N x M matrix, r0 and c0
    multiples of the BM x BN spans, holds a span that is not plain (the band j = i + offset or
    an edge cut by N or M) and one that is (``_plain_tile``), so that the split dS launches of
    the wide-feature backward that would have nothing to do there are not made. Closed forms,
    O(1) per block: the row spans r in [r0, r_last] and column spans c in [c0, c_last] (both
    lattices of span starts); a span is on the band when r + offset - BN < c < r + offset + BM,
    an interval longer than either step, so it meets the block's spans exactly when it meets
    their range."""
    r_last, c_last = (r1 - 1) // BM * BM, (c1 - 1) // BN * BN
    edge = (r_last + BM > N) or (c_last + BN > M)
    band = edge or max(r0, c0 - offset - BM + 1) <= min(r_last, c_last - offset + BN - 1)
    # a span inside the matrix is plain left of the band (c + BN <= r + offset: likeliest at the
    # block's first column span and last inside row span) or right of it (c >= r + offset + BM:
    # at its last inside column span and first row span)
    r_in, c_in = min(r1, N // BM * BM) - BM, min(c1, M // BN * BN) - BN
    plain = (r_in >= r0 and c_in >= c0
             and (c0 + BN <= r_in + offset or c_in >= r0 + offset + BM))
    return band, plain


class _tf32_matmul:
    """Within the block, float32 GEMMs of the wide-feature backward use TF32 (the engine's
    default precision for float32 inputs) unless ``exact``; the global setting is restored."""

    def __init__(self, enable: bool):
        self.enable = enable

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        if self.enable:
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved
        return False


def _backward_dense(queries, keys, scale, bias, targets, spec, stats, flags_args, needs, gram,
                    self_sym=False, line_sums=False, row_loss=False):
    """(dq, dk, scale / bias sums (2,)) from dS written one bounded block at a time (dense_plan:
    column slabs, row chunks within each), then multiplied on the tensor cores: dQ += dS K_slab in
    the gradient (one rounding per slab), dK_slab += dS^T Q_chunk in float32 sums per slab.
    A self-similarity whose block holds dS + dS^T (``self_sym``: the symmetric closure; ``gram``:
    the tiles add the transposed term, GRAM) has the rows' gradient as the whole one: row
    chunks, the slabs within each, dQ_chunk += dS K_slab in float32 sums per chunk, one rounding,
    no dK. ``config_override["DENSE_ROWS"] = False`` keeps the block dS alone: then ``self_sym``
    takes dK's slab sums (returned as dq), ``gram`` both GEMMs, dK's slab sums added into dQ. For
    lean closures on a GPU (``config_override["SPLIT"]`` either way) the dS tiles of plain spans
    are written by a launch of their own ("dense_plain" tiles, lean path only), the others by a
    band launch. ``row_loss`` (sigmoid): the row sums returned are each row's loss (ROW_LOSS)."""
    a_row, b_row, a_col, b_col, a2_row, col_lse, symmetric = flags_args
    need_q, need_k, need_s, need_b = needs
    rows_acc = (self_sym or gram) and config_override.get("DENSE_ROWS", True)
    if self_sym:  # one gradient: the rows' (float32 sums per row chunk) or the columns'
        need_q, need_k = (need_q or need_k, False) if rows_acc else (False, need_q or need_k)
    need_k = need_k or (gram and need_q and not rows_acc)
    N, D = queries.shape
    M = keys.shape[0]
    dev = queries.device
    cfg = dict(_config(queries, "fwd"))
    flags = _flags(queries, spec, targets, bias, linear=True, gram=gram and rows_acc)
    # lean closures: the tiles of plain spans in a launch of their own (lean path only, wider
    # tiles), the rest in a band launch with the "fwd" tiles
    split = flags["PLAIN"] and config_override.get("SPLIT", dev.type == "cuda")
    cfg_in = dict(_config(queries, "dense_plain")) if split else cfg
    for c in (cfg, cfg_in):
        for key in ("BLOCK_DV", "TMA", "RESIDENT", "COLSUM_MMA"):  # dS tiles: pointer loads
            c.pop(key, None)
    if split:
        cfg = _band_config(cfg, cfg_in["BLOCK_M"], cfg_in["BLOCK_N"])
    BM, BN = cfg_in["BLOCK_M"], cfg_in["BLOCK_N"]  # the spans
    R, W = dense_plan(N, M, D, queries.element_size(), BM, BN, need_k, same_rows=gram or rows_acc,
                      rows_acc=rows_acc)
    row_chunks = list(range(0, N, R))
    slabs = list(range(0, M, W))
    # rows_acc: row chunks outer, each summed over the slabs; else slabs outer, each summed over
    # the row chunks
    blocks = ([(r0, c0) for r0 in row_chunks for c0 in slabs] if rows_acc else
              [(r0, c0) for c0 in slabs for r0 in row_chunks])
    ds_buf = torch.empty((min(R, N), min(W, M)), dtype=queries.dtype, device=dev)
    need_sb = need_s or need_b
    launches = [(1, cfg), (2, cfg_in)] if split else [(0, cfg)]
    grids = [(triton.cdiv(min(R, N), c["BLOCK_M"]), triton.cdiv(min(W, M), c["BLOCK_N"]))
             for _, c in launches]
    tiles = [gm * gn for gm, gn in grids]
    # the tiles' scale / bias sums of one block (programs without work leave theirs at zero),
    # then added to sb_sums: O(tiles of a block), not O(N M) over the whole sweep
    dsb = torch.empty((sum(tiles), 2), dtype=torch.float32, device=dev) if need_sb else None
    sb_sums = torch.zeros(2, dtype=torch.float32, device=dev) if need_sb else None
    # gram without rows_acc: one gradient of the shared features, dK's slab sums added into dq
    # once the first slab has written every row of it (no dK beside it)
    fold = gram and need_q and not rows_acc
    dq = torch.empty((N, D), dtype=queries.dtype, device=dev) if need_q else None
    dk = torch.empty((M, D), dtype=keys.dtype, device=dev) if need_k and not fold else None
    dk_sums = torch.empty((min(W, M), D), dtype=torch.float32, device=dev) if need_k else None
    dq_sums = (torch.empty((min(R, N), D), dtype=torch.float32, device=dev) if rows_acc and need_q
               else None)
    # line_sums: the row part's sums per row (N,), the column part's per column (M,), from
    # per-tile sums of one block (the launches' grids x the block's rows / columns)
    rt = torch.zeros(N, dtype=torch.float32, device=dev) if line_sums or row_loss else None
    ct = torch.zeros(M, dtype=torch.float32, device=dev) if line_sums and symmetric else None
    n_rows_blk, n_cols_blk = min(R, N), min(W, M)
    rtp = [torch.empty((gn, n_rows_blk), dtype=torch.float32, device=dev) if rt is not None
           else None for _, gn in grids]
    ctp = [torch.empty((gm, n_cols_blk), dtype=torch.float32, device=dev) if ct is not None
           else None for gm, _ in grids]
    scratch = []
    common = (scale, _ptr(bias, scale), *_metadata(targets, stats.row_lse, aux=stats.row_aux),
              stats.row_lse, stats.row_pos, stats.row_npos, col_lse, a_row, b_row, a_col, b_col,
              a2_row)
    const = dict(SYMMETRIC=symmetric, PRECISION=_dot_precision(queries, spec.exact),
                 COMPUTE_SB=need_sb, COMPUTE_SBC=need_sb and _centre_columns(queries, symmetric,
                                                                            self_sym, True),
                 SELF_SYM=self_sym, GRAM=gram and rows_acc, **flags)
    tf32 = _dot_precision(queries, spec.exact) == "tf32" and dev.type == "cuda"
    for r0, c0 in blocks:
        r1, c1 = min(N, r0 + R), min(M, c0 + W)
        dS = ds_buf[: r1 - r0, : c1 - c0]
        if need_sb:
            dsb.zero_()
        first = 0
        # split: only the launches with tiles to write in this block (the band crosses few)
        work = span_work(r0, r1, c0, c1, N, M, spec.offset, BM, BN) if split else (True,)
        for (tiles_, c), n_tiles, rp, cp, has in zip(launches, tiles, rtp, ctp, work):
            grid = (triton.cdiv(r1 - r0, c["BLOCK_M"]), triton.cdiv(c1 - c0, c["BLOCK_N"]))
            sb = dsb[first:first + n_tiles] if need_sb else None
            first += n_tiles
            if not has:  # (its scale / bias sums stay at zero)
                continue
            for t in (rp, cp):  # (programs without work leave their sums at zero)
                if t is not None:
                    t.zero_()
            args = (queries, keys, *common, dS, _ptr(sb, stats.row_lse),
                    _ptr(rp, stats.row_lse), _ptr(cp, stats.row_lse), N, M, D, spec.offset,
                    _ratio2(spec), r0, c0, n_rows_blk, n_cols_blk, *_row_strides(queries),
                    *_row_strides(keys), ds_buf.stride(0),
                    a_row.stride(0), b_row.stride(0), a_col.stride(0), b_col.stride(0),
                    a2_row.stride(0))
            _grad_tiles_kernel[grid](*args, **const, TILES=tiles_, SPAN_M=BM, SPAN_N=BN,
                                     LINE_SUMS=line_sums, ROW_LOSS=row_loss,
                                     SP_SERIES=row_loss and queries.dtype == torch.float32, **c)
            if rp is not None:
                rt[r0:r1].add_(rp[: grid[1], : r1 - r0].sum(0))
            if cp is not None:
                ct[c0:c1].add_(cp[: grid[0], : c1 - c0].sum(0))
        if need_sb:
            sb_sums += dsb.sum(0)
        with _tf32_matmul(tf32):
            if rows_acc and need_q:
                sums = dq_sums[: r1 - r0]
                if c0 == 0:
                    sums.zero_()
                _gemm_acc(sums, dS, keys[c0:c1], scratch)
                if c1 == M:
                    dq[r0:r1].copy_(sums)
            elif need_q:
                if c0 == 0:
                    torch.mm(dS, keys[c0:c1], out=dq[r0:r1])
                else:
                    dq[r0:r1].addmm_(dS, keys[c0:c1])
            if need_k:
                sums = dk_sums[: c1 - c0]
                if r0 == 0:
                    sums.zero_()
                _gemm_acc(sums, dS.transpose(0, 1), queries[r0:r1], scratch)
        if r1 == N and fold:
            dq[c0:c1].add_(dk_sums[: c1 - c0])
        elif r1 == N and need_k:
            dk[c0:c1].copy_(dk_sums[: c1 - c0])
    if self_sym and not rows_acc:
        dq, dk = dk, None
    return dq, dk, sb_sums, rt, ct


def _autotuning() -> bool:
    return os.environ.get("FASTCL_AUTOTUNE", "0") == "1"


_autotuned: dict = {}


def _launch(kernel, grid, args, const: dict, cfg: dict, tuned: Optional[str]) -> None:
    """Launch with the fixed config, or, with FASTCL_AUTOTUNE=1, through triton.autotune over the
    parameters that leave the grid and buffers unchanged (BLOCK_D, ``tuned`` unless None, warps,
    stages)."""
    if not _autotuning():
        kernel[grid](*args, **const, **cfg)
        return
    # a resident feature block needs BLOCK_D >= D: its BLOCK_D is not tuned
    free = ("BLOCK_D" if not cfg.get("RESIDENT") else None, tuned, "num_warps", "num_stages")
    fixed = {k: v for k, v in cfg.items() if k not in free}
    key = (kernel.fn.__name__, tuned, tuple(sorted(fixed)))
    if key not in _autotuned:
        tiles = (32, 64, 128) if tuned else (None,)
        widths = (32, 64, 128) if free[0] else (None,)
        configs = [triton.Config(dict({"BLOCK_D": bd} if bd else {}, **({tuned: tile} if tuned else {})),
                                 num_warps=w, num_stages=st)
                   for bd in widths for tile in tiles
                   for w, st in ((4, 2), (8, 3), (8, 4))]
        _autotuned[key] = triton.autotune(configs=configs, key=["N", "M", "D"])(kernel)
    _autotuned[key][grid](*args, **const, **fixed)


def _ratio2(spec) -> float:
    return 0.0 if spec.lse2_ratio is None else float(spec.lse2_ratio)


def _precision(queries: torch.Tensor, exact: bool) -> str:
    """The arithmetic the call is held to: "tf32" (float32 features, the default mode) or "ieee"."""
    return "tf32" if queries.dtype == torch.float32 and not exact else "ieee"


def _ieee32(queries: torch.Tensor, exact: bool) -> bool:
    """Float32 features with IEEE products (``exact``): not 16-bit features, whose products are
    IEEE too ("ieee" above) but whose inputs' rounding is far above float32's."""
    return queries.dtype == torch.float32 and _precision(queries, exact) == "ieee"


# Whether the default mode's float32 products are TF32 ones on the tensor cores. False keeps the
# default mode's kernels and choices but gives them IEEE products, as the interpreter forms them:
# tests on a GPU hold the default mode's arithmetic to float32 bounds that way.
TF32_PRODUCTS = True


def _dot_precision(queries: torch.Tensor, exact: bool) -> str:
    """The kernels' ``PRECISION`` (tl.dot's input precision) for :func:`_precision`'s mode."""
    mode = _precision(queries, exact)
    return "ieee" if mode == "tf32" and not TF32_PRODUCTS else mode


# ----------------------------------------------------------------------------------------------
# launchers (the engine contract)
# ----------------------------------------------------------------------------------------------


def _band_config(cfg: dict, span_m: int, span_n: int, same_rows: bool = False) -> dict:
    """cfg for the band-and-edge launch of a tiling in spans of span_m x span_n (the interior
    launch's tiles): its tiles divide the spans, a side that does not takes the span's size;
    same_rows: the span's rows (the forward's two launches continue the same row blocks)."""
    bm = span_m if same_rows or span_m % cfg["BLOCK_M"] else cfg["BLOCK_M"]
    bn = span_n if span_n % cfg["BLOCK_N"] else cfg["BLOCK_N"]
    return dict(cfg, BLOCK_M=bm, BLOCK_N=bn)


def _plain(spec, targets) -> bool:
    """Whether the closure's targets and exclusions all lie on the band j = i + offset, so that
    tiles off it take the kernels' lean path (``config_override["PLAIN"] = False`` disables it)."""
    return bool(config_override.get("PLAIN", True) and spec.fn_space == 0
            and spec.lse2_ratio is None and targets.positives is None
            and targets.col_positives is None and targets.row_labels is None
            and targets.row_ids is None and targets.teacher_queries is None)


def _flags(queries, spec, targets, bias, linear: bool = False, gram: bool = False) -> dict:
    """The kernels' closure flags; ``linear`` (the backward): tiles off the band take the lean
    path for linear-target closures too, with their targets compared in the tile. ``gram`` (the
    backward's GRAM kernels, which add each tile's transposed term): every tile on the masked
    path, where the transposed term's targets (on the other band) are compared and an entry and
    its transposed term are formed alike, so that the lines' sums measure what is summed."""
    return dict(PLAIN=not gram and (_plain(spec, targets)
                                    or (linear and _linear_targets(spec, targets))),
                UPCAST=queries.device.type != "cuda" and queries.dtype == torch.bfloat16,
                EXCLUDE_TARGETS=spec.exclude_targets, TARGET_LSE=spec.target_lse,
                FN_SPACE=spec.fn_space, FN_IDS=targets.row_ids is not None,
                SOFT_SIM=targets.teacher_queries is not None, LSE2=spec.lse2_ratio is not None,
                KIND=KIND_SIGMOID if spec.kind == "sigmoid" else KIND_SOFTMAX,
                HAS_BIAS=bias is not None, HAS_POS=targets.positives is not None,
                TARGET_K=0 if targets.target_weights is None else targets.target_weights.shape[1],
                HAS_CPOS=targets.col_positives is not None, LABELS=targets.row_labels is not None,
                EXCLUDE_SELF=spec.exclude_self)


def _ptr(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    return dummy if t is None else t


_dense_ids = dense_ids  # (shared with the line-total corrections)


def prepare_targets(targets):
    """targets with its labels and duplicate ids as int32 ids (see _dense_ids). The launchers call
    it themselves; a caller that keeps targets for the backward can call it once beforehand."""
    if targets.row_labels is None and targets.row_ids is None:
        return targets
    row_labels, col_labels = _dense_ids(targets.row_labels, targets.col_labels)
    row_ids, col_ids = _dense_ids(targets.row_ids, targets.col_ids)
    return targets._replace(row_labels=row_labels, col_labels=col_labels, row_ids=row_ids,
                            col_ids=col_ids)


# ----------------------------------------------------------------------------------------------
# linear target terms, beside the forward sweep
# ----------------------------------------------------------------------------------------------

_TARGET_BYTES = 32 << 20  # float32 temporaries of one feature chunk of the target sums


def _linear_targets(spec, targets) -> bool:
    """Whether the closure's only target term is the mean target logit, linear in S: index or
    label targets of a one-way softmax loss with nothing else masked (InfoNCE with positives,
    NT-Xent, SupCon L_out). The forward sweep then computes the row LSE alone, on the lean path,
    and the target logits are sums of features, computed beside it in O((N + M) D)
    (``config_override["PLAIN"] = False`` keeps them in the sweep, on the masked path). The
    backward compares the targets in its tiles, lean ones too (``_flags(linear=True)``): there
    dS = P - T/npos must be formed before it is rounded to the features' dtype, or the two terms'
    rounding errors no longer cancel."""
    return bool(config_override.get("PLAIN", True) and spec.kind == "softmax"
                and not spec.symmetric and not spec.target_lse and not spec.exclude_targets
                and spec.fn_space == 0 and spec.lse2_ratio is None and targets.row_ids is None
                and targets.teacher_queries is None
                and (targets.positives is not None or targets.row_labels is not None))


def _without_targets(targets):
    """The sweep's targets when the target terms are computed beside it: none in the kernels."""
    return targets._replace(positives=None, row_labels=None, col_labels=None, target_weights=None)


class _TargetSets(NamedTuple):
    """The target sets T(i) of a linear-target closure as O(N + M) indices. Index mode: ``key``
    the positive of row i (0 where none), ``has`` whether it counts. Label mode: class ids
    ``row_cls`` / ``col_cls`` in [0, n_cls); ``self_col`` the column i + offset (clamped) and
    ``self_in`` whether it is in row i's class but excluded (exclude_self)."""

    labels: bool
    key: Optional[torch.Tensor] = None
    has: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None  # weighted targets: key, has and weight are (N, K)
    row_cls: Optional[torch.Tensor] = None
    col_cls: Optional[torch.Tensor] = None
    n_cls: int = 0
    self_col: Optional[torch.Tensor] = None
    self_in: Optional[torch.Tensor] = None


def _target_sets(targets, spec, N: int, M: int, dev) -> _TargetSets:
    rows = torch.arange(N, device=dev) + spec.offset
    if targets.row_labels is None:
        pos = targets.positives
        if targets.target_weights is not None:
            rows = rows[:, None]
        has = (pos >= 0) & (pos < M)
        if spec.exclude_self:
            has &= pos != rows
        return _TargetSets(False, key=torch.where(has, pos, 0), has=has,
                           weight=targets.target_weights)
    same = targets.col_labels is targets.row_labels
    row_cls, col_cls = _dense_ids(targets.row_labels, targets.col_labels, rank=True)
    self_col = rows.clamp(0, max(M - 1, 0))
    self_in = (rows >= 0) & (rows < M) & (col_cls[self_col] == row_cls)
    if not spec.exclude_self:
        self_in = torch.zeros_like(self_in)
    return _TargetSets(True, row_cls=row_cls.long(), col_cls=col_cls.long(),
                       n_cls=N if same else N + M, self_col=self_col, self_in=self_in)


def _chunks(D: int, rows: int):
    """Feature chunks [d0, d1) whose float32 temporaries over ``rows`` rows fit _TARGET_BYTES."""
    width = max(16, min(D, _TARGET_BYTES // (4 * max(rows, 1))))
    return [(d0, min(D, d0 + width)) for d0 in range(0, D, width)]


def _class_sums(keys: torch.Tensor, ts: _TargetSets) -> torch.Tensor:
    """(N, d) float32: the sum over each row's target set T(i) of the keys' rows (M, d)."""
    sums = torch.zeros((ts.n_cls, keys.shape[1]), dtype=torch.float32, device=keys.device)
    sums.index_add_(0, ts.col_cls, keys.float())
    out = sums[ts.row_cls]
    out -= ts.self_in.to(torch.float32)[:, None] * keys[ts.self_col].float()
    return out


def _target_sums(queries, keys, scale, bias, ts: _TargetSets):
    """(row_pos, row_npos), float32 (N,): the sum of each row's target logits and their number
    (the statistics the sweep would have accumulated), from sums of features."""
    N, D = queries.shape
    M = keys.shape[0]
    f32 = torch.float32
    dot = torch.zeros(N, dtype=f32, device=queries.device)
    if ts.labels:
        cnt = torch.zeros(ts.n_cls, dtype=f32, device=queries.device)
        cnt.index_add_(0, ts.col_cls, torch.ones(M, dtype=f32, device=queries.device))
        npos = cnt[ts.row_cls] - ts.self_in.to(f32)
        for d0, d1 in _chunks(D, ts.n_cls + 3 * N):
            dot += torch.linalg.vecdot(queries[:, d0:d1].float(),
                                       _class_sums(keys[:, d0:d1], ts))
    elif ts.weight is not None:  # sum_k w_ik <q_i, k_p(i,k)>
        w = torch.where(ts.has, ts.weight.to(f32), 0.0)
        npos = w.sum(1)
        K = w.shape[1]
        for d0, d1 in _chunks(D, (2 * K + 1) * N):
            kd = keys[ts.key.reshape(-1), d0:d1].float().reshape(N, K, d1 - d0)
            dot += torch.linalg.vecdot(queries[:, d0:d1].float(), (w[:, :, None] * kd).sum(1))
    else:
        npos = ts.has.to(f32)
        for d0, d1 in _chunks(D, 3 * N):
            dot += torch.linalg.vecdot(queries[:, d0:d1].float(), keys[ts.key, d0:d1].float())
    row_pos = dot * scale + (bias * npos if bias is not None else 0.0)
    return torch.where(npos > 0, row_pos, 0.0), npos


def _metadata(targets, dummy, threshold=None, aux=None):
    """The kernels' metadata arguments, in order: positives, their weights (weighted targets),
    column positives, row / column labels, the per-row threshold (false negatives, or the count
    threshold), row / column duplicate ids, then the teacher pair, its scale, the teacher
    statistics buffer, its D and strides."""
    thr = threshold if threshold is not None else targets.fn_threshold
    tq, tk = targets.teacher_queries, targets.teacher_keys
    if targets.guide_queries is not None:  # a guide's features (fn_space 3): the teacher's pointers
        if tq is not None:
            raise ValueError("teacher targets and a guide cannot be combined in one closure")
        tq, tk = targets.guide_queries, targets.guide_keys
    teacher = (tq, tk, _ptr(targets.teacher_scale, dummy), _ptr(aux, dummy), tq.shape[1],
               tq.stride(0), tq.stride(1), tk.stride(0), tk.stride(1)) if tq is not None else \
        (dummy, dummy, dummy, _ptr(aux, dummy), 1, 0, 0, 0, 0)
    return (_ptr(targets.positives, dummy), _ptr(targets.target_weights, dummy),
            _ptr(targets.col_positives, dummy),
            _ptr(targets.row_labels, dummy), _ptr(targets.col_labels, dummy), _ptr(thr, dummy),
            _ptr(targets.row_ids, dummy), _ptr(targets.col_ids, dummy), *teacher)


def _tma_ready(x: torch.Tensor) -> bool:
    return (x.stride(1) == 1 and (x.stride(0) * x.element_size()) % 16 == 0
            and x.data_ptr() % 16 == 0 and x.shape[0] > 0)


def _with_tma(args, queries, keys, cfg):
    """(args, cfg) of a forward launch: with queries / keys (args[0], args[1]) as tensor
    descriptors of the launch's blocks when cfg asks for TMA and it can run (a Triton with host
    descriptors; Hopper, or the interpreter; unit feature strides, 16-byte aligned rows; no
    autotuning, which changes the blocks), else unchanged with TMA off."""
    if not cfg.get("TMA"):
        return args, cfg
    dev = queries.device
    ok = (_TensorDescriptor is not None and not _autotuning()
          and (dev.type != "cuda" or _arch(dev) >= 90) and _tma_ready(queries) and _tma_ready(keys))
    if not ok:
        return args, dict(cfg, TMA=False)
    bd = cfg["BLOCK_D"]
    q_desc = _TensorDescriptor(queries, list(queries.shape), list(queries.stride()),
                               [cfg["BLOCK_M"], bd])
    k_desc = _TensorDescriptor(keys, list(keys.shape), list(keys.stride()), [cfg["BLOCK_N"], bd])
    return (q_desc, k_desc, *args[2:]), cfg  # (config_for turned RESIDENT off)


def forward(queries, keys, scale, bias, targets, spec) -> EngineStats:
    """Row (and column) statistics of S = scale * queries keys^T + bias; see :mod:`fastcl.ops`."""
    targets = prepare_targets(targets)
    N, D = queries.shape
    M = keys.shape[0]
    dev = queries.device
    f32 = torch.float32
    # float32 with IEEE products (its own tiles), and for softmax closures the LSEs' rounding
    # errors too (EngineStats.row_lse_lo); with TF32 or 16-bit features the logits' own error is
    # far larger
    ieee32 = _ieee32(queries, spec.exact)
    lse_lo = spec.kind == "softmax" and ieee32
    # (not with lse_lo: a target logit computed apart differs from the sweep's by ~1 ulp of |S|,
    # which a loss lse - S_t ~ 1e-3 would keep; in the sweep, both come from the same tile)
    if (_linear_targets(spec, targets) and not lse_lo) or targets.target_weights is not None:
        # the LSE from the sweep, the target sums beside it
        stats = forward(queries, keys, scale, bias, _without_targets(targets), spec)
        row_pos, row_npos = _target_sums(queries, keys, scale, bias,
                                         _target_sets(targets, spec, N, M, dev))
        return stats._replace(row_pos=row_pos, row_npos=row_npos)
    flags = _flags(queries, spec, targets, bias)
    plain = flags.pop("PLAIN")
    flags.pop("TARGET_K")
    cfg = _config(queries, "fwd")
    tile_n = cfg["BLOCK_N"]
    if plain:  # two launches over disjoint tiles of one tiling: band and edges, then the interior
        cfg_plain = _config(queries, "fwd_plain", exact=ieee32)
        tile_n = cfg_plain["BLOCK_N"]
        cfg = _band_config(cfg, cfg_plain["BLOCK_M"], tile_n, same_rows=True)
    BM = cfg["BLOCK_M"]
    n_row_blocks = triton.cdiv(N, BM)
    row_lse = torch.empty(N, dtype=f32, device=dev)
    row_pos = torch.empty(N, dtype=f32, device=dev)
    row_npos = torch.empty(N, dtype=f32, device=dev)
    symmetric = spec.symmetric and spec.kind == "softmax"
    row_lo = torch.empty(N, dtype=f32, device=dev) if lse_lo else row_lse  # (unused pointer)
    col_lse_lo = None
    if symmetric:
        budget = _PARTIAL_BYTES or max(_PARTIAL_BYTES_MIN, (N + M) * D * queries.element_size())
        per_launch = max(1, min(n_row_blocks, budget // ((8 if lse_lo else 4) * M)))
        partial = torch.empty((per_launch, M), dtype=f32, device=dev)
        partial_lo = torch.empty((per_launch, M), dtype=f32, device=dev) if lse_lo else partial
        n_col_tiles = triton.cdiv(M, tile_n)
        refs = torch.empty((per_launch, n_col_tiles), dtype=f32, device=dev)
        col_pos = torch.zeros(M, dtype=f32, device=dev)
        col_lse = None
    else:
        per_launch = n_row_blocks
        partial = partial_lo = refs = col_pos = row_lse  # unused pointers
    has_aux = targets.teacher_queries is not None or spec.lse2_ratio is not None
    # (teacher: 4 rows; LSE2: row 2)
    aux = torch.empty((4 if targets.teacher_queries is not None else 3, N), dtype=f32,
                      device=dev) if has_aux else None
    row_init = torch.empty((2 if lse_lo else 1) * N, dtype=f32, device=dev) if plain else row_lse
    # the interior launch's column-underflow flag per row block of a launch group
    flags_buf = torch.empty(per_launch, dtype=torch.int32, device=dev) if (plain and symmetric) \
        else row_npos
    const = dict(SYMMETRIC=symmetric, COUNT=0, PRECISION=_dot_precision(queries, spec.exact),
                 TILE_N=tile_n, SP_SERIES=queries.dtype == torch.float32 and spec.kind == "sigmoid",
                 LSE_LO=lse_lo, **flags)
    # the tiling of the column partials and of the two launches is fixed: BLOCK_N tuned otherwise
    tuned = None if (symmetric or plain) else "BLOCK_N"
    for start in range(0, n_row_blocks, per_launch):
        nb = min(per_launch, n_row_blocks - start)
        args = (queries, keys, scale, _ptr(bias, scale), *_metadata(targets, row_lse, aux=aux),
                row_lse, row_pos, row_npos, partial, refs, col_pos, row_init, flags_buf, row_lo,
                partial_lo, N, M, D, start, spec.offset, _ratio2(spec),
                *_row_strides(queries), *_row_strides(keys))
        args_band, cfg_band = _with_tma(args, queries, keys, cfg)
        if plain:
            _launch(_forward_kernel, (nb,), args_band, dict(const, TILES=1, RESIDENT=False), cfg_band,
                    tuned)
            args_in, cfg_in = _with_tma(args, queries, keys, cfg_plain)
            _launch(_forward_kernel, (nb,), args_in, dict(const, TILES=2), cfg_in, tuned)
            if symmetric:  # programs of unflagged row blocks return at once
                _forward_kernel[(nb,)](*args_in, **dict(const, TILES=3), **cfg_in)
        else:
            _launch(_forward_kernel, (nb,), args_band, dict(const, TILES=0, RESIDENT=False), cfg_band,
                    tuned)
        if symmetric:
            chunk = torch.empty(M, dtype=f32, device=dev)
            chunk_lo = torch.empty(M, dtype=f32, device=dev) if lse_lo else chunk
            _merge_column_partials_kernel[(triton.cdiv(M, _MERGE_BLOCK),)](
                partial, refs, chunk, partial_lo, chunk_lo, nb, M, n_col_tiles, TILE_N=tile_n,
                BLOCK=_MERGE_BLOCK, LSE_LO=lse_lo)
            if col_lse is None:
                col_lse, col_lse_lo = chunk, (chunk_lo if lse_lo else None)
            elif lse_lo:  # (float64: one more rounding of the hi part would undo the lo part)
                col_lse, col_lse_lo = merge_lse(col_lse, col_lse_lo, chunk, chunk_lo)
            else:
                col_lse = torch.logaddexp(col_lse, chunk)
    # (teacher targets: the kernel stores row_pos's rounding error in aux row 2)
    lo = dict(row_lse_lo=row_lo if lse_lo else None, col_lse_lo=col_lse_lo,
              row_pos_lo=aux[2] if targets.teacher_queries is not None else None)
    if symmetric:
        return EngineStats(row_lse, row_pos, row_npos, col_lse, col_pos, aux, **lo)
    return EngineStats(row_lse, row_pos, row_npos, None, None, aux, **lo)


def backward(queries, keys, scale, bias, targets, spec, stats, grad_row, grad_col, needs,
             grad_row_pos=None, grad_col_pos=None, grad_row_lse2=None, whole_lines=True,
             return_line_sums=False, row_loss=False):
    """(d_queries, d_keys, d_scale, d_bias) from the saved statistics; see :mod:`fastcl.ops`.
    ``whole_lines``: the call sweeps every entry of each line's LSE (float32 features then get
    :func:`fastcl.ops.correct_line_totals`). ``return_line_sums``: no correction here; the
    lines' sums of dS follow the gradients (row_sums (N,) | None, col_sums (M,) | None).
    ``row_loss`` (sigmoid closures, which read no statistics here): each row's loss (N,) from the
    same tiles follows the gradients (:func:`step`)."""
    if return_line_sums and spec.gram:
        raise ValueError("return_line_sums is for blocks of a queries x keys matrix, not spec.gram")
    if row_loss and (spec.kind != "sigmoid" or return_line_sums):
        raise ValueError("row_loss is for sigmoid closures, without return_line_sums")
    targets = prepare_targets(targets)
    need_q, need_k, need_s, need_b = needs
    need_sb = need_s or need_b
    N, D = queries.shape
    M = keys.shape[0]
    f32 = torch.float32
    softmax = spec.kind == "softmax"
    lines = measures_line_sums(spec, targets, queries, needs, _ieee32(queries, spec.exact),
                               whole_lines, return_line_sums)
    spec0, targets0 = spec, targets
    gram = (spec.gram and softmax and not spec.symmetric and targets.teacher_queries is None
            and targets.guide_queries is None)
    if gram:  # one kernel computes the whole gradient of the shared features (returned as dq)
        need_q, need_k = need_q or need_k, False
    symmetric = spec.symmetric and softmax and grad_col is not None
    a_row, b_row, a_col, b_col = closure_weights(spec, stats, grad_row, grad_row_pos,
                                                 grad_col if symmetric else None, grad_col_pos)
    if not symmetric:  # (the column weights' pointers are not read)
        a_col = b_col = a_row
    col_lse = stats.col_lse if symmetric else stats.row_lse
    a2_row = grad_row_lse2.to(f32) if grad_row_lse2 is not None else a_row.new_zeros(1).expand(N)
    # A self-similarity whose off-diagonal tiles are plain: the gradient of z_i is
    # s sum_j (dS_ij + dS_ji) z_j, which is the symmetric closure's dQ with the rows' statistics
    # on both sides, computed by the row kernel alone on the lean path. Its scale / bias sums are
    # those of the row terms (SELF_SYM): the column terms are their transpose. Linear targets
    # (NT-Xent, SupCon): dS_ji's target term is column j's, b_j / npos_j on the rows i in T(j)
    # (the same class, or pos_j = i).
    linear = _linear_targets(spec, targets)
    # (not for the line sums' correction: there the column terms dS_ji, formed in the tile of
    # (i, j) from P_ij, would not be the entries summed in row j)
    twice = gram and spec.exclude_self and (_plain(spec, targets) or linear) and not lines
    if twice:
        gram, symmetric = False, True
        col_lse, a_col, b_col = stats.row_lse, a_row, a_row.new_zeros(1).expand(N)
        if linear:
            npos = stats.row_npos
            b_col = torch.where(npos > 0, b_row / torch.where(npos > 0, npos, 1.0), 0.0)
            if targets.positives is not None:
                targets = targets._replace(col_positives=targets.positives)
    # the weights with unit strides (broadcast ones materialised: O(N + M)): the JIT compiles a
    # stride of 1 as a constant, so each tile's loads of them take no 64-bit stride products
    # (the dS tiles' kernel loads them once per tile)
    a_row, b_row, a_col, b_col, a2_row = (t.contiguous() for t in (a_row, b_row, a_col, b_col, a2_row))
    wide = _dense_backward(queries, symmetric and _ieee32(queries, spec.exact))
    # which sweep takes the scale / bias sums: over the rows (the dS tiles; the rows kernel) unless
    # only dK is needed of the fused kernels (the columns kernel); it decides their centring
    rows_sum = wide or need_q or not need_k
    if wide:
        # (twice: dS is symmetric, so the rows' gradient -- float32 sums over the column slabs,
        # one rounding -- is the whole gradient)
        dq, dk, sb_sums, rt, ct = _backward_dense(
            queries, keys, scale, bias, targets, spec, stats, flags_args=(
                a_row, b_row, a_col, b_col, a2_row, col_lse, symmetric),
            needs=(need_q, need_k, need_s, need_b), gram=gram, self_sym=twice, line_sums=lines,
            row_loss=row_loss)
    else:
        dq, dk, sb_sums, rt, ct = _backward_fused(
            queries, keys, scale, bias, targets, spec, stats, (a_row, b_row, a_col, b_col, a2_row),
            col_lse, symmetric, gram, (need_q, need_k, need_sb), rows_sum, self_sym=twice,
            line_sums=lines, row_loss=row_loss)
    extra = (rt,) if row_loss else ()
    if return_line_sums:  # (a caller sweeping blocks of a queries x keys matrix: not spec.gram)
        extra = (rt, ct if symmetric and not twice else None) if lines else (None, None)
    elif lines:
        # (gram, twice: dq is the whole gradient of the shared features, both parts)
        correct_line_totals(dq, dq if gram or twice else dk, queries, keys, scale, spec0, targets0,
                            stats, (a_row, b_row, a_col, b_col), rt,
                            ct if symmetric and not twice else None)
    ds = db = None
    if need_sb:
        sym = symmetric and not twice
        if softmax and (not sym or _centre_columns(queries, sym, False, rows_sum)):
            # the kernels' sums are centred (_centres): add the lines' known totals
            cols = dict(a_col=a_col, b_col=b_col) if sym else {}
            sb_sums = centred_scale_sums(sb_sums, spec, targets, stats, a_row, b_row, scale, bias,
                                         M, a2_row=a2_row, **cols)
        ds = sb_sums[0:1] if need_s else None
        db = sb_sums[1:2] if need_b else None
    return (dq, dk, ds, db, *extra)


def takes_step(queries, spec, targets) -> bool:
    """Whether :func:`step` serves the closure: the sigmoid one (its gradient needs no statistic,
    so the backward's sweep can form the loss too); ``config_override["STEP"] = False`` turns it
    off (the forward and backward sweeps then run as for ``reduction="none"``)."""
    return bool(spec.kind == "sigmoid" and config_override.get("STEP", True))


def step(queries, keys, scale, bias, targets, spec, needs, weight: float = 1.0):
    """The statistics of :func:`forward` and the gradients of ``weight * sum_i L_i`` of the
    sigmoid closure from the backward's sweep alone: (EngineStats, (d_queries, d_keys, d_scale,
    d_bias)), None where ``needs`` (queries, keys, scale, bias) is false; the feature gradients
    in the features' dtype. The row kernel (or the wide-feature dS tiles) sums each row's loss
    from the tiles it forms for dQ, so no forward sweep runs: 8 N M D FLOPs instead of 10 on the
    fused path, 6 instead of 8 (and the traffic of dS) on the wide-feature one. ``weight`` is each
    row's gradient weight (1/N for the mean), applied before the gradients' one rounding.
    """
    if not takes_step(queries, spec, targets):
        raise ValueError("step serves the sigmoid closure (see takes_step)")
    N = queries.shape[0]
    f32 = torch.float32
    need_q, need_k, need_s, need_b = (bool(x) for x in needs)
    need_b = need_b and bias is not None
    # (the sigmoid kernels read no statistic; the forward leaves row_pos and row_npos at 0)
    stats = EngineStats(*(torch.zeros(N, dtype=f32, device=queries.device) for _ in range(3)))
    weights = torch.full((N,), float(weight), dtype=f32, device=queries.device)
    dq, dk, ds, db, losses = backward(queries, keys, scale, bias, targets, spec, stats, weights,
                                      None, (need_q, need_k, need_s, need_b), row_loss=True)
    return stats._replace(row_lse=losses), (dq, dk, ds, db)


def _centre_columns(queries, symmetric: bool, self_sym: bool, rows_sum: bool) -> bool:
    """Whether a symmetric closure's scale sums are centred (its row part on the rows, its
    column part on the columns, entry by entry): for float32 features, and in the column kernel
    (only dK needed: rows_sum False). For 16-bit features the sums are of dS as a whole, a few
    operations per entry fewer on the hot path: the float32 error of the stored LSEs moves them by
    ~1e-3 relative at a low temperature, far below the error of 16-bit logits in PyTorch."""
    return symmetric and not self_sym and (queries.dtype == torch.float32 or not rows_sum)


def _backward_fused(queries, keys, scale, bias, targets, spec, stats, grads, col_lse, symmetric,
                    gram, needs, rows_sum, self_sym=False, line_sums=False, row_loss=False):
    """(dq, dk, scale / bias sums (2,), row sums (N,), column sums (M,)) by the fused kernels: rows
    for dQ, columns for dK; the scale / bias sums by the rows kernel when ``rows_sum``. ``line_sums``: each row's sum of dS's row part as formed (the rows
    kernel, run for it alone when dQ is not needed) and, symmetric, each column's of its column
    part (the columns kernel, likewise); else None. ``row_loss`` (sigmoid): the row sums are each
    row's loss instead (ROW_LOSS), and the rows kernel always runs."""
    a_row, b_row, a_col, b_col, a2_row = grads
    need_q, need_k, need_sb = needs
    N, D = queries.shape
    M = keys.shape[0]
    dev = queries.device
    f32 = torch.float32
    flags = _flags(queries, spec, targets, bias, linear=True, gram=gram)
    lean = flags["PLAIN"]
    # split: interior tiles in launches of their own (lean path only, wider tiles), after launches
    # over the band and edge tiles that hand over float32 partial gradients
    split = lean and _split_backward(queries)
    cfg = _config(queries, "bwd_gram" if gram else "bwd", lean=lean and not split)
    common = (scale, _ptr(bias, scale), *_metadata(targets, stats.row_lse, aux=stats.row_aux),
              stats.row_lse, stats.row_pos, stats.row_npos,
              col_lse, a_row, b_row, a_col, b_col, a2_row)
    strides = (*_row_strides(queries), *_row_strides(keys))
    grad_strides = (a_row.stride(0), b_row.stride(0), a_col.stride(0), b_col.stride(0),
                    a2_row.stride(0))
    precision = _dot_precision(queries, spec.exact)
    dq = dk = None
    dsb = []
    # scale / bias sums: by the rows kernel unless only dK is needed (rows_sum False; the
    # symmetric closure's column part, too, when centred: entry by entry in per-row sums, where
    # the columns kernel would need sums across its warps)
    rows_do_sb = need_sb and rows_sum
    sym_sb = need_sb and _centre_columns(queries, symmetric, self_sym, rows_do_sb)

    def launches(kernel, rows, n, out, sb_rows, const, tuned, lines=None):
        """One launch over every tile, or the band launch then the interior launch (the same D
        chunks; partial sums through a float32 buffer; scale / bias sums in separate rows; line
        sums (n,) through a buffer per launch). ``rows``: the kernel is the rows kernel (told,
        not compared: torch.compile cannot trace ``is`` between Triton kernels)."""
        own = "BLOCK_M" if rows else "BLOCK_N"
        cfg_in = _config(queries, "bwd_rows_plain" if rows else "bwd_cols_plain") if split else cfg
        # D chunks of the gradient (without it the kernels compute only sums)
        grid_d = triton.cdiv(D, cfg_in["BLOCK_DV"]) if out is not None else 1
        if not split:
            dsb_ = torch.zeros((triton.cdiv(n, cfg[own]), 2), dtype=f32, device=dev) \
                if sb_rows else None
            args = (queries, keys, *common, _ptr(out, stats.row_lse), stats.row_lse,
                    _ptr(dsb_, stats.row_lse), _ptr(lines, stats.row_lse), N, M, D, spec.offset,
                    _ratio2(spec), *strides, D, *grad_strides)
            _launch(kernel, (triton.cdiv(n, cfg[own]), grid_d), args,
                    dict(const, TILES=0, SPAN_M=1, SPAN_N=1), cfg, tuned)
            return dsb_
        span_m, span_n = cfg_in["BLOCK_M"], cfg_in["BLOCK_N"]
        # (the same D chunks in both launches)
        band = dict(_band_config(cfg, span_m, span_n), BLOCK_DV=cfg_in["BLOCK_DV"])
        if band.get("RESIDENT"):
            band["BLOCK_D"] = band["BLOCK_DV"]
        n_band, n_in = triton.cdiv(n, band[own]), triton.cdiv(n, cfg_in[own])
        dsb_ = torch.zeros((n_band + n_in, 2), dtype=f32, device=dev) if sb_rows else None
        part = torch.empty((n, D), dtype=f32, device=dev) if out is not None else stats.row_lse
        lp = torch.empty((2, n), dtype=f32, device=dev) if lines is not None else None
        for tiles, c, nb, sb in ((1, band, n_band, dsb_[:n_band] if sb_rows else None),
                                 (2, cfg_in, n_in, dsb_[n_band:] if sb_rows else None)):
            args = (queries, keys, *common, _ptr(out, stats.row_lse), part,
                    _ptr(sb, stats.row_lse), _ptr(lp[tiles - 1] if lp is not None else None,
                                                  stats.row_lse),
                    N, M, D, spec.offset, _ratio2(spec), *strides, D, *grad_strides)
            _launch(kernel, (nb, grid_d), args, dict(const, TILES=tiles, SPAN_M=span_m,
                                                     SPAN_N=span_n), c, None)
        if lines is not None:
            torch.sum(lp, 0, out=lines)
        return dsb_

    rt = torch.empty(N, dtype=f32, device=dev) if line_sums or row_loss else None
    ct = torch.empty(M, dtype=f32, device=dev) if line_sums and symmetric and not self_sym else None
    if need_q or rows_do_sb or rt is not None:
        dq = torch.empty((N, D), dtype=queries.dtype, device=dev) if need_q else None
        const = dict(SYMMETRIC=symmetric, PRECISION=precision, COMPUTE_DQ=need_q,
                     COMPUTE_SB=rows_do_sb, COMPUTE_SBC=sym_sb and rows_do_sb, GRAM=gram,
                     SELF_SYM=self_sym, LINE_SUMS=line_sums, ROW_LOSS=row_loss,
                     SP_SERIES=row_loss and queries.dtype == f32, **flags)
        sb = launches(_backward_rows_kernel, True, N, dq, rows_do_sb, const, "BLOCK_N", rt)
        if rows_do_sb:
            dsb.append(sb)
    if need_k or ct is not None:
        dk = torch.empty((M, D), dtype=keys.dtype, device=dev) if need_k else None
        cols_do_sb = need_sb and not rows_do_sb
        const = dict(SYMMETRIC=symmetric, PRECISION=precision, COMPUTE_SB=cols_do_sb,
                     COMPUTE_DK=need_k, LINE_SUMS=ct is not None, **flags)
        sb = launches(_backward_cols_kernel, False, M, dk, cols_do_sb, const, "BLOCK_M", ct)
        if cols_do_sb:
            dsb.append(sb)
    return dq, dk, sum(t.sum(0) for t in dsb) if need_sb else None, rt, ct


def count_above(queries, keys, scale, bias, targets, spec, threshold=None):
    """(N,) float32: for each row, the number of valid non-target columns with S_ij > threshold_i;
    without a threshold, S_ij > the row's target logit computed in the same tiles (one target per
    row): the rank of the target minus one, ties in its favour. No gradient."""
    targets = prepare_targets(targets)
    N, D = queries.shape
    M = keys.shape[0]
    counts = torch.empty(N, dtype=torch.float32, device=queries.device)
    cfg = _config(queries, "fwd")
    grid = (triton.cdiv(N, cfg["BLOCK_M"]),)
    thr = threshold.float().contiguous() if threshold is not None else None
    args = (queries, keys, scale, _ptr(bias, scale), *_metadata(targets, counts, thr),
            counts, counts, counts, counts, counts, counts, counts, counts, counts, counts, N, M, D,
            0, spec.offset,
            0.0,
            *_row_strides(queries), *_row_strides(keys))
    flags = _flags(queries, spec, targets, bias)
    flags.pop("PLAIN")
    flags.pop("TARGET_K")
    cfg = dict(cfg, TMA=False)
    const = dict(SYMMETRIC=False, COUNT=1 if threshold is not None else 2,
                 PRECISION=_dot_precision(queries, spec.exact), TILES=0,
                 TILE_N=cfg["BLOCK_N"], RESIDENT=False, SP_SERIES=False, **flags)
    _launch(_forward_kernel, grid, args, const, cfg, "BLOCK_N")
    return counts


@triton.jit
def _top_negatives_kernel(
    q_ptr, k_ptr, pos_ptr, rlab_ptr, clab_ptr, val_ptr, idx_ptr,
    N, M, D, offset, stride_qn, stride_qd, stride_kn, stride_kd,
    HAS_POS: tl.constexpr, LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr, K: tl.constexpr,
    KP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Hard-negative mining: the K largest similarities c_ij = <q_i, k_j> over valid non-target j.
    # 1. keep a running, descending top-K (values, column indices) per row in a (BLOCK_M, KP) tile;
    # 2. for each column block: c, masks; candidates = c on valid non-targets, -inf elsewhere;
    # 3. K rounds merge the running list (sorted, read at a per-row position `taken`) with the
    #    tile: the larger of the list's next entry and the tile's best not yet taken becomes
    #    entry r of the new list (ties keep the running entry); 4. store values and indices
    #    (-inf / -1 where a row has fewer than K negatives).
    # (The list's entries are read through a select, never reduced as the loop-carried tensor
    # itself: Triton 3.0's thread-locality pass crashes on a reduction of a loop argument.)
    pid = tl.program_id(0)
    row0 = pid * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < N
    slots = tl.arange(0, KP)
    row_meta = _row_targets(rows, N, offset, pos_ptr, rlab_ptr, HAS_POS, LABELS, 0)
    top_v = tl.full((BLOCK_M, KP), float("-inf"), dtype=tl.float32)
    top_i = tl.full((BLOCK_M, KP), -1, dtype=tl.int32)
    for col0 in range(0, M, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        c = _similarity_tile(q_ptr, k_ptr, row0, col0, N, M, D, stride_qn, stride_qd, stride_kn,
                             stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST, False)
        col_meta = _col_labels(cols, M, clab_ptr, LABELS)
        valid, target = _tile_masks(rows, cols, N, M, offset, row_meta, col_meta, LABELS, EXCLUDE_SELF)
        cand = tl.where(valid & (target == 0), c, float("-inf"))
        taken = tl.zeros((BLOCK_M,), dtype=tl.int32)
        new_v = tl.full((BLOCK_M, KP), float("-inf"), dtype=tl.float32)
        new_i = tl.full((BLOCK_M, KP), -1, dtype=tl.int32)
        for r in tl.static_range(K):
            at = slots[None, :] == taken[:, None]
            best_old = tl.max(tl.where(at, top_v, float("-inf")), 1)
            old_idx = tl.max(tl.where(at, top_i, -1), 1)
            best_new = tl.max(cand, 1)
            arg_new = tl.argmax(cand, 1)
            take_new = best_new > best_old
            val = tl.where(take_new, best_new, best_old)
            idx = tl.where(take_new, col0 + arg_new, old_idx)
            idx = tl.where(val == float("-inf"), -1, idx)
            new_v = tl.where(slots[None, :] == r, val[:, None], new_v)
            new_i = tl.where(slots[None, :] == r, idx[:, None], new_i)
            taken += (take_new == 0).to(tl.int32)
            cand = tl.where((tl.arange(0, BLOCK_N)[None, :] == arg_new[:, None]) & take_new[:, None],
                            float("-inf"), cand)
        top_v = new_v
        top_i = new_i
    out = rows.to(tl.int64)[:, None] * K + slots[None, :]
    omask = rmask[:, None] & (slots[None, :] < K)
    tl.store(val_ptr + out, top_v, mask=omask)
    tl.store(idx_ptr + out, top_i.to(tl.int64), mask=omask)


def top_negatives(queries, keys, targets, spec, k: int):
    """((N, k) float32 values, (N, k) int64 indices) of each row's k most similar valid non-target
    keys by c_ij = <q_i, k_j> (-inf / -1 past the available negatives). No gradient."""
    targets = prepare_targets(targets)
    N, D = queries.shape
    M = keys.shape[0]
    vals = torch.empty((N, k), dtype=torch.float32, device=queries.device)
    idx = torch.empty((N, k), dtype=torch.int64, device=queries.device)
    cfg = dict(config_for(queries.device.type, queries.dtype, D, "fwd", _arch(queries.device)))
    if queries.device.type == "cuda":  # the (BLOCK_M, KP) running lists live in registers
        cfg.update(BLOCK_M=64, num_stages=2)
    cfg.update({k: v for k, v in config_override.items() if k not in POLICY_KEYS})
    grid = (triton.cdiv(N, cfg["BLOCK_M"]),)
    _top_negatives_kernel[grid](
        queries, keys, _ptr(targets.positives, vals), _ptr(targets.row_labels, vals),
        _ptr(targets.col_labels, vals), vals, idx, N, M, D, spec.offset,
        *_row_strides(queries), *_row_strides(keys),
        HAS_POS=targets.positives is not None, LABELS=targets.row_labels is not None,
        EXCLUDE_SELF=spec.exclude_self, K=k, KP=max(2, _next_pow2(k)),
        PRECISION=_dot_precision(queries, spec.exact),
        UPCAST=queries.device.type != "cuda" and queries.dtype == torch.bfloat16,
        **{name: cfg[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")})
    return vals, idx
