"""sentence-transformers drop-ins: ``MultipleNegativesRankingLoss``,
``MultipleNegativesSymmetricRankingLoss``, ``GISTEmbedLoss`` and their cached (chunked) forms, and
``ContrastiveTensionLossInBatchNegatives``.

Same constructor arguments and ``forward(sentence_features, labels)`` as the sentence-transformers
losses: the first column holds the anchors (queries), the second their positives, any further
columns hard negatives (one per anchor per column). Every log-sum-exp is one fused sweep; the
N x (k N) score matrix is never materialised. sentence-transformers itself is not imported: the
model only has to map a features dict to a dict with ``"sentence_embedding"``.

Supported: similarity ``cos_sim`` (default) or ``dot_score``; ``directions`` any subset containing
"query_to_doc"; ``partition_mode`` "joint" / "per_direction"; ``gather_across_devices``;
``hardness_mode``. Not supported (ValueError): other similarity functions.

``hardness_mode`` / ``hardness_strength`` a (Lan et al. 2025): the query-to-doc logits of the
chosen negatives are ``(scale + a) sim``, the ``a sim`` part detached. "hard_negatives": each
anchor's own hard-negative columns, computed beside the sweep (O(n h D)); "in_batch_negatives":
every other anchor's documents, the sweep at scale + a with the anchor's own documents left out
and added back at scale; "all_negatives": all but the positive, the sweep at scale + a without it.

``GISTEmbedLoss`` (Solatorio 2024): the same layout, cosine similarities at 1 / temperature; a
guide model's cosines pick the false negatives (any column j but the positive whose guide cosine
with anchor i exceeds the guide's anchor-positive cosine, less ``margin`` or less
``|cosine| * margin``), which leave row i. Two fused sweeps, each recomputing the guide's cosines
in its tiles beside the model's: the anchors against the positives, anchors and negatives side by
side, and the positives against the positives. The guide receives the same features unless the
two tokenizers differ (then the texts are decoded with the model's tokenizer and encoded with the
guide's, as sentence-transformers does).

``exact``: float32 products in IEEE arithmetic; by default as torch's float32 matmul precision
allows (:func:`fastcl.integrations._common.exact_products`), as the library's own similarity
matrices.

The cached forms (and the others with ``mini_batch_size``) follow the library's gradient-cache
protocol: ``uses_gradient_cache`` is True and ``calculate_loss(reps, ..., with_backward=False)``
takes each column's mini-batch embeddings, so wrappers that decorate it, such as
``MatryoshkaLoss``, work around them as around the library's own.
"""
from __future__ import annotations

import bisect
import contextlib
import copy
import math
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .. import distributed as fdist
from ..losses import clip_loss
from ..train import _batch_size, _slice, chunked_loss
from ._common import (exact_products, guided_statistics, row_gap, row_gap_without, row_lse,
                      row_lse_without, scaled_grad)

Tensor = torch.Tensor

__all__ = ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss", "mnrl_from_embeddings",
           "MultipleNegativesSymmetricRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss",
           "GISTEmbedLoss", "CachedGISTEmbedLoss", "gist_from_embeddings",
           "ContrastiveTensionLossInBatchNegatives"]

_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
_HARDNESS = (None, "in_batch_negatives", "hard_negatives", "all_negatives")


def _penalised_gap(q_local: Tensor, docs: List[Tensor], own: Tensor, scale: float, strength: float,
                   mode: str, backend: str, exact: bool) -> Tensor:
    """The query-to-doc LSE less the positive logit (n,) with ``hardness_mode`` ``mode``: the
    chosen negatives' logits are (scale + strength) sim, the extra part detached. Row i's own
    documents are the columns own_i + k W (k = 0: the positive; W the anchors' count)."""
    docs_all = torch.cat(docs)
    W = docs[0].shape[0]
    own_docs = torch.stack([d[own] for d in docs], 1)  # (n, 1 + h, D): positive, hard negatives
    dt = torch.float64 if q_local.dtype == torch.float64 else torch.float32
    sims = torch.einsum("nd,nkd->nk", q_local.to(dt), own_docs.to(dt))
    s_own = scale * sims  # the own columns' logits at the plain scale
    s_pos = s_own[:, 0]
    col_owner = torch.arange(docs_all.shape[0], device=own.device) % W
    hard = scale * sims[:, 1:] + strength * sims[:, 1:].detach()
    if mode == "hard_negatives":  # the sweep without the own hard negatives, then theirs merged
        gap = row_gap_without(q_local, docs_all, scale, own, own, col_owner, backend=backend,
                              exact=exact)
        return gap + nn.functional.softplus(torch.logsumexp(hard, 1) - (gap + s_pos))
    # the sweep at scale + strength, its gradient that of the plain scale
    r = scale / (scale + strength)
    q_g, d_g = scaled_grad(q_local, r), scaled_grad(docs_all, r)
    if mode == "all_negatives":  # every column but the positive
        lse = row_lse_without(q_g, d_g, scale + strength, own, backend=backend, exact=exact)
        return nn.functional.softplus(lse - s_pos)
    # in_batch_negatives: the other anchors' documents; the own ones at the plain scale
    lse = row_lse_without(q_g, d_g, scale + strength, own, row_ids=own, col_ids=col_owner,
                          backend=backend, exact=exact)
    own_gap = nn.functional.softplus(torch.logsumexp(s_own[:, 1:], 1) - s_pos) if s_own.shape[1] > 1 \
        else torch.zeros_like(s_pos)
    return torch.logaddexp(lse - s_pos, own_gap)


