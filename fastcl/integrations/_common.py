"""Helpers shared by the integrations: the fused row log-sum-exp and gap, and the float32 product
precision of a drop-in."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..autograd import engine_loss, engine_statistics
from ..losses import _prepare, _scalar_param, tf32_products, tie_slack
from ..ops import LossSpec, Targets

Tensor = torch.Tensor


def exact_products(exact: Optional[bool]) -> bool:
    """Whether a drop-in forms float32 products in IEEE arithmetic: ``exact`` when given, else as
    the library it replaces would, following torch's float32 matmul precision (TF32 only where
    it is allowed: ``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``allow_tf32``,
    ``torch.set_float32_matmul_precision("high")``)."""
    if exact is not None:
        return bool(exact)
    matmul = torch.backends.cuda.matmul
    try:
        precision = getattr(matmul, "fp32_precision", None)  # (torch >= 2.9)
    except (RuntimeError, AttributeError):
        precision = None
    if precision is not None:
        return precision != "tf32"
    return not matmul.allow_tf32


def _gap(q: Tensor, k: Tensor, s: Tensor, targets: Tensor, exclude_offset: Optional[int], be: str,
         exact: bool) -> Tensor:
    spec = LossSpec(kind="softmax", exact=exact) if exclude_offset is None else \
        LossSpec(kind="softmax", exclude_self=True, offset=exclude_offset, exact=exact)
    rows, _, _ = engine_loss(q, k, s, None, Targets(positives=targets), spec, be)
    return rows


def _scale(a: Tensor, scale) -> Tensor:
    sdt = torch.float64 if a.dtype == torch.float64 else torch.float32
    return _scalar_param("scale", scale, a.device, optional=False, dtype=sdt)


def row_gap(a: Tensor, b: Tensor, scale, targets: Tensor, *, exclude_offset: Optional[int] = None,
            backend: str = "auto", exact: bool = False) -> Tensor:
    """``LSE_j S_ij - S_{i,t(i)}`` (Na,) with ``S = scale <a_i, b_j>`` (over j != i +
    exclude_offset when given) and ``targets`` t (Na,) int64 column indices: the engine's per-row
    loss, its target logit from the same sweep (where the two nearly cancel, their difference
    keeps float32 accuracy, which an LSE and a logit computed apart would not)."""
    q, k, be = _prepare(a, b, backend)
    return _gap(q, k, _scale(a, scale), targets, exclude_offset, be, exact)


def row_lse(a: Tensor, b: Tensor, scale, *, exclude_offset: Optional[int] = None,
            backend: str = "auto", exact: bool = False) -> Tensor:
    """``LSE_j scale * <a_i, b_j>`` for every row of a (Na,), over j != i + exclude_offset when
    given; differentiable w.r.t. a, b and a tensor scale. One fused sweep: :func:`row_gap` at
    some valid column p(i), plus ``S_{i,p(i)}`` computed directly."""
    na, m = a.shape[0], b.shape[0]
    idx = torch.arange(na, device=a.device)
    pos = idx % m if exclude_offset is None else (idx + exclude_offset + 1) % m
    q, k, be = _prepare(a, b, backend)
    s = _scale(a, scale)
    rows = _gap(q, k, s, pos, exclude_offset, be, exact)
    s_pos = s.to(rows.dtype) * (q[:, None, :].to(rows.dtype) @ k[pos].to(rows.dtype)[:, :, None]).reshape(na)
    out = rows + s_pos
    if exclude_offset is not None and m == 1:  # a row whose only column is excluded: LSE of nothing
        out = torch.where(idx + exclude_offset == 0, torch.full_like(out, -math.inf), out)
    return out


def statistics(a: Tensor, b: Tensor, scale, targets: Tensor, *, backend: str = "auto",
               exact: bool = False, make_targets=None, **spec):
    """Engine statistics (:class:`fastcl.autograd.Statistics`) of ``S = scale <a_i, b_j>``, one
    fused sweep (a backend with the extended closures): ``targets`` t(i) (Na,) the rows' index
    targets (-1: none), ``spec`` the softmax closure's :class:`fastcl.ops.LossSpec` fields;
    ``make_targets(q, backend)`` the rest of the :class:`fastcl.ops.Targets` as a dict, built
    from the prepared (autocast) queries."""
    q, k, be = _prepare(a, b, backend)
    extra = make_targets(q, be) if make_targets is not None else {}
    return engine_statistics(q, k, _scale(a, scale), None, Targets(positives=targets, **extra),
                             LossSpec(kind="softmax", exact=exact, **spec), be)


def row_lse_without(a: Tensor, b: Tensor, scale, targets: Tensor, *, row_ids: Optional[Tensor] = None,
                    col_ids: Optional[Tensor] = None, backend: str = "auto",
                    exact: bool = False) -> Tensor:
    """``LSE_j scale <a_i, b_j>`` (Na,) over the columns j other than ``targets`` t(i) (Na,) and,
    when ids are given, other than those with ``col_ids[j] == row_ids[i]``: one fused sweep (a
    backend with the extended closures); -inf for a row with no such column."""
    return statistics(a, b, scale, targets, backend=backend, exact=exact, exclude_targets=True,
                      make_targets=lambda q, be: dict(row_ids=row_ids, col_ids=col_ids)).row_lse


def row_gap_without(a: Tensor, b: Tensor, scale, targets: Tensor, row_ids: Tensor, col_ids: Tensor, *,
                    backend: str = "auto", exact: bool = False) -> Tensor:
    """:func:`row_gap` over the columns other than those with ``col_ids[j] == row_ids[i]`` (the
    target t(i) kept)."""
    return statistics(a, b, scale, targets, backend=backend, exact=exact,
                      make_targets=lambda q, be: dict(row_ids=row_ids, col_ids=col_ids)).row_gap()


def guided_statistics(a: Tensor, b: Tensor, scale, guide_a: Tensor, guide_b: Tensor,
                      threshold: Tensor, targets: Optional[Tensor] = None, *, backend: str = "auto",
                      exact: bool = False):
    """:func:`statistics` over the columns j whose guide product ``<guide_a_i, guide_b_j>`` is at
    most ``threshold`` (Na,) (GISTEmbed's false-negative rule, the guide's products recomputed in
    the tiles, in the features' precision; within rounding of the threshold they stay, see
    :func:`fastcl.losses.tie_slack`), the target column ``targets`` t(i) (Na,) always kept;
    ``targets`` None: rows without a target. No gradient reaches the guide or the threshold."""
    if targets is None:
        targets = torch.full((a.shape[0],), -1, dtype=torch.int64, device=a.device)

    def guide(q, be):
        u, v = guide_a.detach().to(q.dtype), guide_b.detach().to(q.dtype)
        stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        thr = threshold.detach().to(stat_dtype) + tie_slack(u, v, tf32_products(q, be, exact))
        return dict(fn_threshold=thr, guide_queries=u, guide_keys=v)

    return statistics(a, b, scale, targets, backend=backend, exact=exact, fn_space=3,
                      make_targets=guide)


def positive_against(q: Tensor, p: Tensor, negatives: Tensor, scale, *, backend: str = "auto",
                     exact: bool = False) -> Tensor:
    """``-log softmax`` of each row's own positive among it and shared negatives (Na,):
    ``softplus(LSE_j scale <q_i, n_j> - scale <q_i, p_i>)``, the negatives' LSE one fused sweep
    (:func:`row_lse`; none: a zero loss). MoCo's queue, info-nce-pytorch's unpaired negatives."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s_pos = scale * (q.to(dt) * p.to(dt)).sum(1)
    if negatives.shape[0] == 0:
        return torch.zeros_like(s_pos)
    lse = row_lse(q, negatives.to(q.device, q.dtype), scale, backend=backend, exact=exact)
    return torch.nn.functional.softplus(lse - s_pos)


class _ScaledGrad(torch.autograd.Function):
    """Identity whose gradient is multiplied by ``factor``."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scaled_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` with its gradient multiplied by ``factor``: logits ``(s + a) <x, y>`` whose extra ``a``
    is a detached penalty take the gradient of ``s <x, y>`` alone when both factors go through
    this with ``s / (s + a)``."""
    return _ScaledGrad.apply(x, float(factor))
