"""info-nce-pytorch drop-ins: ``InfoNCE`` and ``info_nce`` with that package's signatures
(``info_nce(query, positive_key, negative_keys=None, temperature=0.1, reduction="mean",
negative_mode="unpaired")``) and numbers, cosine similarities at 1 / temperature. The package
itself is not imported.

* No ``negative_keys``: each query against every positive key, its own the target
  (:func:`fastcl.info_nce`, one fused sweep).
* ``negative_mode="unpaired"``, negative keys (M, D) shared by every query: each query's own
  positive and the M negatives (not the other queries' positives): ``softplus(LSE_j S_ij - S_ii)``
  with the LSE over the negatives from one fused sweep; no N x M matrix.
* ``negative_mode="paired"``, negative keys (N, M, D) of each query: already O(N M D) input, so
  the (N, M) logits are formed directly, as the package does.

``exact``: float32 products in IEEE arithmetic; by default as torch's float32 matmul precision
allows (:func:`fastcl.integrations._common.exact_products`), as the package's own matmuls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..losses import info_nce as _fused_info_nce
from ._common import exact_products, positive_against

Tensor = torch.Tensor

__all__ = ["InfoNCE", "info_nce"]

_REDUCTIONS = ("none", "sum", "mean")


def _check(query, positive_key, negative_keys, negative_mode: str, reduction: str) -> None:
    if negative_mode not in ("unpaired", "paired"):
        raise ValueError(f"negative_mode must be 'unpaired' or 'paired', got {negative_mode!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(query, Tensor) or query.dim() != 2:
        raise ValueError("<query> must have 2 dimensions.")
    if not isinstance(positive_key, Tensor) or positive_key.dim() != 2:
        raise ValueError("<positive_key> must have 2 dimensions.")
    if negative_keys is not None:
        want = 2 if negative_mode == "unpaired" else 3
        if not isinstance(negative_keys, Tensor) or negative_keys.dim() != want:
            raise ValueError(f"<negative_keys> must have {want} dimensions if <negative_mode> == "
                             f"'{negative_mode}'.")
        if negative_mode == "paired" and len(query) != len(negative_keys):
            raise ValueError("If negative_mode == 'paired', then <negative_keys> must have the same "
                             "number of samples as <query>.")
        if query.shape[-1] != negative_keys.shape[-1]:
            raise ValueError("Vectors of <query> and <negative_keys> should have the same number of "
                             "components.")
    if len(query) != len(positive_key):
        raise ValueError("<query> and <positive_key> must have the same number of samples.")
    if query.shape[-1] != positive_key.shape[-1]:
        raise ValueError("Vectors of <query> and <positive_key> should have the same number of "
                         "components.")
    for name, x in (("query", query), ("positive_key", positive_key), ("negative_keys", negative_keys)):
        if x is not None and not x.is_floating_point():
            raise TypeError(f"<{name}> must be a floating-point tensor, got {x.dtype}")


def _reduce(per: Tensor, reduction: str) -> Tensor:
    return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per


def info_nce(query: Tensor, positive_key: Tensor, negative_keys: Optional[Tensor] = None,
             temperature: float = 0.1, reduction: str = "mean", negative_mode: str = "unpaired",
             *, backend: str = "auto", exact: Optional[bool] = None) -> Tensor:
    """InfoNCE of ``query`` (N, D) with ``positive_key`` (N, D) and optional ``negative_keys``
    ((M, D) unpaired, (N, M, D) paired), all L2-normalised; see the module's docstring."""
    _check(query, positive_key, negative_keys, negative_mode, reduction)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ex = exact_products(exact)
    q = nn.functional.normalize(query, dim=-1)
    p = nn.functional.normalize(positive_key, dim=-1)
    scale = 1.0 / temperature
    if negative_keys is None:
        return _fused_info_nce(q, p, scale=scale, reduction=reduction, backend=backend, exact=ex)
    n = nn.functional.normalize(negative_keys, dim=-1)
    if negative_mode == "unpaired":
        return _reduce(positive_against(q, p, n, scale, backend=backend, exact=ex), reduction)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s_pos = scale * (q.to(dt) * p.to(dt)).sum(1)  # (no negatives: logsumexp -inf, a zero loss)
    lse = torch.logsumexp(scale * torch.einsum("nd,nmd->nm", q.to(dt), n.to(dt)), 1)
    return _reduce(nn.functional.softplus(lse - s_pos), reduction)


class InfoNCE(nn.Module):
    """info-nce-pytorch ``InfoNCE``: ``forward(query, positive_key, negative_keys=None)``."""

    def __init__(self, temperature: float = 0.1, reduction: str = "mean",
                 negative_mode: str = "unpaired", *, backend: str = "auto",
                 exact: Optional[bool] = None):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if negative_mode not in ("unpaired", "paired"):
            raise ValueError(f"negative_mode must be 'unpaired' or 'paired', got {negative_mode!r}")
        self.temperature, self.reduction, self.negative_mode = temperature, reduction, negative_mode
        self.backend, self.exact = backend, exact

    def forward(self, query: Tensor, positive_key: Tensor,
                negative_keys: Optional[Tensor] = None) -> Tensor:
        return info_nce(query, positive_key, negative_keys, temperature=self.temperature,
                        reduction=self.reduction, negative_mode=self.negative_mode,
                        backend=self.backend, exact=self.exact)