def _similarity_kind(fct) -> str:
    name = getattr(fct, "__name__", None) if fct is not None else "cos_sim"
    if name in ("cos_sim", "cosine", "cos"):
        return "cos"
    if name in ("dot_score", "dot"):
        return "dot"
    raise ValueError("similarity_fct must be sentence_transformers.util.cos_sim or dot_score for the "
                     f"fused loss, got {name or type(fct).__name__}")


def mnrl_from_embeddings(embeddings: Sequence[Tensor], *, scale: float = 20.0, similarity: str = "cos",
                         directions: Sequence[str] = ("query_to_doc",), partition_mode: str = "joint",
                         gather_across_devices: bool = False, backend: str = "auto",
                         exact: Optional[bool] = None, hardness_mode: Optional[str] = None,
                         hardness_strength: float = 0.0) -> Tensor:
    """Multiple-negatives ranking loss from column embeddings [anchors (n, D), positives (n, D),
    hard negatives (n, D)...]: mean over anchors of ``log Z_i - scale * sim(q_i, d_i)``, with
    ``log Z_i`` the log-sum-exp of the chosen directions' scores (joint), or the mean of the
    per-direction log-sum-exps (per_direction). ``exact``: float32 products in IEEE arithmetic
    (default: as torch's float32 matmul precision, see ``exact_products``)."""
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings (anchors, positives), got {len(embeddings)}")
    q, docs = embeddings[0], list(embeddings[1:])
    n = q.shape[0]
    for i, d in enumerate(docs):
        if d.dim() != 2 or d.shape != q.shape:
            raise ValueError(f"embedding column {i + 1} must have the anchors' shape {tuple(q.shape)}, "
                             f"got {tuple(d.shape)}")
    if similarity == "cos":
        q = nn.functional.normalize(q, dim=-1)
        docs = [nn.functional.normalize(d, dim=-1) for d in docs]
    offset = 0
    if gather_across_devices:
        W, r = fdist._world(None)
        q = fdist.all_gather_with_grad(q)
        docs = [fdist.all_gather_with_grad(d) for d in docs]
        offset = r * n
    docs_all = torch.cat(docs)
    q_local = q[offset:offset + n]
    d_local = docs[0][offset:offset + n]
    if hardness_mode not in _HARDNESS:
        raise ValueError(f"hardness_mode must be one of {_HARDNESS}, got {hardness_mode!r}")
    ex = exact_products(exact)
    own = torch.arange(n, device=q.device) + offset  # the positive pair's column
    # each block's LSE less the positive logit: from its own sweep where the block holds the
    # pair (query_to_doc, doc_to_query: where the two nearly cancel, the difference keeps float32
    # accuracy), else the LSE less the logit computed directly
    if hardness_mode is not None and hardness_strength > 0 and (
            hardness_mode != "hard_negatives" or len(docs) > 1):
        q2d = _penalised_gap(q_local, docs, own, scale, hardness_strength, hardness_mode, backend, ex)
    else:
        q2d = row_gap(q_local, docs_all, scale, own, backend=backend, exact=ex)
    gaps: Dict[str, List[Tensor]] = {"query_to_doc": [q2d]}
    if "doc_to_query" in directions:
        gaps["doc_to_query"] = [row_gap(d_local, q, scale, own, backend=backend, exact=ex)]
    apart = {}
    if "query_to_query" in directions:
        apart["query_to_query"] = [row_lse(q_local, q, scale, exclude_offset=offset, backend=backend,
                                           exact=ex)]
    if "doc_to_doc" in directions:
        apart["doc_to_doc"] = [row_lse(d_local, block, scale, exclude_offset=offset, backend=backend,
                                       exact=ex) for block in docs]
    if apart:
        dt = gaps["query_to_doc"][0].dtype
        pos = scale * (q_local.to(dt) * d_local.to(dt)).sum(-1)
        gaps.update({name: [lse - pos for lse in lses] for name, lses in apart.items()})
    if partition_mode == "joint":
        loss = torch.logsumexp(torch.stack([g for gs in gaps.values() for g in gs]), dim=0)
    else:
        loss = sum(torch.logsumexp(torch.stack(gs), dim=0) for gs in gaps.values()) / len(gaps)
    return loss.mean()


