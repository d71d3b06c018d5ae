"""pytorch-metric-learning drop-ins: ``NTXentLoss`` and ``SupConLoss`` with pml's call convention
``loss(embeddings (B, D), labels (B,))`` and its default cosine similarity, fused (no B x B matrix
of logits). pytorch-metric-learning itself is not imported.

* ``NTXentLoss(temperature=0.07)``: for every positive pair (a, p) (same label, a != p),
  ``-log( e^{S_ap} / (e^{S_ap} + sum_{n: y_n != y_a} e^{S_an}) )``, mean over positive pairs;
  ``S = cos / temperature``: ``softplus(LSE_neg(a) - S_ap)``, each anchor's log-sum-exp over the
  other labels from one fused sweep that leaves its own label out (no cancellation where the
  positive dominates). Needs a backend with the extended closures ("auto", "triton", "torch").
* ``SupConLoss(temperature=0.1)``: :func:`fastcl.supcon` (variant "out"), mean over anchors that
  have a positive (pml's AvgNonZeroReducer).

``exact`` (both): float32 products in IEEE arithmetic; by default as torch's float32 matmul
precision allows (:func:`fastcl.integrations._common.exact_products`), as pml's own matmuls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..autograd import engine_statistics
from ..losses import _check_features, _check_labels, _prepare, _scalar_param, _stat_dtype, supcon
from ..ops import LossSpec, Targets
from ._common import exact_products

Tensor = torch.Tensor

__all__ = ["NTXentLoss", "SupConLoss", "ntxent_pairs"]


def _check_call(embeddings, labels, indices_tuple, ref_emb, ref_labels) -> Tensor:
    if indices_tuple is not None or ref_emb is not None or ref_labels is not None:
        raise ValueError("indices_tuple, ref_emb and ref_labels are not supported by the fused loss; "
                         "call loss(embeddings, labels)")
    _check_features("embeddings", embeddings)
    if labels is None:
        raise ValueError(f"labels must be an integer tensor of shape ({embeddings.shape[0]},), got None")
    return _check_labels("labels", labels, embeddings.shape[0], embeddings.device)


def _positive_pairs(labels: Tensor):
    """All ordered pairs (a, p), a != p, labels equal, from a sort: O(pairs) memory, not O(B^2)."""
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    size = torch.repeat_interleave(counts, counts)  # group size of each sorted position
    start = torch.repeat_interleave(starts, counts)
    pos_sorted = torch.arange(labels.shape[0], device=labels.device)
    a_sorted = torch.repeat_interleave(pos_sorted, size)
    first = torch.repeat_interleave(start, size)
    within = torch.arange(a_sorted.shape[0], device=labels.device) - torch.repeat_interleave(
        torch.cumsum(size, 0) - size, size)
    p_sorted = first + within
    keep = p_sorted != a_sorted
    return order[a_sorted[keep]], order[p_sorted[keep]]


def ntxent_pairs(embeddings: Tensor, labels: Tensor, temperature: float = 0.07, *,
                 backend: str = "auto", exact: Optional[bool] = None) -> Tensor:
    """pml's NT-Xent (cosine similarity), mean over positive pairs; 0 when there is none."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = nn.functional.normalize(embeddings, dim=-1)
    a, p = _positive_pairs(labels)
    if a.numel() == 0:
        return (x * 0).sum()
    dt = _stat_dtype(x)
    s = _scalar_param("temperature", 1.0 / temperature, x.device, optional=False, dtype=dt)
    q, _, be = _prepare(x, x, backend)
    # each anchor's LSE over the other labels' rows (its own label, itself included, left out)
    spec = LossSpec(kind="softmax", exclude_self=True, exclude_targets=True, gram=True,
                    exact=exact_products(exact))
    neg_lse = engine_statistics(q, q, s, None, Targets(row_labels=labels, col_labels=labels), spec,
                                be).row_lse
    s_ap = s * (x[a].to(dt) * x[p].to(dt)).sum(-1)
    return nn.functional.softplus(neg_lse[a] - s_ap).mean()


class _PairLoss(nn.Module):
    """pml's call convention ``loss(embeddings (B, D), labels (B,))`` around a fused loss."""

    def __init__(self, temperature: float, backend: str, exact: Optional[bool]):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.backend, self.exact = float(temperature), backend, exact

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb=None, ref_labels=None) -> Tensor:
        labels = _check_call(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return self._loss(embeddings, labels)


class NTXentLoss(_PairLoss):
    """Fused pml ``NTXentLoss``: ``forward(embeddings (B, D), labels (B,))``."""

    def __init__(self, temperature: float = 0.07, *, backend: str = "auto", exact: Optional[bool] = None):
        super().__init__(temperature, backend, exact)

    def _loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return ntxent_pairs(embeddings, labels, self.temperature, backend=self.backend, exact=self.exact)


class SupConLoss(_PairLoss):
    """Fused pml ``SupConLoss``: ``forward(embeddings (B, D), labels (B,))``."""

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", exact: Optional[bool] = None):
        super().__init__(temperature, backend, exact)

    def _loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return supcon(embeddings, labels, self.temperature, normalize=True, reduction="mean",
                      backend=self.backend, exact=exact_products(self.exact))
