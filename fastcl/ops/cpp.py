"""The "cpu" and "cuda" backends: typed wrappers over the compiled ops ``torch.ops.fastcl.*``.

The ops live in the extension ``fastcl._C`` (csrc/); the dispatcher picks the CPU or CUDA kernel
from the device of the inputs. Fake (meta) kernels are registered here so that
``torch.compile(fullgraph=True)`` traces through both ops.

Op conventions (see csrc/ops.cpp): ``kind`` is 0 (softmax) or 1 (sigmoid); ``engine_forward``
returns (row_lse, row_pos, row_npos, col_lse, col_pos, row_lse_lo, col_lse_lo) in float32 with
(0,)-shaped column outputs when not symmetric (the *_lo outputs: the LSEs' rounding errors);
``engine_backward`` returns (d_queries, d_keys, d_scale, d_bias, row_sums, col_sums) with an
empty (0,) tensor for every gradient that was not asked for, and the lines' sums of dS's row /
column parts (float32 (N,) / (M,)) when ``line_sums`` is set, else (0,); on the CPU,
``correct_line_totals_`` applies :func:`fastcl.ops.correct_line_totals` from those sums in one
call (CUDA takes the Python form). On the CPU, ``engine_step`` is both of a row-only closure in
one sweep, with every row's gradient weight 1 (:func:`step`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import (EngineStats, LossSpec, Targets, closure_weights, correct_line_totals,
               measures_line_sums)

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.fastcl.*)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "fastcl.ops.cpp needs the compiled extension fastcl._C, which failed to import "
        f"({e}). Rebuild with a C++ compiler (and CUDA_HOME for the CUDA kernels), e.g. "
        "`pip install --no-build-isolation -e .`, or use backend='torch' / 'triton'.") from e

Tensor = torch.Tensor

__all__ = ["forward", "backward", "step", "KINDS"]

KINDS = {"softmax": 0, "sigmoid": 1}


def _register_fake(name: str):
    reg = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract
    return reg(name)


@_register_fake("fastcl::engine_forward")
def _engine_forward_fake(queries, keys, scale, bias, positives, col_positives, row_labels,
                         col_labels, kind, symmetric, exclude_self, offset, exact):
    N, M = queries.shape[0], keys.shape[0]
    f32 = dict(dtype=torch.float32, device=queries.device)
    mc = M if symmetric else 0
    return (queries.new_empty((N,), **f32), queries.new_empty((N,), **f32),
            queries.new_empty((N,), **f32), queries.new_empty((mc,), **f32),
            queries.new_empty((mc,), **f32), queries.new_empty((N,), **f32),
            queries.new_empty((mc,), **f32))


@_register_fake("fastcl::engine_backward")
def _engine_backward_fake(queries, keys, scale, bias, positives, col_positives, row_labels,
                          col_labels, kind, symmetric, exclude_self, offset, exact, row_lse,
                          row_npos, col_lse, grad_row, grad_col, need_queries, need_keys,
                          need_scale, need_bias, line_sums):
    f32 = dict(dtype=torch.float32, device=queries.device)
    col_lines = line_sums and grad_col is not None
    return (queries.new_empty(queries.shape if need_queries else (0,)),
            keys.new_empty(keys.shape if need_keys else (0,)),
            queries.new_empty((1,) if need_scale else (0,), **f32),
            queries.new_empty((1,) if need_bias else (0,), **f32),
            queries.new_empty((queries.shape[0] if line_sums else 0,), **f32),
            queries.new_empty((keys.shape[0] if col_lines else 0,), **f32))


@_register_fake("fastcl::engine_step")
def _engine_step_fake(queries, keys, scale, bias, positives, row_labels, col_labels, kind,
                      exclude_self, offset, need_queries, need_keys, need_scale, need_bias,
                      line_sums):
    N = queries.shape[0]
    f32 = dict(dtype=torch.float32, device=queries.device)
    return (*(queries.new_empty((N,), **f32) for _ in range(4)),
            queries.new_empty(queries.shape if need_queries else (0,), **f32),
            queries.new_empty(keys.shape if need_keys else (0,), **f32),
            queries.new_empty((1,) if need_scale else (0,), **f32),
            queries.new_empty((1,) if need_bias else (0,), **f32),
            queries.new_empty((N if line_sums else 0,), **f32))


@_register_fake("fastcl::correct_line_totals_")
def _correct_line_totals_fake(d_queries, d_keys, queries, keys, scale, positives, col_positives,
                              row_labels, col_labels, offset, exclude_self, row_lse, row_npos,
                              col_lse, grad_row, grad_col, row_sums, col_sums):
    return None


def _kind(spec: LossSpec) -> int:
    if spec.kind not in KINDS:
        raise ValueError(f"spec.kind must be one of {tuple(KINDS)}, got {spec.kind!r}")
    return KINDS[spec.kind]


def forward(queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor],
            targets: Targets, spec: LossSpec) -> EngineStats:
    """Engine statistics of queries (N, D) against keys (M, D); see :mod:`fastcl.ops`.

    scale / bias: float32 (1,) tensors (bias may be None). Returns float32 statistics:
    row_lse, row_pos, row_npos (N,), and col_lse, col_pos (M,) when ``spec.symmetric``, and the
    LSEs' rounding errors row_lse_lo (softmax) / col_lse_lo.
    """
    row_lse, row_pos, row_npos, col_lse, col_pos, row_lo, col_lo = torch.ops.fastcl.engine_forward(
        queries, keys, scale, bias, targets.positives, targets.col_positives, targets.row_labels,
        targets.col_labels, _kind(spec), spec.symmetric, spec.exclude_self, spec.offset,
        spec.exact)
    if not spec.symmetric:
        col_lse = col_pos = col_lo = None
    if spec.kind != "softmax":
        row_lo = None
    return EngineStats(row_lse, row_pos, row_npos, col_lse, col_pos, row_lse_lo=row_lo,
                       col_lse_lo=col_lo)


def backward(queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor],
             targets: Targets, spec: LossSpec, stats: EngineStats, grad_row: Tensor,
             grad_col: Optional[Tensor], needs: Sequence[bool], whole_lines: bool = True,
             return_line_sums: bool = False) -> Tuple[Optional[Tensor], ...]:
    """Gradients of sum_i g_i L_i (+ sum_j gc_j Lc_j) from the saved statistics.

    grad_row: (N,), grad_col: (M,) or None (either may be a stride-0 expanded tensor).
    needs: (queries, keys, scale, bias) flags. Returns (d_queries (N, D) | None, d_keys (M, D) |
    None, d_scale (1,) | None, d_bias (1,) | None); d_bias is None whenever bias is None.
    ``whole_lines``: the call sweeps every entry of each line, so float32 feature gradients with
    IEEE products (always on the CPU; ``spec.exact`` on CUDA) get the line-total correction
    (:func:`fastcl.ops.correct_line_totals`) from the kernels' line sums.
    ``return_line_sums``: no correction here; those sums follow the gradients (row_sums (N,) |
    None, col_sums (M,) | None).
    """
    need_q, need_k, need_s, need_b = (bool(x) for x in needs)
    need_b = need_b and bias is not None
    if not spec.symmetric:
        grad_col = None
    col_lse = stats.col_lse if grad_col is not None else None
    ieee = keys.dtype == torch.float32 and (spec.exact or queries.device.type == "cpu")
    lines = measures_line_sums(spec, targets, queries, (need_q, need_k), ieee, whole_lines,
                               return_line_sums)
    dq, dk, ds, db, row_sums, col_sums = torch.ops.fastcl.engine_backward(
        queries, keys, scale, bias, targets.positives, targets.col_positives, targets.row_labels,
        targets.col_labels, _kind(spec), spec.symmetric, spec.exclude_self, spec.offset,
        spec.exact, stats.row_lse, stats.row_npos, col_lse, grad_row, grad_col, need_q, need_k,
        need_s, need_b, lines)
    col_sums = col_sums if grad_col is not None else None
    extra = ()
    if return_line_sums:
        extra = (row_sums, col_sums) if lines else (None, None)
    elif lines and queries.device.type == "cpu":
        torch.ops.fastcl.correct_line_totals_(
            dq, dk, queries, keys, scale, targets.positives, targets.col_positives,
            targets.row_labels, targets.col_labels, spec.offset, spec.exclude_self, stats.row_lse,
            stats.row_npos, col_lse, grad_row, grad_col, row_sums, col_sums)
    elif lines:
        correct_line_totals(dq if need_q else None, dk if need_k else None, queries, keys, scale,
                            spec, targets, stats, closure_weights(spec, stats, grad_row,
                                                                  grad_col=grad_col),
                            row_sums, col_sums)
    return (dq if need_q else None, dk if need_k else None, ds if need_s else None,
            db if need_b else None, *extra)


def takes_step(queries: Tensor, spec: LossSpec, targets: Targets) -> bool:
    """Whether :func:`step` serves the call: CPU tensors (the op has a CPU kernel only)."""
    return queries.device.type == "cpu"


def step(queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor], targets: Targets,
         spec: LossSpec, needs: Sequence[bool], weight: float = 1.0):
    """:func:`forward` and the gradients of ``weight * sum_i L_i`` of a row-only closure
    (``spec.symmetric`` false) in one sweep of CPU tensors, each tile's products formed once:
    (EngineStats, (d_queries, d_keys, d_scale, d_bias)), the gradients float32 (N, D) / (M, D) /
    (1,) / (1,), None where ``needs`` (queries, keys, scale, bias) is false, with the float32
    line-total correction :func:`backward` applies."""
    if spec.symmetric:
        raise ValueError("step serves row-only closures (spec.symmetric must be False)")
    need_q, need_k, need_s, need_b = (bool(x) for x in needs)
    need_b = need_b and bias is not None
    lines = measures_line_sums(spec, targets, queries, (need_q, need_k), True)
    (row_lse, row_pos, row_npos, row_lo, dq, dk, ds, db,
     row_sums) = torch.ops.fastcl.engine_step(
        queries, keys, scale, bias, targets.positives, targets.row_labels, targets.col_labels,
        _kind(spec), spec.exclude_self, spec.offset, need_q, need_k, need_s, need_b, lines)
    if lines:
        torch.ops.fastcl.correct_line_totals_(
            dq, dk, queries, keys, scale, targets.positives, None, targets.row_labels,
            targets.col_labels, spec.offset, spec.exclude_self, row_lse, row_npos, None,
            row_lse.new_ones(row_lse.shape), None, row_sums, None)
    stats = EngineStats(row_lse, row_pos, row_npos, None, None,
                        row_lse_lo=row_lo if spec.kind == "softmax" else None)
    if weight != 1.0:  # (float32: the one rounding to the features' dtype comes later)
        for g in (dq, dk, ds, db):
            if g is not None:
                g.mul_(weight)
    return stats, (dq if need_q else None, dk if need_k else None, ds if need_s else None,
                   db if need_b else None)