class _GradientCache:
    """sentence-transformers' gradient-cache protocol over :func:`fastcl.train.chunked_loss`: with
    ``mini_batch_size`` set, ``uses_gradient_cache`` is True and the forward calls
    ``self.calculate_loss(reps, *args, with_backward=True)`` on each column's mini-batch
    embeddings (looked up on the instance, where ``MatryoshkaLoss`` puts its decorator)."""

    mini_batch_size: Optional[int]
    mini_batch_num_tokens: Optional[int] = None
    show_progress_bar: bool

    @property
    def uses_gradient_cache(self) -> bool:
        return self.mini_batch_size is not None

    def _ranges(self, features: Dict[str, Any]) -> List[tuple]:
        """A column's mini-batches as (start, stop) rows: ``mini_batch_size`` rows each, or with
        ``mini_batch_num_tokens`` as many rows as fit that many non-padding tokens (at least one),
        as sentence-transformers packs them."""
        n = _batch_size("sentence_features", features)
        budget = self.mini_batch_num_tokens
        if budget is None:
            b = self.mini_batch_size
            return [(s, min(n, s + b)) for s in range(0, n, b)]
        mask = features.get("attention_mask") if isinstance(features, Mapping) else None
        if not (isinstance(mask, Tensor) and mask.dim() == 2):
            raise ValueError("mini_batch_num_tokens needs each column's per-sequence token counts, "
                             "from a 2-D 'attention_mask' in its features; use mini_batch_size")
        ends = mask.sum(1).cumsum(0).tolist()  # (the mini-batches' bounds: read on the host)
        out, start = [], 0
        while start < n:
            before = ends[start - 1] if start > 0 else 0
            stop = max(start + 1, bisect.bisect_right(ends, before + budget))
            out.append((start, stop))
            start = stop
        return out

    def _mini_batches(self, features: Dict[str, Any], embed: Callable, ranges: List[tuple]) -> List[Tensor]:
        return [embed(_trim_padding(_slice(features, s, e))) for s, e in ranges]

    def _cached_loss(self, features: List[Dict[str, Any]], args: tuple,
                     ranges: Optional[List[List[tuple]]] = None) -> Tensor:
        """``calculate_loss(reps, *args)`` over the columns' mini-batches (``ranges``: each
        column's, when the caller has them already)."""
        ranges = ranges if ranges is not None else [self._ranges(f) for f in features]
        if not torch.is_grad_enabled():  # evaluation: no gradient to cache
            return self.calculate_loss([self._mini_batches(f, self._embed, r)
                                        for f, r in zip(features, ranges)], *args)
        return chunked_loss(_Embedder(self), features,
                            lambda *reps: self.calculate_loss(list(reps), *args, with_backward=True),
                            self.mini_batch_size, progress=self.show_progress_bar, loss_backward=True,
                            ranges=ranges)


def _trim_padding(features: Dict[str, Any]) -> Dict[str, Any]:
    """A mini-batch's features without the padding columns that trail every sequence in it, as
    the library cuts its mini-batches: the model runs on the columns it needs (memory bounded by
    the mini-batch's longest sequence) and draws the dropout masks the library's own cached
    losses draw. Leading padding stays (positions derived from lengths)."""
    mask = features.get("attention_mask") if isinstance(features, Mapping) else None
    if not (isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] > 0):
        return features
    active = mask.bool()
    expansion = features.get("query_expansion_positions")  # (scored though masked)
    if isinstance(expansion, Tensor) and expansion.shape == mask.shape:
        active = active | expansion.bool()
    used = active.any(0).nonzero()
    width = mask.shape[1]
    end = int(used.max()) + 1 if used.numel() else width  # (read on the host, as the library does)
    if end >= width:
        return features
    return {k: (v[:, :end] if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == width else v)
            for k, v in features.items()}


