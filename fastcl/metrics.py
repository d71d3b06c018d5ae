"""Metrics from the engine's sweep, without an N x M matrix (no gradients)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from . import _backend
from .losses import _check_index, _check_pair, _prepare, alignment_loss, uniformity_loss
from .ops import LossSpec, Targets

Tensor = torch.Tensor

__all__ = ["retrieval", "hard_negatives", "uniformity", "alignment"]


@torch.no_grad()
def retrieval(queries: Tensor, keys: Tensor, positives: Optional[Tensor] = None,
              ks: Sequence[int] = (1, 5, 10), *, backend: str = "auto",
              exact: bool = False) -> Dict[str, Tensor]:
    """Recall@k and MRR of retrieving each query's positive key among all keys.

    Args:
        queries: (N, D); keys: (M, D); positives: (N,) key index of each query's positive
            (default ``arange(N)``, M >= N).
        ks: the cut-offs of Recall@k.
    Returns:
        ``{"R@k": 0-d tensor for each k, "MRR": 0-d tensor, "ranks": (N,) float32}``; the rank
        of the positive is 1 + the number of keys scoring strictly higher (ties favour it: the
        positive's score is computed in the same arithmetic as the others'). A row whose query,
        positive or any key is not finite gets rank NaN: it counts as a miss in R@k and makes the
        MRR NaN, rather than passing as a hit.
    """
    _check_pair("queries", queries, "keys", keys)
    N, M = queries.shape[0], keys.shape[0]
    if positives is None:
        if M < N:
            raise ValueError(f"keys must have at least as many rows as queries when positives is "
                             f"None, got N={N} and M={M}")
    else:
        positives = _check_index("positives", positives, N, M, "key indices", queries.device)
    if isinstance(ks, int) or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a sequence of positive integers, got {ks!r}")
    queries, keys, be = _prepare(queries, keys, backend)
    be = _backend.concrete(be, extended=True)
    eng = _backend.engine(be)
    if not hasattr(eng, "count_above"):
        raise ValueError(f"backend={be!r} does not compute ranks; use backend='triton' or 'torch'")
    dt = torch.float64 if queries.dtype == torch.float64 else torch.float32
    scale = torch.ones(1, dtype=dt, device=queries.device)
    targets, spec = Targets(positives=positives), LossSpec(kind="softmax", exact=exact)
    with torch.autocast(queries.device.type, enabled=False):  # cast above, computed as the losses
        ranks = eng.count_above(queries, keys, scale, None, targets, spec).float() + 1
    key_pos = keys[:N] if positives is None else keys.index_select(0, positives)
    finite = (torch.isfinite(queries).all(1) & torch.isfinite(key_pos).all(1)
              & torch.isfinite(keys).all())
    ranks = torch.where(finite, ranks, torch.full_like(ranks, float("nan")))
    out = {f"R@{k}": (ranks <= k).float().mean() for k in ks}
    out["MRR"] = ranks.reciprocal().mean()
    out["ranks"] = ranks
    return out


@torch.no_grad()
def hard_negatives(queries: Tensor, keys: Tensor, positives: Optional[Tensor] = None, k: int = 10, *,
                   exclude_self: bool = False, backend: str = "auto", exact: bool = False):
    """Hard-negative mining from one sweep: each query's k most similar keys (by <q_i, k_j>)
    other than its positive, without an N x M matrix.

    Args:
        queries: (N, D); keys: (M, D); positives: (N,) key index of each query's positive
            (default ``arange(N)`` when M >= N; -1 for a row with no positive to exclude).
        k: how many negatives per row (1 <= k <= 64).
        exclude_self: also skip key i for query i (queries and keys are the same set).
    Returns:
        (values (N, k) float32 (float64 for float64 inputs on the torch backend), indices (N, k)
        int64), descending; -inf / -1 where a row has fewer than k negatives.
    """
    _check_pair("queries", queries, "keys", keys)
    N, M = queries.shape[0], keys.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 64:
        raise ValueError(f"k must be an integer in [1, 64], got {k}")
    if positives is None:
        if M < N:
            raise ValueError(f"keys must have at least as many rows as queries when positives is "
                             f"None, got N={N} and M={M}")
    else:
        positives = _check_index("positives", positives, N, M, "key indices, or -1 for none",
                                 queries.device, allow_missing=True)
    queries, keys, be = _prepare(queries, keys, backend)
    be = _backend.concrete(be, extended=True)
    eng = _backend.engine(be)
    if not hasattr(eng, "top_negatives"):
        raise ValueError(f"backend={be!r} does not mine negatives; use backend='triton' or 'torch'")
    spec = LossSpec(kind="softmax", exclude_self=exclude_self, exact=exact)
    with torch.autocast(queries.device.type, enabled=False):  # cast above, computed as the losses
        return eng.top_negatives(queries, keys, Targets(positives=positives), spec, k)


@torch.no_grad()
def uniformity(x: Tensor, t: float = 2.0, *, backend: str = "auto") -> Tensor:
    """Uniformity metric (Wang & Isola 2020) of the rows of x (N, D); see :func:`uniformity_loss`."""
    return uniformity_loss(x, t, backend=backend)


@torch.no_grad()
def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    """Alignment metric (Wang & Isola 2020) of paired rows; see :func:`alignment_loss`."""
    return alignment_loss(x, y, alpha)
