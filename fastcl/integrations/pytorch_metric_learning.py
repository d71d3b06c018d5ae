"""pytorch-metric-learning drop-ins: ``NTXentLoss`` and ``SupConLoss`` with pml's call convention
``loss(embeddings (B, D), labels (B,))`` and its default cosine similarity, fused (no B x B matrix
of logits). pytorch-metric-learning itself is not imported.

* ``NTXentLoss(temperature=0.07)``: for every positive pair (a, p) (same label, a != p),
  ``-log( e^{S_ap} / (e^{S_ap} + sum_{n: y_n != y_a} e^{S_an}) )``, mean over positive pairs;
  ``S = cos / temperature``. With two views per label (SimCLR) each anchor has one positive and
  the denominator is the fused row log-sum-exp itself. With more positives per anchor the
  negatives' log-sum-exp is the row's minus its positives' (in float64; it loses relative
  precision only when the positives carry nearly all the mass, where that term is negligible).
* ``SupConLoss(temperature=0.1)``: :func:`fastcl.supcon` (variant "out"), mean over anchors that
  have a positive (pml's AvgNonZeroReducer).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..losses import _check_features, _check_labels, supcon
from ._common import row_lse

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
                 backend: str = "auto") -> Tensor:
    """pml's NT-Xent (cosine similarity), mean over positive pairs; 0 when there is none."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = nn.functional.normalize(embeddings, dim=-1)
    scale = 1.0 / temperature
    a, p = _positive_pairs(labels)
    if a.numel() == 0:
        return (x * 0).sum()
    lse_all = row_lse(x, x, scale, exclude_offset=0, backend=backend)  # (B,) over j != a
    wdt = torch.float64
    s_ap = (scale * (x[a] * x[p]).sum(-1)).to(wdt)
    B = x.shape[0]
    npos = torch.bincount(a, minlength=B)
    # log-sum-exp of each anchor's positives, then of its negatives = all minus positives
    m = torch.full((B,), -float("inf"), dtype=wdt, device=x.device).scatter_reduce(
        0, a, s_ap.detach(), reduce="amax", include_self=True)
    pos_sum = torch.zeros(B, dtype=wdt, device=x.device).index_add(0, a, torch.exp(s_ap - m[a]))
    has = npos > 0
    pos_lse = torch.where(has, m + torch.log(torch.where(has, pos_sum, torch.ones_like(pos_sum))),
                          torch.full_like(pos_sum, -float("inf")))
    lse = lse_all.to(wdt)
    delta = (pos_lse - lse).clamp(max=-1e-30)
    neg_lse = lse + torch.log(-torch.expm1(delta))
    single = (npos == 1)[a]
    pair = torch.where(single, lse[a] - s_ap, torch.logaddexp(s_ap, neg_lse[a]) - s_ap)
    return pair.mean().to(lse_all.dtype)


class _PairLoss(nn.Module):
    """pml's call convention ``loss(embeddings (B, D), labels (B,))`` around a fused loss."""

    def __init__(self, temperature: float, backend: str):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.backend = float(temperature), backend

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb=None, ref_labels=None) -> Tensor:
        labels = _check_call(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return self._loss(embeddings, labels)


class NTXentLoss(_PairLoss):
    """Fused pml ``NTXentLoss``: ``forward(embeddings (B, D), labels (B,))``."""

    def __init__(self, temperature: float = 0.07, *, backend: str = "auto"):
        super().__init__(temperature, backend)

    def _loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return ntxent_pairs(embeddings, labels, self.temperature, backend=self.backend)


class SupConLoss(_PairLoss):
    """Fused pml ``SupConLoss``: ``forward(embeddings (B, D), labels (B,))``."""

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto"):
        super().__init__(temperature, backend)

    def _loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return supcon(embeddings, labels, self.temperature, normalize=True, reduction="mean",
                      backend=self.backend)