class _Embedder(nn.Module):
    """A loss's model as :func:`fastcl.train.chunked_loss`'s encoder: the ``"sentence_embedding"``
    of the features, and the model's own ``no_sync`` (a DistributedDataParallel model, as the
    library's trainer puts it in the loss), so that the re-encoding synchronises the gradients
    once, on its last mini-batch, however many mini-batches each rank has."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.model = loss.model
        self._embed = loss._embed

    def forward(self, features: Dict[str, Any]) -> Tensor:
        return self._embed(_trim_padding(features))

    def no_sync(self):
        sync = getattr(self.model, "no_sync", None)
        return sync() if sync is not None else contextlib.nullcontext()


def _positive_or_none(name: str, value) -> Optional[int]:
    """``mini_batch_size`` / ``mini_batch_num_tokens``: a positive int, or None."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def _loss_from_reps(loss_fn: Callable[[List[Tensor]], Tensor], reps: List[List[Tensor]],
                    with_backward: bool) -> Tensor:
    """``loss_fn`` of the columns' mini-batch embeddings ``reps`` concatenated; with
    ``with_backward`` back-propagated to them and returned detached."""
    loss = loss_fn([torch.cat(list(r)) for r in reps])
    if not with_backward:
        return loss
    loss.backward()
    return loss.detach()


