"""The engine contract shared by every backend.

Every loss in fastcl is a closure over one engine that sweeps (row block x column block) tiles of

    S_ij = s * <q_i, k_j> + b        queries q: (N, D), keys k: (M, D), scale s, bias b

and keeps only O(N + M) statistics. A backend implements two functions with these signatures:

    forward(queries, keys, scale, bias, targets, spec) -> EngineStats
    backward(queries, keys, scale, bias, targets, spec, stats, grad_row, grad_col, needs)
        -> (d_queries | None, d_keys | None, d_scale | None, d_bias | None)

``scale`` is a float32 tensor of shape (1,), ``bias`` a float32 tensor of shape (1,) or None
(float64 for float64 features, which only the torch backend accepts).
``needs`` is a 4-tuple of bools (queries, keys, scale, bias) saying which gradients to compute;
``d_scale``/``d_bias`` are float32 tensors of shape (1,).

Validity and targets (per tile, from O(N + M) metadata, never an N x M tensor):

* ``valid_ij`` = i < N and j < M, and, with ``spec.exclude_self``, j != i + spec.offset.
* index mode (``targets.row_labels is None``): T_ij = [j == p(i)] with p = ``targets.positives``
  or p(i) = i + spec.offset when that is None.
* label mode: T_ij = [row_labels[i] == col_labels[j]]. In both modes T_ij is and-ed with valid_ij.
* weighted index targets (``targets.target_weights`` w (N, K), with ``positives`` (N, K)): T_ij =
  sum_k w_ik [j == positives[i, k]] on valid entries (softmax, one-way; backends with
  ``SPLIT_TARGET_GRADS``), so row_pos and row_npos below are weighted sums.
* symmetric (softmax, index mode only): column positive pc = ``targets.col_positives`` or
  pc(j) = j - spec.offset; Tc_ij = [i == pc(j)] and valid_ij.

Softmax closure (``spec.kind == "softmax"``):

* stats.row_lse[i]  = LSE_{j valid} S_ij           stats.row_pos[i] = sum_j T_ij S_ij
  stats.row_npos[i] = sum_j T_ij                   (float32)
* symmetric: stats.col_lse[j] = LSE_{i valid} S_ij, stats.col_pos[j] = sum_i Tc_ij S_ij
* row loss  L_i = row_lse_i - row_pos_i / row_npos_i   (0 when row_npos_i == 0)
  col loss  Lc_j = col_lse_j - col_pos_j   (symmetric losses give every column one positive)
* optionally stats.row_lse_lo / col_lse_lo: each float32 LSE's rounding error (the LSE is
  row_lse + row_lse_lo), kept by backends that sum the exponentials in float64; the losses add it
  after the exact row_lse - S_t (:func:`row_losses`, :func:`col_losses`). None: not kept.
* dS_ij = g_i (P_ij - T_ij / npos_i) + gc_j (Pc_ij - Tc_ij) on valid entries, 0 elsewhere,
  P_ij = exp(S_ij - row_lse_i), Pc_ij = exp(S_ij - col_lse_j); rows with npos_i == 0 get no
  gradient. ``grad_row`` = g (N,), ``grad_col`` = gc (M,) or None.

Extensions (backends that set ``SPLIT_TARGET_GRADS = True``; the others raise for them):

* ``backward(..., grad_row_pos=None, grad_col_pos=None)``: separate weights on the target terms,
  dS_ij = a_i P_ij + b_i dT_ij + ac_j Pc_ij + bc_j Tc_ij with a = grad_row, b = grad_row_pos,
  ac = grad_col, bc = grad_col_pos, where dT_ij = T_ij / npos_i is the derivative of the mean target
  logit row_pos_i / npos_i. None means the tied form above (b = -a, bc = -ac). The autograd layer
  passes the gradients of the *statistics* here, so a loss can be any function of (row_lse, mean
  target logit, column statistics) plus O((N + M) D) terms, differentiated by autograd.
* ``spec.exclude_targets`` (decoupled losses): targets are left out of the row and column LSEs.
* False negatives (``spec.fn_space``, ``targets.row_ids``): non-target entries with S_ij (1),
  c_ij (2) or a guide's products g_ij = <u_i, v_j> (3: ``targets.guide_queries`` u (N, Dg),
  ``guide_keys`` v (M, Dg), recomputed in each tile with a second GEMM; GISTEmbed) above
  ``targets.fn_threshold[i]``, or with ``col_ids[j] == row_ids[i]``, are dropped from ``valid``
  in every sweep. No gradient reaches u, v.
* Teacher soft targets (``targets.teacher_queries`` u, ``teacher_keys`` v, ``teacher_scale``
  (st, w); softmax closure, no labels): Tt_ij = softmax_j(st <u_i, v_j>) over valid j,
  recomputed in each tile with a second GEMM, and T_ij = w Tt_ij + (1 - w) [j = p(i)] (p(i)
  the row's index target, none for positives -1); stats.row_pos = sum_j T_ij
  S_ij, row_npos = 1, stats.row_aux = (teacher LSE, sum_j Tt_ij St_ij - teacher LSE (St =
  st <u_i, v_j>), row_pos's float32 rounding error, the column of the row's largest S_ij
  (:func:`dominant_columns`)); dT_ij = T_ij, formed in the tile, so it cancels against P before
  rounding. No gradient reaches u, v.
* ``spec.lse2_ratio`` r: a second row LSE over the same entries, LSE_j (r S_ij), in stats.row_aux[2]
  (same sweep); ``backward(..., grad_row_lse2=a2)`` adds a2_i r exp(r S_ij - lse2_i) to dS.
* ``count_above(queries, keys, scale, bias, targets, spec, threshold=None)`` (optional): per row,
  the number of valid non-target j with S_ij > threshold_i; without a threshold, S_ij > the row's
  own target logit computed in the same arithmetic (one target per row: retrieval ranks, ties in
  the target's favour).
* ``spec.gram``: queries and keys are one tensor Z (offset 0, no column statistics); a backend
  with ``GRAM = True`` returns the whole gradient of Z as d_queries (and None for d_keys), the
  others return both parts, which the autograd layer adds.
* ``spec.target_lse`` (SupCon L_in): stats.row_pos[i] = LSE_{j: T_ij} S_ij instead of the sum, and
  dT_ij = T_ij exp(S_ij - row_pos_i).

Sigmoid closure (``spec.kind == "sigmoid"``, SigLIP): z_ij = +1 where T_ij else -1;
stats.row_lse[i] holds the row loss sum_{j valid} softplus(-z_ij S_ij) (row_pos/row_npos are zeros,
col_* None); dS_ij = -g_i z_ij sigmoid(-z_ij S_ij).

Gradients: dQ = s dS K, dK = s dS^T Q, d_scale = sum dS_ij <q_i, k_j>, d_bias = sum dS_ij.
For softmax closures the backends sum d_scale centred on each row's and column's LSE and add the
lines' exact totals (:func:`centred_scale_sums`), which assumes one call sweeps every entry of
each line's LSE; a caller that sweeps blocks of a larger matrix with the global statistics
subtracts each block's totals (:func:`tied_scale_totals`) and adds those of the whole lines.
The same assumption lets a backend correct float32 feature gradients by its measured line sums
of dS (:func:`correct_line_totals`); ``backward(..., whole_lines=False)`` turns that off for a
call that sweeps only part of each line. ``backward(..., return_line_sums=True)`` instead returns
the call's sums after the gradients, (row_sums (N,), col_sums (M,) | None), or (None, None)
where the backend does not measure them (its products are not IEEE float32, or the closure is
not one :func:`corrects_line_totals` covers): a caller sweeping blocks of each line adds them up
over the blocks and corrects once.

A step (optional: ``takes_step(queries, spec, targets) -> bool`` says where it serves) is the
forward and the gradients of ``weight * sum_i L_i`` of a row-only closure at once:

    step(queries, keys, scale, bias, targets, spec, needs, weight=1.0)
        -> (EngineStats, (d_queries | None, d_keys | None, d_scale | None, d_bias | None))

(the C++ backend on CPU tensors: each tile's products formed once; the Triton backend for the
sigmoid closure: the loss from the backward's sweep).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

__all__ = ["LossSpec", "Targets", "EngineStats", "row_losses", "col_losses", "row_target_logit",
           "scale_centres", "centred_scale_sums", "tied_scale_totals", "closure_weights", "line_totals",
           "corrects_line_totals", "measures_line_sums", "correct_line_totals", "dense_ids",
           "split_lse", "merge_lse", "compiling"]


def compiling() -> bool:
    """Whether torch.compile is tracing the call (torch >= 2.3; False before): host reads of
    tensor values and module state set on first use have no place in a traced graph."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check is not None and check())


