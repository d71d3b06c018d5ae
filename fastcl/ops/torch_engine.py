"""The "torch" backend: the engine contract on materialised row chunks (``fastcl.reference``)."""
from __future__ import annotations

import torch

from .. import reference
from . import (EngineStats, centred_scale_sums, closure_weights, correct_line_totals,
               measures_line_sums, scale_centres)

SPLIT_TARGET_GRADS = True  # accepts grad_row_pos / grad_col_pos and the spec extensions


def _kw(spec, targets):
    return dict(kind=spec.kind, symmetric=spec.symmetric, exclude_self=spec.exclude_self,
                offset=spec.offset, positives=targets.positives,
                col_positives=targets.col_positives, row_labels=targets.row_labels,
                col_labels=targets.col_labels, exclude_targets=spec.exclude_targets,
                target_lse=spec.target_lse, fn_space=spec.fn_space,
                fn_threshold=targets.fn_threshold, row_ids=targets.row_ids, col_ids=targets.col_ids,
                teacher_queries=targets.teacher_queries, teacher_keys=targets.teacher_keys,
                teacher_scale=targets.teacher_scale, lse2_ratio=spec.lse2_ratio,
                guide_queries=targets.guide_queries, guide_keys=targets.guide_keys)


def forward(queries, keys, scale, bias, targets, spec) -> EngineStats:
    return EngineStats(*reference.engine_forward(queries, keys, scale, bias,
                                                 target_weights=targets.target_weights,
                                                 lse_lo=True, **_kw(spec, targets)))


def backward(queries, keys, scale, bias, targets, spec, stats, grad_row, grad_col, needs,
             grad_row_pos=None, grad_col_pos=None, grad_row_lse2=None, whole_lines=True,
             return_line_sums=False):
    """``whole_lines``: the call sweeps every entry of each line's LSE (see
    :func:`fastcl.ops.correct_line_totals`, applied to float32 features).
    ``return_line_sums``: no correction here; the lines' sums of dS are returned after the
    gradients (see :mod:`fastcl.ops`)."""
    need_s, need_b = needs[2], needs[3]
    centred = spec.kind == "softmax" and (need_s or need_b)
    symmetric = spec.symmetric and grad_col is not None
    N, M = queries.shape[0], keys.shape[0]
    centres = None
    if centred and need_s:  # sums centred on the lines' scale_centres, then their known totals added
        centres = (scale_centres(stats.row_lse, scale, bias, M),
                   scale_centres(stats.col_lse, scale, bias, N) if symmetric else None)
    # (float32 products here are IEEE ones)
    measure = measures_line_sums(spec, targets, queries, needs, True, whole_lines, return_line_sums)
    correct = measure and not return_line_sums
    dq, dk, ds, db, *line = reference.engine_backward(
        queries, keys, scale, bias, row_lse=stats.row_lse, row_npos=stats.row_npos,
        col_lse=stats.col_lse, grad_row=grad_row, grad_col=grad_col,
        needs=(needs[0], needs[1], need_s, need_b and not centred),
        row_pos=stats.row_pos, grad_row_pos=grad_row_pos, grad_col_pos=grad_col_pos,
        row_aux=stats.row_aux, grad_row_lse2=grad_row_lse2, centres=centres,
        target_weights=targets.target_weights, line_sums=measure, **_kw(spec, targets))
    extra = (tuple(line) if measure else (None, None)) if return_line_sums else ()
    if not centred and not correct:
        return (dq, dk, ds, db, *extra)
    dt = stats.row_lse.dtype
    a_row, b_row, a_col, b_col = closure_weights(spec, stats, grad_row, grad_row_pos,
                                                 grad_col if symmetric else None, grad_col_pos)
    cols = dict(a_col=a_col, b_col=b_col) if symmetric else {}
    a2 = grad_row_lse2.to(dt) if grad_row_lse2 is not None else None
    if correct:
        correct_line_totals(dq, dk, queries, keys, scale, spec, targets, stats,
                            (a_row, b_row, a_col, b_col), line[0], line[1], a2_row=a2)
    if not centred:
        return (dq, dk, ds, db, *extra)
    # (d_bias alone needs no sweep sum: it is the lines' totals)
    ds = ds.reshape(()) if ds is not None else stats.row_lse.new_zeros(())
    sums = centred_scale_sums(torch.stack([ds, ds.new_zeros(())]), spec, targets, stats,
                              a_row, b_row, scale.to(dt).reshape(()),
                              None if bias is None else bias.to(dt).reshape(()), M, a2_row=a2, **cols)
    return (dq, dk, sums[0:1] if need_s else None, sums[1:2] if need_b else None, *extra)


def count_above(queries, keys, scale, bias, targets, spec, threshold=None):
    return reference.engine_count_above(queries, keys, scale, bias, threshold, **_kw(spec, targets))


def top_negatives(queries, keys, targets, spec, k):
    return reference.engine_top_negatives(queries, keys, k, **_kw(spec, targets))
