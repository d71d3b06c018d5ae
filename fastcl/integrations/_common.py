"""Helpers shared by the integrations: a differentiable fused row log-sum-exp."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..autograd import engine_loss
from ..losses import _prepare, _scalar_param
from ..ops import LossSpec, Targets

Tensor = torch.Tensor


def row_lse(a: Tensor, b: Tensor, scale, *, exclude_offset: Optional[int] = None,
            backend: str = "auto") -> Tensor:
    """``LSE_j scale * <a_i, b_j>`` for every row of a (Na,), over j != i + exclude_offset when
    given; differentiable w.r.t. a, b and a tensor scale. One fused sweep: the engine's per-row
    loss ``LSE_i - S_{i,p(i)}`` for some valid column p(i), plus ``S_{i,p(i)}`` computed directly."""
    na, m = a.shape[0], b.shape[0]
    sdt = torch.float64 if a.dtype == torch.float64 else torch.float32
    s = _scalar_param("scale", scale, a.device, optional=False, dtype=sdt)
    idx = torch.arange(na, device=a.device)
    if exclude_offset is None:
        spec = LossSpec(kind="softmax")
        pos = idx % m
    else:
        spec = LossSpec(kind="softmax", exclude_self=True, offset=exclude_offset)
        pos = (idx + exclude_offset + 1) % m
    q, k, be = _prepare(a, b, backend)
    rows, _, _ = engine_loss(q, k, s, None, Targets(positives=pos), spec, be)
    s_pos = s.to(rows.dtype) * (q[:, None, :].to(rows.dtype) @ k[pos].to(rows.dtype)[:, :, None]).reshape(na)
    out = rows + s_pos
    if exclude_offset is not None and m == 1:  # a row whose only column is excluded: LSE of nothing
        out = torch.where(idx + exclude_offset == 0, torch.full_like(out, -math.inf), out)
    return out