@dataclass(frozen=True)
class LossSpec:
    """Compile-time description of a loss closure (hashable: it selects kernel variants)."""

    kind: str = "softmax"  # "softmax" | "sigmoid"
    symmetric: bool = False  # also column statistics (softmax, index mode)
    exclude_self: bool = False  # drop j == i + offset from every sum
    offset: int = 0  # diagonal offset for default positives and self-exclusion
    exact: bool = False  # fp32 inputs: IEEE fp32 products instead of TF32
    exclude_targets: bool = False  # targets left out of the LSEs (decoupled contrastive loss)
    target_lse: bool = False  # row_pos = LSE over targets instead of their sum (SupCon L_in)
    gram: bool = False  # queries and keys are the same tensor (NT-Xent, SupCon, DCL, uniformity)
    fn_space: int = 0  # false-negative masking by threshold: 0 off, 1 on S_ij, 2 on c_ij, 3 on g_ij
    lse2_ratio: Optional[float] = None  # also LSE_{j in the row LSE} (lse2_ratio * S_ij) (HCL)


class Targets(NamedTuple):
    """Per-row / per-column target metadata; every field is a tensor on the inputs' device or None."""

    positives: Optional[torch.Tensor] = None  # (N,) int64
    col_positives: Optional[torch.Tensor] = None  # (M,) int64
    row_labels: Optional[torch.Tensor] = None  # (N,) int64
    col_labels: Optional[torch.Tensor] = None  # (M,) int64
    fn_threshold: Optional[torch.Tensor] = None  # (N,) float32: drop non-targets above it
    row_ids: Optional[torch.Tensor] = None  # (N,) int64 duplicate id of each row's positive
    col_ids: Optional[torch.Tensor] = None  # (M,) int64 duplicate id of each key
    teacher_queries: Optional[torch.Tensor] = None  # (N, Dt) soft-target embeddings u
    teacher_keys: Optional[torch.Tensor] = None  # (M, Dt) soft-target embeddings v
    teacher_scale: Optional[torch.Tensor] = None  # (2,) float32 (st, w)
    target_weights: Optional[torch.Tensor] = None  # (N, K) float32, with positives (N, K)
    guide_queries: Optional[torch.Tensor] = None  # (N, Dg) fn_space 3: the guide's embeddings u
    guide_keys: Optional[torch.Tensor] = None  # (M, Dg) fn_space 3: the guide's embeddings v


