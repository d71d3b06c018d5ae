"""pytorch-metric-learning drop-ins: ``NTXentLoss`` and ``SupConLoss`` with pml's call convention
``loss(embeddings (B, D), labels (B,))``, or ``loss(embeddings, labels, ref_emb=(R, D),
ref_labels=(R,))`` for the batch against a reference set (every pair, nothing excluded), and its
default cosine similarity, fused (no B x R matrix of logits). Mined pairs (``indices_tuple``) are
refused. Where pml returns 0 (no positive pair, no negative pair, or at most one of each), so do
these, with no host sync to decide it. pytorch-metric-learning itself is not imported.

* ``NTXentLoss(temperature=0.07)``: for every positive pair (a, p) (same label, a != p),
  ``-log( e^{S_ap} / (e^{S_ap} + sum_{n: y_n != y_a} e^{S_an}) )``, mean over positive pairs;
  ``S = cos / temperature``: ``softplus(LSE_neg(a) - S_ap)``, each anchor's log-sum-exp over the
  other labels from one fused sweep that leaves its own label out (no cancellation where the
  positive dominates). Needs a backend with the extended closures ("auto", "triton", "torch").
* ``SupConLoss(temperature=0.1)``: :func:`fastcl.supcon` (variant "out"), mean over anchors that
  have a positive (pml's AvgNonZeroReducer).
* ``SelfSupervisedLoss(loss, symmetric=True)``: pml's wrapper for two augmentations,
  ``forward(embeddings (B, D), ref_emb (B, D))`` with row i of each the same sample: the two
  stacked with labels ``arange(B)`` twice (``symmetric``), or the embeddings against ``ref_emb``.
  It wraps these drop-ins (pml's own wrapper takes them too).

Labels on another device than the embeddings are moved to it, as pml does (pml's wrapper makes
its labels on the CPU).

``exact`` (both): float32 products in IEEE arithmetic; by default as torch's float32 matmul
precision allows (:func:`fastcl.integrations._common.exact_products`), as pml's own matmuls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..autograd import engine_statistics
from ..losses import (_check_features, _check_labels, _check_pair, _prepare, _scalar_param,
                      _stat_dtype, supcon)
from ..ops import LossSpec, Targets
from ._common import exact_products

Tensor = torch.Tensor

__all__ = ["NTXentLoss", "SupConLoss", "SelfSupervisedLoss", "CrossBatchMemory", "ntxent_pairs"]


def _check_call(embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """Validated ``(labels, ref_emb, ref_labels)``; ``ref_emb`` None means the batch against itself."""
    if indices_tuple is not None:
        raise ValueError("indices_tuple (mined pairs) is not supported by the fused loss, which sums "
                         "over every pair; call loss(embeddings, labels) or loss(embeddings, labels, "
                         "ref_emb=..., ref_labels=...)")
    _check_features("embeddings", embeddings)
    if labels is None:
        raise ValueError(f"labels must be an integer tensor of shape ({embeddings.shape[0]},), got None")
    labels = _check_labels("labels", _on(labels, embeddings), embeddings.shape[0], embeddings.device)
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels needs ref_emb")
        return labels, None, None
    _check_pair("embeddings", embeddings, "ref_emb", ref_emb)
    if ref_labels is None:
        raise ValueError(f"ref_labels must be given with ref_emb: an integer tensor of shape "
                         f"({ref_emb.shape[0]},)")
    return labels, ref_emb, _check_labels("ref_labels", _on(ref_labels, ref_emb), ref_emb.shape[0],
                                          ref_emb.device)


def _on(labels, x: Tensor):
    """pml's convention: labels on another device than their embeddings are moved to it."""
    if isinstance(labels, Tensor) and isinstance(x, Tensor) and labels.device != x.device:
        return labels.to(x.device)
    return labels