class MultipleNegativesRankingLoss(_GradientCache, nn.Module):
    """Fused ``MultipleNegativesRankingLoss``: ``forward(sentence_features, labels)``.

    Args:
        model: maps a features dict to a dict holding ``"sentence_embedding"`` (B, D), as a
            SentenceTransformer does. scale, similarity_fct, gather_across_devices, directions,
            partition_mode, hardness_mode, hardness_strength: as sentence-transformers.
        mini_batch_size: when set, encode every column ``mini_batch_size`` rows at a time with
            :func:`fastcl.train.chunked_loss` (memory of one mini-batch, gradients unchanged).
        backend: fastcl backend ("auto": Triton on CUDA).
        exact: float32 products in IEEE arithmetic (None: as torch's float32 matmul precision).
    """

    def __init__(self, model: Callable, scale: float = 20.0, similarity_fct: Optional[Callable] = None,
                 gather_across_devices: bool = False, directions: Sequence[str] = ("query_to_doc",),
                 partition_mode: str = "joint", hardness_mode: Optional[str] = None,
                 hardness_strength: float = 0.0, *, mini_batch_size: Optional[int] = None,
                 show_progress_bar: bool = False, backend: str = "auto", exact: Optional[bool] = None):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        directions = tuple(directions)
        if not directions or not set(directions) <= set(_DIRECTIONS):
            raise ValueError(f"directions must be a non-empty subset of {_DIRECTIONS}, got {directions}")
        if "query_to_doc" not in directions:
            raise ValueError("directions must contain 'query_to_doc' (it holds the positive pair)")
        if partition_mode not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
        if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
            raise ValueError("partition_mode='per_direction' needs every direction to contain the "
                             "positive; 'query_to_query' and 'doc_to_doc' do not: use 'joint'")
        if hardness_mode not in _HARDNESS:
            raise ValueError(f"hardness_mode must be one of {_HARDNESS}, got {hardness_mode!r}")
        if not hardness_strength >= 0:
            raise ValueError(f"hardness_strength must be >= 0, got {hardness_strength}")
        _positive_or_none("mini_batch_size", mini_batch_size)
        self.model = model
        self.scale = float(scale)
        self.similarity = _similarity_kind(similarity_fct)
        self.similarity_fct = similarity_fct
        self.gather_across_devices = gather_across_devices
        self.directions = directions
        self.partition_mode = partition_mode
        self.hardness_mode, self.hardness_strength = hardness_mode, float(hardness_strength)
        self.mini_batch_size = mini_batch_size
        self.show_progress_bar = show_progress_bar
        self.backend = backend
        self.exact = exact

    def _embed(self, features: Dict[str, Any]) -> Tensor:
        return self.model(features)["sentence_embedding"]

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], labels: Optional[Tensor] = None) -> Tensor:
        return mnrl_from_embeddings(embeddings, scale=self.scale, similarity=self.similarity,
                                    directions=self.directions, partition_mode=self.partition_mode,
                                    gather_across_devices=self.gather_across_devices,
                                    backend=self.backend, exact=self.exact,
                                    hardness_mode=self.hardness_mode,
                                    hardness_strength=self.hardness_strength)

    def calculate_loss(self, reps: List[List[Tensor]], labels: Optional[Tensor] = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss of the columns' mini-batch embeddings ``reps`` (the gradient-cache protocol);
        ``with_backward``: back-propagated to them, returned detached."""
        return _loss_from_reps(lambda e: self.compute_loss_from_embeddings(e, labels), reps,
                               with_backward)

    def forward(self, sentence_features: Iterable[Dict[str, Any]], labels: Optional[Tensor] = None) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"Expected at least 2 inputs (anchors, positives), got {len(features)}")
        if self.mini_batch_size is None:
            return self.compute_loss_from_embeddings([self._embed(f) for f in features])
        return self._cached_loss(features, (labels,))

    def get_config_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "similarity_fct": self.similarity, "directions": self.directions,
                "partition_mode": self.partition_mode, "mini_batch_size": self.mini_batch_size,
                "mini_batch_num_tokens": self.mini_batch_num_tokens,
                "gather_across_devices": self.gather_across_devices,
                "hardness_mode": self.hardness_mode, "hardness_strength": self.hardness_strength}

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale


class CachedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """Fused ``CachedMultipleNegativesRankingLoss``: the columns are encoded ``mini_batch_size``
    rows at a time without autograd, the loss is fused, and the backward re-encodes each mini-batch
    (RNG replayed) to back-propagate its embedding gradient (:func:`fastcl.train.chunked_loss`)."""

    def __init__(self, model: Callable, scale: float = 20.0, similarity_fct: Optional[Callable] = None,
                 mini_batch_size: int = 32, mini_batch_num_tokens: Optional[int] = None,
                 gather_across_devices: bool = False, directions: Sequence[str] = ("query_to_doc",),
                 partition_mode: str = "joint", show_progress_bar: bool = False,
                 hardness_mode: Optional[str] = None, hardness_strength: float = 0.0, *,
                 backend: str = "auto", exact: Optional[bool] = None):
        super().__init__(model, scale, similarity_fct, gather_across_devices, directions,
                         partition_mode, hardness_mode, hardness_strength,
                         mini_batch_size=mini_batch_size, show_progress_bar=show_progress_bar,
                         backend=backend, exact=exact)
        self.mini_batch_num_tokens = _positive_or_none("mini_batch_num_tokens", mini_batch_num_tokens)


_SYMMETRIC = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """Fused ``MultipleNegativesSymmetricRankingLoss``: :class:`MultipleNegativesRankingLoss` with
    ``directions=("query_to_doc", "doc_to_query")`` and ``partition_mode="per_direction"``, as
    sentence-transformers defines it (the mean of the anchors' loss over the documents and the
    positives' loss over the anchors)."""

    def __init__(self, model: Callable, scale: float = 20.0, similarity_fct: Optional[Callable] = None,
                 gather_across_devices: bool = False, *, mini_batch_size: Optional[int] = None,
                 show_progress_bar: bool = False, backend: str = "auto", exact: Optional[bool] = None):
        super().__init__(model, scale, similarity_fct, gather_across_devices, **_SYMMETRIC,
                         mini_batch_size=mini_batch_size, show_progress_bar=show_progress_bar,
                         backend=backend, exact=exact)


class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    """Fused ``CachedMultipleNegativesSymmetricRankingLoss``: :class:`CachedMultipleNegativesRankingLoss`
    with the symmetric directions of :class:`MultipleNegativesSymmetricRankingLoss`."""

    def __init__(self, model: Callable, scale: float = 20.0, similarity_fct: Optional[Callable] = None,
                 mini_batch_size: int = 32, mini_batch_num_tokens: Optional[int] = None,
                 gather_across_devices: bool = False, show_progress_bar: bool = False, *,
                 backend: str = "auto", exact: Optional[bool] = None):
        super().__init__(model, scale, similarity_fct, mini_batch_size, mini_batch_num_tokens,
                         gather_across_devices, **_SYMMETRIC, show_progress_bar=show_progress_bar,
                         backend=backend, exact=exact)


# ----------------------------------------------------------------------------------------------
# GISTEmbed
# ----------------------------------------------------------------------------------------------

_MARGIN_STRATEGIES = ("absolute", "relative")


def _check_gist_args(temperature: float, margin_strategy: str, margin: float) -> None:
    if margin_strategy not in _MARGIN_STRATEGIES:
        raise ValueError("margin_strategy must be 'absolute' or 'relative'.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not math.isfinite(margin):
        raise ValueError(f"margin must be finite, got {margin}")


def gist_from_embeddings(embeddings: Sequence[Tensor], guide_embeddings: Sequence[Tensor], *,
                         temperature: float = 0.01, margin_strategy: str = "absolute",
                         margin: float = 0.0, contrast_anchors: bool = True,
                         contrast_positives: bool = True, gather_across_devices: bool = False,
                         backend: str = "auto", exact: Optional[bool] = None) -> Tensor:
    """GISTEmbed loss from column embeddings [anchors (n, D), positives (n, D), negatives (n, D)...]
    and the guide's embeddings of the same columns (n, Dg each; no gradient): the mean over anchors
    of ``LSE_i - cos(a_i, p_i) / temperature``, with LSE_i over the anchor-positive,
    anchor-anchor (``contrast_anchors``), positive-positive (``contrast_positives``, row i: positive
    i) and anchor-negative cosines / temperature whose guide cosine is at most the threshold
    ``g_i - margin`` ("absolute") or ``g_i - |g_i| * margin`` ("relative"), g_i the guide's
    anchor-positive cosine (the positive itself always counts). Two fused sweeps (the anchors'
    blocks side by side, then the positives'); the (n, k n) score matrix is never materialised."""
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings (anchors, positives), got {len(embeddings)}")
    if len(guide_embeddings) != len(embeddings):
        raise ValueError(f"guide_embeddings must hold one tensor per column ({len(embeddings)}), got "
                         f"{len(guide_embeddings)}")
    _check_gist_args(temperature, margin_strategy, margin)
    n = embeddings[0].shape[0]
    for i, (e, g) in enumerate(zip(embeddings, guide_embeddings)):
        if e.dim() != 2 or e.shape != embeddings[0].shape:
            raise ValueError(f"embedding column {i} must have the anchors' shape "
                             f"{tuple(embeddings[0].shape)}, got {tuple(e.shape)}")
        if g.dim() != 2 or g.shape[0] != n:
            raise ValueError(f"guide embedding column {i} must have shape (n={n}, Dg), got "
                             f"{tuple(g.shape)}")
    embs = [nn.functional.normalize(e, dim=-1) for e in embeddings]
    guides = [nn.functional.normalize(g.detach(), dim=-1) for g in guide_embeddings]
    anchors, ga = embs[0], guides[0]
    cands, gcands = embs[1:], guides[1:]
    offset = 0
    if gather_across_devices:  # the candidates of every rank, not the anchors
        _, r = fdist._world(None)
        cands = [fdist.all_gather_with_grad(c) for c in cands]
        gcands = [fdist.all_gather_with_grad(g) for g in gcands]
        offset = r * n
    ex = exact_products(exact)
    scale = 1.0 / temperature
    own = torch.arange(n, device=anchors.device) + offset
    positives, gp = cands[0], gcands[0]
    dt = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    g_pos = (ga.to(dt) * gp[offset:offset + n].to(dt)).sum(-1)
    thr = g_pos - margin if margin_strategy == "absolute" else g_pos - g_pos.abs() * margin
    kw = dict(backend=backend, exact=ex)
    # the anchors' blocks (positives, anchors, negatives) as one sweep over their columns side by
    # side: its LSE less the positive logit from the same tiles (where the two nearly cancel, the
    # difference keeps float32 accuracy)
    keys = [positives] + ([anchors] if contrast_anchors else []) + cands[1:]
    gkeys = [gp] + ([ga] if contrast_anchors else []) + gcands[1:]
    if len(keys) > 1:
        keys, gkeys = torch.cat(keys), torch.cat(gkeys)
    else:
        keys, gkeys = keys[0], gkeys[0]
    gap = guided_statistics(anchors, keys, scale, ga, gkeys, thr, own, **kw).row_gap()
    if not contrast_positives:
        return gap.mean()
    # the positive-positive block: row i is positive i
    p_local = positives[offset:offset + n]
    lse = guided_statistics(p_local, positives, scale, gp[offset:offset + n], gp, thr, **kw).row_lse
    s_pos = scale * (anchors.to(gap.dtype) * p_local.to(gap.dtype)).sum(-1)
    return torch.logaddexp(gap, lse - s_pos).mean()


def _must_retokenize(model: Callable, guide: Callable) -> bool:
    """Whether the guide needs its own tokens (as sentence-transformers decides: the vocabularies
    differ, or the guide's sequences are shorter); False where either has no tokenizer."""
    mt, gt = getattr(model, "tokenizer", None), getattr(guide, "tokenizer", None)
    if mt is None or gt is None or mt is gt:
        return False
    if not (hasattr(mt, "get_vocab") and hasattr(gt, "get_vocab")):
        raise ValueError("the model's and the guide's tokenizers must expose get_vocab() (as "
                         "transformers tokenizers do) to tell whether the guide needs its own tokens")
    if mt.get_vocab() != gt.get_vocab():
        return True
    gl, ml = getattr(guide, "max_seq_length", None), getattr(model, "max_seq_length", None)
    return gl is not None and ml is not None and gl < ml


class GISTEmbedLoss(_GradientCache, nn.Module):
    """Fused ``GISTEmbedLoss``: ``forward(sentence_features, labels)``.

    Args:
        model: maps a features dict to a dict holding ``"sentence_embedding"`` (B, D), as a
            SentenceTransformer does; guide: the same for the guide model (no gradient).
            temperature, margin_strategy, margin, contrast_anchors, contrast_positives,
            gather_across_devices: as sentence-transformers.
        mini_batch_size: when set, encode every column ``mini_batch_size`` rows at a time (the
            model with :func:`fastcl.train.chunked_loss`: memory of one mini-batch, gradients
            unchanged; the guide without autograd).
        backend: fastcl backend ("auto": Triton on CUDA).
        exact: float32 products in IEEE arithmetic (None: as torch's float32 matmul precision).
    """

    def __init__(self, model: Callable, guide: Callable, temperature: float = 0.01,
                 margin_strategy: str = "absolute", margin: float = 0.0,
                 contrast_anchors: bool = True, contrast_positives: bool = True,
                 gather_across_devices: bool = False, *, mini_batch_size: Optional[int] = None,
                 show_progress_bar: bool = False, backend: str = "auto", exact: Optional[bool] = None):
        super().__init__()
        _check_gist_args(temperature, margin_strategy, margin)
        _positive_or_none("mini_batch_size", mini_batch_size)
        self.model, self.guide = model, guide
        self.temperature = float(temperature)
        self.margin_strategy, self.margin = margin_strategy, float(margin)
        self.contrast_anchors, self.contrast_positives = bool(contrast_anchors), bool(contrast_positives)
        self.gather_across_devices = gather_across_devices
        self.mini_batch_size = mini_batch_size
        self.show_progress_bar = show_progress_bar
        self.backend, self.exact = backend, exact
        self.must_retokenize = _must_retokenize(model, guide)

    def _embed(self, features: Dict[str, Any]) -> Tensor:
        return self.model(features)["sentence_embedding"]

    def _guide_features(self, features: Dict[str, Any]) -> Dict[str, Any]:
        """The guide's features of a column: the model's, or (tokenizers differ) the texts decoded
        with the model's tokenizer and encoded with the guide's."""
        if not self.must_retokenize:
            return dict(features)
        ids = features["input_ids"]
        if "cu_seq_lens_q" in features:  # packed sequences: one row of concatenated tokens
            flat, cuts = ids[0].tolist(), features["cu_seq_lens_q"].tolist()
            ids = [flat[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        texts = self.model.tokenizer.batch_decode(ids, skip_special_tokens=True)
        encode = getattr(self.guide, "preprocess", None) or self.guide.tokenize
        out = encode(texts)
        device = getattr(self.guide, "device", None)
        if device is None:
            device = next((p.device for p in self.guide.parameters()), None) \
                if isinstance(self.guide, nn.Module) else None
        return {k: (v.to(device) if isinstance(v, Tensor) and device is not None else v)
                for k, v in out.items()}

    def _guide_embed(self, features: Dict[str, Any], ranges: Optional[List[tuple]]) -> Tensor:
        """The guide's embeddings of a column, without autograd (in the model's mini-batches
        ``ranges``, when set)."""
        def embed(f):
            return self.guide(self._guide_features(f))["sentence_embedding"].detach()
        with torch.no_grad():
            if ranges is None:
                return embed(features)
            return torch.cat(self._mini_batches(features, embed, ranges))

    def compute_loss_from_embeddings(self, embeddings: List[Tensor],
                                     guide_embeddings: List[Tensor]) -> Tensor:
        return gist_from_embeddings(embeddings, guide_embeddings, temperature=self.temperature,
                                    margin_strategy=self.margin_strategy, margin=self.margin,
                                    contrast_anchors=self.contrast_anchors,
                                    contrast_positives=self.contrast_positives,
                                    gather_across_devices=self.gather_across_devices,
                                    backend=self.backend, exact=self.exact)

    def calculate_loss(self, reps: List[List[Tensor]], reps_guided: List[List[Tensor]], *,
                       with_backward: bool = False) -> Tensor:
        """The loss of the columns' mini-batch embeddings ``reps`` and the guide's ``reps_guided``
        (the gradient-cache protocol); ``with_backward``: back-propagated to ``reps``, returned
        detached."""
        guide = [torch.cat(list(g)) for g in reps_guided]
        return _loss_from_reps(lambda e: self.compute_loss_from_embeddings(e, guide), reps,
                               with_backward)

    def forward(self, sentence_features: Iterable[Dict[str, Any]],
                labels: Optional[Tensor] = None) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"Expected at least 2 inputs (anchors, positives), got {len(features)}")
        # the mini-batches once, for the guide and the model
        ranges = [self._ranges(f) for f in features] if self.mini_batch_size is not None else None
        guide_embeddings = [self._guide_embed(f, r)  # (before the model sees them)
                            for f, r in zip(features, ranges or [None] * len(features))]
        if ranges is None:
            return self.compute_loss_from_embeddings([self._embed(f) for f in features], guide_embeddings)
        return self._cached_loss(features, ([[g] for g in guide_embeddings],), ranges)

    def get_config_dict(self) -> Dict[str, Any]:
        return {"guide": self.guide, "temperature": self.temperature,
                "margin_strategy": self.margin_strategy, "margin": self.margin,
                "contrast_anchors": self.contrast_anchors, "contrast_positives": self.contrast_positives,
                "gather_across_devices": self.gather_across_devices,
                "mini_batch_size": self.mini_batch_size,
                "mini_batch_num_tokens": self.mini_batch_num_tokens}


class CachedGISTEmbedLoss(GISTEmbedLoss):
    """Fused ``CachedGISTEmbedLoss``: the columns are encoded ``mini_batch_size`` rows at a time
    without autograd (the guide's too), the loss is fused, and the backward re-encodes each
    mini-batch (RNG replayed) to back-propagate its embedding gradient
    (:func:`fastcl.train.chunked_loss`)."""

    def __init__(self, model: Callable, guide: Callable, temperature: float = 0.01,
                 mini_batch_size: int = 32, mini_batch_num_tokens: Optional[int] = None,
                 show_progress_bar: bool = False, margin_strategy: str = "absolute",
                 margin: float = 0.0, contrast_anchors: bool = True, contrast_positives: bool = True,
                 gather_across_devices: bool = False, *, backend: str = "auto",
                 exact: Optional[bool] = None):
        super().__init__(model, guide, temperature, margin_strategy, margin, contrast_anchors,
                         contrast_positives, gather_across_devices, mini_batch_size=mini_batch_size,
                         show_progress_bar=show_progress_bar, backend=backend, exact=exact)
        self.mini_batch_num_tokens = _positive_or_none("mini_batch_num_tokens", mini_batch_num_tokens)


# ----------------------------------------------------------------------------------------------
# Contrastive tension
# ----------------------------------------------------------------------------------------------


class ContrastiveTensionLossInBatchNegatives(nn.Module):
    """Fused ``ContrastiveTensionLossInBatchNegatives`` (Carlsson et al. 2021): each sentence of
    the first column through ``model1`` (a copy of the model made at construction) and ``model2``
    (the model itself); the symmetric CLIP loss of the two embeddings, ``sim(a_i, b_j)`` at the
    learnable scale ``logit_scale.exp()`` (initialised to ``scale``), the pair i the positive.

    Args:
        model: as :class:`MultipleNegativesRankingLoss` (deep-copied into ``model1``).
        scale, similarity_fct: as sentence-transformers (``cos_sim`` or ``dot_score``).
        backend, exact: as :class:`MultipleNegativesRankingLoss`.
    """

    def __init__(self, model: Callable, scale: float = 20.0, similarity_fct: Optional[Callable] = None,
                 *, backend: str = "auto", exact: Optional[bool] = None):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.similarity = _similarity_kind(similarity_fct)
        self.model2 = model  # (the model trained and kept)
        self.model1 = copy.deepcopy(model)
        self.similarity_fct = similarity_fct
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(scale))
        self.backend, self.exact = backend, exact

    def forward(self, sentence_features: Iterable[Dict[str, Any]], labels: Optional[Tensor] = None) -> Tensor:
        features = list(sentence_features)
        if not features:
            raise ValueError("Expected one input column (the sentences), got none")
        a = self.model1(features[0])["sentence_embedding"]
        b = self.model2(features[0])["sentence_embedding"]
        if self.similarity == "cos":
            a, b = nn.functional.normalize(a, dim=-1), nn.functional.normalize(b, dim=-1)
        return clip_loss(a, b, self.logit_scale.exp(), backend=self.backend,
                         exact=exact_products(self.exact))

    def get_config_dict(self) -> Dict[str, Any]:
        return {"scale": self.logit_scale.exp().item(), "similarity_fct": self.similarity}