class EngineStats(NamedTuple):
    """O(N + M) statistics saved by the forward sweep (float32, or float64 on the torch backend)."""

    row_lse: torch.Tensor  # (N,)
    row_pos: torch.Tensor  # (N,)
    row_npos: torch.Tensor  # (N,)
    col_lse: Optional[torch.Tensor] = None  # (M,) when symmetric
    col_pos: Optional[torch.Tensor] = None  # (M,) when symmetric
    # teacher targets (4, N): teacher LSE, sum Tt St - teacher LSE, row_pos's rounding error, the
    # dominant columns; lse2_ratio (3, N): row 2 the second LSE
    row_aux: Optional[torch.Tensor] = None
    # float32 LSEs' rounding errors, lse_exact ~ row_lse + row_lse_lo (None: not kept). A row whose
    # target dominates has a loss lse - S_t ~ 1e-3 next to |lse| ~ 20, where one ulp of the
    # stored LSE (~1e-6) is ~1e-3 of it: the losses add these back (row_losses / col_losses).
    row_lse_lo: Optional[torch.Tensor] = None  # (N,)
    col_lse_lo: Optional[torch.Tensor] = None  # (M,) when symmetric
    # the float32 target statistic's rounding error where it is formed as a sum near |S| (teacher
    # targets: row_pos = sum_j T_ij S_ij); the losses subtract it (None: exact or not kept)
    row_pos_lo: Optional[torch.Tensor] = None  # (N,)