def _label_ranges(labels: Tensor, key_labels: Tensor):
    """Each label's run in the sorted key labels: (order, lo, hi) with
    ``key_labels[order[lo[i]:hi[i]]] == labels[i]``; O(B + R) memory, no host sync."""
    order = torch.argsort(key_labels, stable=True)
    sorted_keys = key_labels[order].contiguous()
    lo = torch.searchsorted(sorted_keys, labels, side="left")
    hi = torch.searchsorted(sorted_keys, labels, side="right")
    return order, lo, hi


def _positive_pairs(labels: Tensor, key_labels: Optional[Tensor] = None, self_offset: int = 0):
    """All pairs (a, p) with ``labels[a] == key_labels[p]``, but a row's own entry: p != a when
    the keys are the batch itself (``key_labels`` None), p != a + ``self_offset`` when a memory
    holds it (``self_offset`` not None); O(pairs) memory, not O(B x R)."""
    self_pairs = key_labels is None
    order, lo, hi = _label_ranges(labels, labels if self_pairs else key_labels)
    counts = hi - lo
    a = torch.repeat_interleave(torch.arange(labels.shape[0], device=labels.device), counts)
    within = torch.arange(a.shape[0], device=labels.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)
    p = order[lo[a] + within]
    if self_pairs or self_offset is not None:
        keep = p != a + (self_offset or 0)
        a, p = a[keep], p[keep]
    return a, p


def _pml_has_pairs(labels: Tensor, key_labels: Optional[Tensor], own_entries: bool = False) -> Tensor:
    """pml's guard on its pair losses, as a bool tensor (no host sync): a loss only where there
    is a positive pair and a negative pair, and not every index list of length <= 1 (pml returns
    zero then). ``own_entries``: the keys hold each row's own entry, not a pair."""
    self_pairs = key_labels is None
    keys = labels if self_pairs else key_labels
    _, lo, hi = _label_ranges(labels, keys)
    same = (hi - lo).sum()  # ordered pairs with equal labels, self pairs included
    positive = same - labels.shape[0] if self_pairs or own_entries else same
    negative = labels.shape[0] * keys.shape[0] - same
    return (positive > 0) & (negative > 0) & ((positive > 1) | (negative > 1))


def ntxent_pairs(embeddings: Tensor, labels: Tensor, temperature: float = 0.07, *,
                 ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None,
                 self_offset: Optional[int] = None, backend: str = "auto",
                 exact: Optional[bool] = None) -> Tensor:
    """pml's NT-Xent (cosine similarity), mean over positive pairs; 0 when there is none.

    ``embeddings`` (B, D) with ``labels`` (B,) against themselves (pairs a != p), or against
    ``ref_emb`` (R, D) with ``ref_labels`` (R,) (every pair, as pml's ``ref_emb``; with
    ``self_offset`` o, row a's own entry ref_emb[a + o] is not its positive: a memory that holds
    the batch)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels go together")
    x = nn.functional.normalize(embeddings, dim=-1)
    ref = x if ref_emb is None else nn.functional.normalize(ref_emb, dim=-1)
    key_labels = labels if ref_labels is None else ref_labels
    if self_offset is not None and (ref_emb is None or not 0 <= self_offset <= ref_emb.shape[0] - x.shape[0]):
        raise ValueError(f"self_offset needs ref_emb, with 0 <= self_offset <= R - B, got {self_offset!r}")
    a, p = _positive_pairs(labels, ref_labels, self_offset)
    if a.numel() == 0:
        return (x * 0).sum() + (ref * 0).sum()
    dt = _stat_dtype(x)
    s = _scalar_param("temperature", 1.0 / temperature, x.device, optional=False, dtype=dt)
    q, k, be = _prepare(x, ref, backend)
    # each anchor's LSE over the keys of other labels (its own label, itself included, left out)
    gram = ref_emb is None
    spec = LossSpec(kind="softmax", exclude_self=gram, exclude_targets=True, gram=gram,
                    exact=exact_products(exact))
    neg_lse = engine_statistics(q, q if gram else k, s, None,
                                Targets(row_labels=labels, col_labels=key_labels), spec, be).row_lse
    s_ap = s * (x[a].to(dt) * ref[p].to(dt)).sum(-1)
    loss = nn.functional.softplus(neg_lse[a] - s_ap).mean()
    if ref_emb is not None:  # (without ref_emb, pairs come both ways: never a single one)
        has = _pml_has_pairs(labels, ref_labels, self_offset is not None)
        loss = torch.where(has, loss, torch.zeros_like(loss))
    return loss


class _PairLoss(nn.Module):
    """pml's call convention ``loss(embeddings (B, D), labels (B,))`` around a fused loss."""

    def __init__(self, temperature: float, backend: str, exact: Optional[bool]):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.backend, self.exact = float(temperature), backend, exact

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        """``embeddings`` (B, D), ``labels`` (B,); ``ref_emb`` (R, D) with ``ref_labels`` (R,):
        the embeddings against that reference set instead of each other (pml's convention)."""
        labels, ref_emb, ref_labels = _check_call(embeddings, labels, indices_tuple, ref_emb,
                                                  ref_labels)
        return self._loss(embeddings, labels, ref_emb, ref_labels)


