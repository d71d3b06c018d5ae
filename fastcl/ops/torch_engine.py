"""The "torch" backend: the engine contract on materialised row chunks (``fastcl.reference``)."""
from __future__ import annotations

from .. import reference
from . import EngineStats

SPLIT_TARGET_GRADS = True  # accepts grad_row_pos / grad_col_pos and the spec extensions


def _kw(spec, targets):
    return dict(kind=spec.kind, symmetric=spec.symmetric, exclude_self=spec.exclude_self,
                offset=spec.offset, positives=targets.positives,
                col_positives=targets.col_positives, row_labels=targets.row_labels,
                col_labels=targets.col_labels, exclude_targets=spec.exclude_targets,
                target_lse=spec.target_lse, fn_space=spec.fn_space,
                fn_threshold=targets.fn_threshold, row_ids=targets.row_ids, col_ids=targets.col_ids,
                teacher_queries=targets.teacher_queries, teacher_keys=targets.teacher_keys,
                teacher_scale=targets.teacher_scale, lse2_ratio=spec.lse2_ratio)


def forward(queries, keys, scale, bias, targets, spec) -> EngineStats:
    return EngineStats(*reference.engine_forward(queries, keys, scale, bias, **_kw(spec, targets)))


def backward(queries, keys, scale, bias, targets, spec, stats, grad_row, grad_col, needs,
             grad_row_pos=None, grad_col_pos=None, grad_row_lse2=None):
    return reference.engine_backward(
        queries, keys, scale, bias, row_lse=stats.row_lse, row_npos=stats.row_npos,
        col_lse=stats.col_lse, grad_row=grad_row, grad_col=grad_col, needs=tuple(needs),
        row_pos=stats.row_pos, grad_row_pos=grad_row_pos, grad_col_pos=grad_col_pos,
        row_aux=stats.row_aux, grad_row_lse2=grad_row_lse2,
        **_kw(spec, targets))


def count_above(queries, keys, scale, bias, targets, spec, threshold=None):
    return reference.engine_count_above(queries, keys, scale, bias, threshold, **_kw(spec, targets))


def top_negatives(queries, keys, targets, spec, k):
    return reference.engine_top_negatives(queries, keys, k, **_kw(spec, targets))