def row_target_logit(stats: EngineStats, spec: LossSpec) -> torch.Tensor:
    """The row's target statistic: mean target logit row_pos / npos (0 without targets), or the
    target LSE when ``spec.target_lse``."""
    if spec.target_lse:
        return stats.row_pos
    has = stats.row_npos > 0
    return torch.where(has, stats.row_pos / torch.where(has, stats.row_npos, torch.ones_like(stats.row_npos)),
                       torch.zeros_like(stats.row_pos))


def row_losses(stats: EngineStats, spec: LossSpec) -> torch.Tensor:
    """Per-row loss L_i (N,) from the statistics (0 for rows without targets)."""
    if spec.kind == "sigmoid":
        return stats.row_lse
    has = stats.row_npos > 0
    loss = stats.row_lse - row_target_logit(stats, spec)  # (exact where the two are close)
    if stats.row_lse_lo is not None:
        loss = loss + stats.row_lse_lo
    if stats.row_pos_lo is not None:  # (row_npos = 1 where it is kept)
        loss = loss - stats.row_pos_lo
    return torch.where(has, loss, torch.zeros_like(stats.row_lse))


def col_losses(stats: EngineStats) -> torch.Tensor:
    """Per-column loss Lc_j (M,) of a symmetric softmax loss."""
    loss = stats.col_lse - stats.col_pos
    return loss if stats.col_lse_lo is None else loss + stats.col_lse_lo