class NTXentLoss(_PairLoss):
    """Fused pml ``NTXentLoss``: ``forward(embeddings (B, D), labels (B,))``."""

    def __init__(self, temperature: float = 0.07, *, backend: str = "auto", exact: Optional[bool] = None):
        super().__init__(temperature, backend, exact)

    def _loss(self, embeddings, labels, ref_emb, ref_labels, self_offset=None) -> Tensor:
        return ntxent_pairs(embeddings, labels, self.temperature, ref_emb=ref_emb,
                            ref_labels=ref_labels, self_offset=self_offset, backend=self.backend,
                            exact=self.exact)


class SupConLoss(_PairLoss):
    """Fused pml ``SupConLoss``: ``forward(embeddings (B, D), labels (B,))``."""

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", exact: Optional[bool] = None):
        super().__init__(temperature, backend, exact)

    def _loss(self, embeddings, labels, ref_emb, ref_labels, self_offset=None) -> Tensor:
        loss = supcon(embeddings, labels, self.temperature, keys=ref_emb, key_labels=ref_labels,
                      self_offset=self_offset, normalize=True, reduction="mean",
                      backend=self.backend, exact=exact_products(self.exact))
        has = _pml_has_pairs(labels, ref_labels, self_offset is not None)
        return torch.where(has, loss, torch.zeros_like(loss))


class SelfSupervisedLoss(nn.Module):
    """pml ``SelfSupervisedLoss(loss, symmetric=True)`` around :class:`NTXentLoss` or
    :class:`SupConLoss`: ``forward(embeddings (B, D), ref_emb (B, D))``, ``ref_emb`` an augmentation
    of ``embeddings`` row by row. ``symmetric``: the 2B rows stacked, labels ``arange(B)`` twice
    (each row's positive its other view); else the embeddings against ``ref_emb`` as a reference
    set with the same labels."""

    def __init__(self, loss: nn.Module, symmetric: bool = True):
        super().__init__()
        if not isinstance(loss, (NTXentLoss, SupConLoss)):
            raise TypeError(f"SelfSupervisedLoss wraps fastcl's NTXentLoss or SupConLoss, got "
                            f"{type(loss).__name__}")
        self.loss, self.symmetric = loss, bool(symmetric)

    def forward(self, embeddings: Tensor, ref_emb: Tensor) -> Tensor:
        _check_pair("embeddings", embeddings, "ref_emb", ref_emb)
        if embeddings.shape[0] != ref_emb.shape[0]:
            raise ValueError(f"embeddings and ref_emb must have the same batch size (row i of each "
                             f"is one sample), got {embeddings.shape[0]} and {ref_emb.shape[0]}")
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb]), labels.repeat(2))
        return self.loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels)


