"""The autograd Function over the engine: forward saves O(N + M) statistics, backward calls the
backend's fused gradient sweep. Every backend (triton, torch, cuda, cpu) goes through here."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _backend
from .ops import EngineStats, LossSpec, Targets, col_losses, row_losses

Tensor = torch.Tensor


def _scalar32(x: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """A (1,) float32 copy of a scalar parameter (float64 for float64 features)."""
    dt = torch.float64 if like.dtype == torch.float64 else torch.float32
    return None if x is None else x.detach().reshape(1).to(dt)


class EngineLoss(torch.autograd.Function):
    """Per-row (N,) and per-column (M,) losses of one engine closure.

    Inputs: queries (N, D), keys (M, D), scale (0-d or (1,) tensor), bias (same, or None),
    targets (:class:`fastcl.ops.Targets`), spec (:class:`fastcl.ops.LossSpec`), backend name.
    Outputs: row losses (N,), column losses (M,) when ``spec.symmetric`` else an empty tensor,
    and the number of positives of each row (N,) (not differentiable).
    """

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor],
                targets: Targets, spec: LossSpec, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
        eng = _backend.engine(backend)
        scale32, bias32 = _scalar32(scale, queries), _scalar32(bias, queries)
        with torch.autocast(queries.device.type, enabled=False):
            stats = eng.forward(queries, keys, scale32, bias32, targets, spec)
            rows = row_losses(stats, spec)
            cols = col_losses(stats) if spec.symmetric else rows.new_zeros(0)
        ctx.save_for_backward(queries, keys, scale32, bias32, *stats)
        ctx.targets, ctx.spec, ctx.backend = targets, spec, backend
        ctx.scale_meta = (scale.shape, scale.dtype)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.mark_non_differentiable(stats.row_npos, *([] if spec.symmetric else [cols]))
        return rows, cols, stats.row_npos

    @staticmethod
    def backward(ctx, grad_rows: Optional[Tensor], grad_cols: Optional[Tensor], _grad_npos=None):
        queries, keys, scale32, bias32, *saved = ctx.saved_tensors
        stats = EngineStats(*saved)
        needs = tuple(ctx.needs_input_grad[:4])
        if not any(needs):
            return (None,) * 7
        if grad_rows is None:
            grad_rows = stats.row_lse.new_zeros(1).expand(queries.shape[0])
        if not ctx.spec.symmetric:
            grad_cols = None
        eng = _backend.engine(ctx.backend)
        with torch.autocast(queries.device.type, enabled=False):
            dq, dk, ds, db = eng.backward(queries, keys, scale32, bias32, ctx.targets, ctx.spec,
                                          stats, grad_rows, grad_cols, needs)
        if ds is not None:
            ds = ds.reshape(ctx.scale_meta[0]).to(ctx.scale_meta[1])
        if db is not None:
            db = db.reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1])
        return dq, dk, ds, db, None, None, None


def engine_loss(queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor],
                targets: Targets, spec: LossSpec, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Functional form of :class:`EngineLoss` (inputs already validated and resolved)."""
    return EngineLoss.apply(queries, keys, scale, bias, targets, spec, backend)