def split_lse(lse: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(hi, lo) in ``dtype`` of a more precise LSE ``lse`` (e.g. float64): hi = lse rounded,
    lo = lse - hi rounded (0 where lse is infinite)."""
    hi = lse.to(dtype)
    lo = (lse - hi.to(lse.dtype)).to(dtype)
    return hi, torch.where(torch.isfinite(hi), lo, torch.zeros_like(lo))


def merge_lse(hi: torch.Tensor, lo: Optional[torch.Tensor], hi2: torch.Tensor,
              lo2: Optional[torch.Tensor]):
    """log(e^(hi + lo) + e^(hi2 + lo2)) as (hi, lo) in hi's dtype, computed in float64 (lo None: 0)."""
    a = hi.double() if lo is None else hi.double() + lo.double()
    b = hi2.double() if lo2 is None else hi2.double() + lo2.double()
    return split_lse(torch.logaddexp(a, b), hi.dtype)


def scale_centres(lse: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                  count: int) -> torch.Tensor:
    """Centres of the softmax closures' scale sums for lines (rows, or columns) with LSE ``lse``
    of ``count`` entries: (lse - b) / s, the LSE in the units of c = <q, k>, or at high
    temperature (s < log count) the log-mean-exp (lse - b - log count) / s, which stays within
    the range of c; 0 for lines without entries or s = 0. See :func:`centred_scale_sums`."""
    has = lse > float("-inf")
    b = bias if bias is not None else 0.0
    log_n = math.log(max(count, 1))
    shift = torch.where(scale < log_n, log_n, 0.0)
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    return torch.where(has & (scale != 0), (lse - b - shift) / safe, torch.zeros_like(lse))


def centred_scale_sums(sums: torch.Tensor, spec: LossSpec, targets: Targets, stats: EngineStats,
                       a_row: torch.Tensor, b_row: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor], M: int, a2_row: Optional[torch.Tensor] = None,
                       a_col: Optional[torch.Tensor] = None,
                       b_col: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(d_scale, d_bias) (2,) of a softmax closure from centred sums (2,): sums[0] =
    sum_ij R_ij (c_ij - m_i) + sum_ij C_ij (c_ij - n_j) for dS's row part R and (``a_col``
    given: symmetric) column part C, m and n the rows' and columns' :func:`scale_centres`.

    Each line of R and C sums to a known total in exact arithmetic: R_i = a_i [row has entries]
    + b_i (sum_j dT_ij: 1 on rows with targets; teacher targets w [teacher has entries] +
    (1 - w) [row's index target valid]) + r a2_i [row has entries] (the second LSE), and C_j =
    ac_j [column has entries] + bc_j [column's positive valid]. So d_scale = sums[0] +
    sum_i m_i R_i + sum_j n_j C_j and d_bias = sum R + sum C, free of the float32 error of the
    stored LSEs, which scales P's lines by (1 + e) and at a low temperature would move the
    uncentred sum by e times the line's mean of c: about the whole scale gradient. ``a_row`` /
    ``b_row`` are the tied or split weights as the kernels saw them (a zeroed on tied rows
    without targets).

    The totals assume the call sweeps every entry of each line's LSE. A caller that sweeps
    blocks of a larger matrix with the global statistics (``fastcl.distributed``'s ring)
    subtracts each block's totals (:func:`tied_scale_totals`) and adds the global ones."""
    lse = stats.row_lse
    R, C = line_totals(spec, targets, stats, a_row, b_row, M, a2_row, a_col, b_col)
    d_scale = sums[0] + (scale_centres(lse, scale, bias, M) * R).sum()
    d_bias = R.sum()
    if C is not None:
        clse = stats.col_lse
        d_scale = d_scale + (scale_centres(clse, scale, bias, lse.shape[0]) * C).sum()
        d_bias = d_bias + C.sum()
    return torch.stack([d_scale.reshape(()), d_bias.reshape(())])


def line_totals(spec: LossSpec, targets: Targets, stats: EngineStats, a_row: torch.Tensor,
                b_row: torch.Tensor, M: int, a2_row: Optional[torch.Tensor] = None,
                a_col: Optional[torch.Tensor] = None, b_col: Optional[torch.Tensor] = None):
    """(R (N,), C (M,) | None): the exact sums of each row of dS's row part and (``a_col`` given)
    of each column of its column part, for a softmax closure that sweeps whole lines (see
    :func:`centred_scale_sums`)."""
    lse = stats.row_lse
    N = lse.shape[0]
    has = lse > float("-inf")
    zero = torch.zeros_like(lse)
    if targets.teacher_queries is not None:
        w = targets.teacher_scale[1].to(lse.dtype)
        rows = torch.arange(N, device=lse.device)
        p = targets.positives if targets.positives is not None else rows + spec.offset
        p_ok = (p >= 0) & (p < M)
        if spec.exclude_self:
            p_ok = p_ok & (p != rows + spec.offset)
        t_sum = w * (stats.row_aux[0] > float("-inf")).to(lse.dtype) + (1 - w) * p_ok.to(lse.dtype)
    else:
        t_sum = (stats.row_npos > 0).to(lse.dtype)
    R = torch.where(has, a_row, zero) + b_row * t_sum
    if spec.lse2_ratio is not None and a2_row is not None:
        R = R + spec.lse2_ratio * torch.where(has, a2_row, zero)
    if a_col is None:
        return R, None
    clse = stats.col_lse
    pc, pc_ok = _col_positives(spec, targets, clse.shape[0], N, clse.device)
    C = (torch.where(clse > float("-inf"), a_col, torch.zeros_like(clse))
         + torch.where(pc_ok, b_col, torch.zeros_like(clse)))
    return R, C


def _col_positives(spec: LossSpec, targets: Targets, M: int, N: int, dev):
    """(pc (M,), whether column j's positive row pc_j counts) of a symmetric closure."""
    cols = torch.arange(M, device=dev)
    pc = targets.col_positives if targets.col_positives is not None else cols - spec.offset
    pc_ok = (pc >= 0) & (pc < N)
    if spec.exclude_self:
        pc_ok = pc_ok & (cols != pc + spec.offset)
    return pc, pc_ok


def closure_weights(spec: LossSpec, stats: EngineStats, grad_row: torch.Tensor,
                    grad_row_pos: Optional[torch.Tensor] = None,
                    grad_col: Optional[torch.Tensor] = None,
                    grad_col_pos: Optional[torch.Tensor] = None):
    """(a_row, b_row, a_col | None, b_col | None) in the statistics' dtype: dS's weights on P and
    dT (rows) and on Pc and Tc (columns, given ``grad_col``). Tied (``grad_*_pos`` None): b = -a,
    and a softmax closure's rows without targets get a = 0 (no loss, no gradient)."""
    dt = stats.row_lse.dtype
    a_row = grad_row.to(dt)
    if grad_row_pos is None:
        if spec.kind == "softmax":
            a_row = torch.where(stats.row_npos > 0, a_row, torch.zeros_like(a_row))
        b_row = -a_row
    else:
        b_row = grad_row_pos.to(dt)
    if grad_col is None:
        return a_row, b_row, None, None
    a_col = grad_col.to(dt)
    return a_row, b_row, a_col, -a_col if grad_col_pos is None else grad_col_pos.to(dt)


def tied_scale_totals(spec: LossSpec, targets: Targets, stats: EngineStats, grad_row: torch.Tensor,
                      grad_col: Optional[torch.Tensor], scale: torch.Tensor,
                      bias: Optional[torch.Tensor], M: int) -> torch.Tensor:
    """(2,) what a backend's backward adds to its centred scale / bias sums for a tied softmax
    closure (``grad_row_pos`` / ``grad_col_pos`` None) over this call's entries
    (:func:`centred_scale_sums` of zero sums)."""
    dt = stats.row_lse.dtype
    a_row, b_row, a_col, b_col = closure_weights(
        spec, stats, grad_row, grad_col=grad_col if spec.symmetric else None)
    cols = dict(a_col=a_col, b_col=b_col) if a_col is not None else {}
    return centred_scale_sums(stats.row_lse.new_zeros(2), spec, targets, stats, a_row, b_row,
                              scale.to(dt).reshape(()), None if bias is None else bias.to(dt).reshape(()),
                              M, **cols)


def dense_ids(rows: Optional[torch.Tensor], cols: Optional[torch.Tensor], rank: bool = False):
    """int32 ids with the equalities of two integer id vectors (rows_i == cols_j exactly when
    their new ids are equal; a vector may be the other one). The kernels compare ids once per
    similarity entry: 32-bit compares take half the instructions and registers of 64-bit ones.
    Ranks in the sorted union, on the device: no host synchronisation. Ids that already fit in
    32 bits are only cast, unless ``rank`` (ids in [0, len(union)), to index per-class sums)."""
    if rows is None or cols is None:
        return rows, cols
    if rows.dtype.itemsize <= 4 and cols.dtype.itemsize <= 4 and not rank:
        return rows.to(torch.int32), cols.to(torch.int32)
    both = rows if cols is rows else torch.cat([rows, cols])
    vals, order = torch.sort(both)
    rank = torch.zeros(vals.shape, dtype=torch.int32, device=vals.device)
    torch.cumsum(vals[1:] != vals[:-1], 0, dtype=torch.int32, out=rank[1:])
    ids = torch.empty_like(rank).scatter_(0, order, rank)
    if cols is rows:
        return ids, ids
    return ids[:rows.shape[0]], ids[rows.shape[0]:]


def corrects_line_totals(spec: LossSpec, targets: Targets) -> bool:
    """Whether :func:`correct_line_totals` applies to the closure: softmax with hard targets
    (index, weighted index or label; one column positive when symmetric) or teacher targets
    inside the LSEs, and no LSE but the row's and column's."""
    return (spec.kind == "softmax" and not spec.exclude_targets and not spec.target_lse
            and spec.lse2_ratio is None
            and not (spec.symmetric and (targets.row_labels is not None
                                         or targets.teacher_queries is not None)))


def dominant_columns(stats: EngineStats) -> torch.Tensor:
    """(N,) int64: the column of each row's largest logit, kept by the forward of a closure with
    teacher targets (stats.row_aux[3], integer bits of the statistics' dtype; Triton: with
    float32 IEEE products only, else 0)."""
    bits = torch.int32 if stats.row_aux.dtype == torch.float32 else torch.int64
    return stats.row_aux[3].view(bits).long()


def _row_target_pairs(spec: LossSpec, targets: Targets, stats: EngineStats, M: int):
    """Index targets as (keys (N, K), weights (N, K)): T_ij / npos_i = sum_k w_ik [j == key_ik].
    Teacher targets: each row's dominant column (:func:`dominant_columns`), weight 1."""
    if targets.teacher_queries is not None:
        return dominant_columns(stats)[:, None], torch.ones_like(stats.row_lse)[:, None]
    npos = stats.row_npos
    N = npos.shape[0]
    rows = torch.arange(N, device=npos.device) + spec.offset
    pos = targets.positives if targets.positives is not None else rows
    w = targets.target_weights
    if pos.dim() == 1:
        pos = pos[:, None]
    rows = rows[:, None]
    has = (pos >= 0) & (pos < M)
    if spec.exclude_self:
        has = has & (pos != rows)
    inv = torch.where(npos > 0, 1.0 / torch.where(npos > 0, npos, 1.0), 0.0)[:, None]
    w = (w.to(npos.dtype) if w is not None else 1.0) * inv
    return torch.where(has, pos, 0), torch.where(has, w, 0.0)


def measures_line_sums(spec: LossSpec, targets: Targets, queries: torch.Tensor, needs,
                       ieee: bool, whole_lines: bool = True, return_line_sums: bool = False) -> bool:
    """Whether a backend's backward measures its lines' sums of dS (for
    :func:`correct_line_totals`, or to return them): float32 features whose products the backend
    forms in IEEE arithmetic (``ieee``; with TF32 or 16-bit features the inputs' rounding is far
    above what the sums correct), a feature gradient asked for (``needs``: queries, keys, ...),
    a closure :func:`corrects_line_totals` covers, and a call over whole lines or one that
    returns its sums."""
    return bool((whole_lines or return_line_sums) and (needs[0] or needs[1]) and ieee
                and queries.dtype == torch.float32 and corrects_line_totals(spec, targets))


def correct_line_totals(dq: Optional[torch.Tensor], dk: Optional[torch.Tensor],
                        queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor,
                        spec: LossSpec, targets: Targets, stats: EngineStats, weights,
                        row_sums: torch.Tensor, col_sums: Optional[torch.Tensor] = None,
                        a2_row: Optional[torch.Tensor] = None) -> None:
    """Lift the float32 floor of rows whose target dominates their softmax, in place on the
    float32 gradients ``dq`` (N, D) and ``dk`` (M, D) (either may be None), from a backend's
    measured line sums ``row_sums`` (N,) / ``col_sums`` (M,) | None of dS formed with the closure
    ``weights`` (a_row, b_row, a_col, b_col) of :func:`closure_weights`.

    A backend's dS = a_i P_ij - T_ij / npos_i ... uses P_ij = exp(S_ij - lse_i) from the stored
    LSE and recomputed logits: one ulp of either (~1e-6 nats at |S| ~ 20) scales row i's P by
    (1 + e_i). Where P_it ~ 1 - 1e-3 nearly cancels its target term that is a relative error of
    ~1e-3 in the gradient. The backends measure each line's sum of what they put in dS (row part:
    per row; symmetric column part: per column) and subtract its exact total
    (:func:`line_totals`): row_err (N,) = a_i e_i, col_err (M,) likewise. In row i the
    error is row_err_i sum_j P_ij k_j, which for such a row is row_err_i times its targets' mean
    key tau_i K (tau = T / npos): so dQ -= s (row_err * tau K + tau_c (col_err * K)) and
    dK -= s (tau^T (row_err * Q) + col_err * tau_c^T Q), tau_c the columns' targets. What is left
    is e_i times the row's own gradient, and the float32 rounding of dS_it itself cancels too.
    (A row whose P is spread out is changed by about its own e_i: the same size as before.)
    Teacher targets: both P and the recomputed teacher softmax carry such errors, and the
    correction goes to the row's dominant column, where both concentrate when they nearly cancel.
    Only for a call that sweeps every entry of each line (:func:`corrects_line_totals`)."""
    a_row, b_row, a_col, b_col = weights
    N, M = queries.shape[0], keys.shape[0]
    cols = dict(a_col=a_col, b_col=b_col) if col_sums is not None else {}
    R, C = line_totals(spec, targets, stats, a_row, b_row, M, a2_row, **cols)
    row_err = row_sums - R
    col_err = None if col_sums is None else col_sums - C
    s = scale.to(row_err.dtype).reshape(())
    if targets.row_labels is None:
        key, w = _row_target_pairs(spec, targets, stats, M)
        K = key.shape[1]
        w = w * row_err[:, None]
        if dq is not None:
            for k in range(K):
                dq -= (s * w[:, k:k + 1]) * keys[key[:, k]].to(dq.dtype)
        if dk is not None:
            for k in range(K):
                dk.index_add_(0, key[:, k], (-s * w[:, k:k + 1]) * queries.to(dk.dtype))
    else:  # labels: T(i) = the keys of row i's class (but the excluded self)
        row_cls, col_cls = dense_ids(targets.row_labels, targets.col_labels, rank=True)
        row_cls, col_cls = row_cls.long(), col_cls.long()
        n_cls = N + M
        npos = stats.row_npos
        w = torch.where(npos > 0, row_err / torch.where(npos > 0, npos, 1.0), 0.0)[:, None]
        self_col = (torch.arange(N, device=npos.device) + spec.offset).clamp(0, max(M - 1, 0))
        self_in = torch.zeros(N, dtype=torch.bool, device=npos.device)
        if spec.exclude_self:
            self_in = (self_col == torch.arange(N, device=npos.device) + spec.offset) & (
                col_cls[self_col] == row_cls)
        if dq is not None:
            sums = dq.new_zeros((n_cls, keys.shape[1])).index_add_(0, col_cls, keys.to(dq.dtype))
            centre = sums[row_cls] - self_in[:, None] * keys[self_col].to(dq.dtype)
            dq -= (s * w) * centre
        if dk is not None:
            y = (s * w) * queries.to(dk.dtype)
            sums = dk.new_zeros((n_cls, queries.shape[1])).index_add_(0, row_cls, y)
            dk -= sums[col_cls]
            dk.index_add_(0, self_col, self_in[:, None] * y)
    if col_err is not None:
        pc, pc_ok = _col_positives(spec, targets, M, N, col_err.device)
        pc = torch.where(pc_ok, pc, 0)
        wc = (s * torch.where(pc_ok, col_err, 0.0))[:, None]
        if dq is not None:
            dq.index_add_(0, pc, -wc * keys.to(dq.dtype))
        if dk is not None:
            dk -= wc * queries[pc].to(dk.dtype)