class CrossBatchMemory(nn.Module):
    """pml's ``CrossBatchMemory`` around the fused ``NTXentLoss`` / ``SupConLoss``: each call
    enqueues the batch (or the rows of ``enqueue_mask``) into a first-in first-out memory of
    ``memory_size`` detached embeddings and their labels, then takes the loss of the batch (or
    the other rows) against the memory as one rectangular fused sweep, each row's own entry left
    out, as pml does. ``forward(embeddings (B, D), labels (B,), indices_tuple=None,
    enqueue_mask=None)``; ``miner`` and ``indices_tuple`` are refused. The write position lives
    on the host (no sync); ``reset_queue()`` empties the memory."""

    def __init__(self, loss: nn.Module, embedding_size: int, memory_size: int = 1024, miner=None):
        super().__init__()
        if not isinstance(loss, _PairLoss):
            raise TypeError("loss must be fastcl.integrations.pytorch_metric_learning.NTXentLoss or "
                            f"SupConLoss, got {type(loss).__name__}")
        if miner is not None:
            raise ValueError("miner is not supported: the fused loss sums over every pair")
        for name, v in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.loss, self.miner = loss, None
        self.embedding_size, self.memory_size = embedding_size, memory_size
        self.reset_queue()

    def reset_queue(self) -> None:
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.has_been_filled, self.queue_idx = False, 0

    @torch.compiler.disable  # (host-side state: a compiled caller runs it eagerly)
    def _enqueue(self, emb: Tensor, labels: Tensor) -> int:
        """Write the rows at the write position (wrapping around); returns where they start."""
        start, n = self.queue_idx, emb.shape[0]
        idx = (torch.arange(n, device=emb.device) + start) % self.memory_size
        self.embedding_memory[idx] = emb.detach().to(self.embedding_memory.dtype)
        self.label_memory[idx] = labels
        self.queue_idx = (start + n) % self.memory_size
        if not self.has_been_filled and self.queue_idx <= start and n > 0:
            self.has_been_filled = True
        return start

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple=None,
                enqueue_mask: Optional[Tensor] = None) -> Tensor:
        if indices_tuple is not None:
            raise ValueError("indices_tuple (mined pairs) is not supported by the fused loss")
        _check_features("embeddings", embeddings)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have shape (B, {self.embedding_size}), got "
                             f"{tuple(embeddings.shape)}")
        labels = _check_labels("labels", labels, embeddings.shape[0], embeddings.device)
        if (self.embedding_memory.device != embeddings.device
                or self.embedding_memory.dtype != embeddings.dtype):
            self.embedding_memory = self.embedding_memory.to(embeddings.device, embeddings.dtype)
            self.label_memory = self.label_memory.to(embeddings.device)
        if enqueue_mask is not None:
            if (not isinstance(enqueue_mask, Tensor) or enqueue_mask.dtype != torch.bool
                    or enqueue_mask.shape != labels.shape):
                raise ValueError(f"enqueue_mask must be a bool tensor of shape ({labels.shape[0]},)")
            queued, queued_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        else:
            queued, queued_labels = embeddings, labels
        if queued.shape[0] > self.memory_size:
            raise ValueError(f"{queued.shape[0]} rows to enqueue do not fit memory_size "
                             f"{self.memory_size}")
        start = self._enqueue(queued, queued_labels)
        size = self.memory_size if self.has_been_filled else self.queue_idx
        keys, key_labels = self.embedding_memory[:size], self.label_memory[:size]
        offset = None
        if enqueue_mask is None:  # each row's own entry: key start + i (modulo the memory)
            offset = start
            if start + embeddings.shape[0] > size:  # wrapped: rotate it to the front
                keys, key_labels = keys.roll(-start, 0), key_labels.roll(-start, 0)
                offset = 0
        if embeddings.shape[0] == 0 or size == 0:
            return (embeddings * 0).sum()
        return self.loss._loss(embeddings, labels, keys, key_labels, offset)
