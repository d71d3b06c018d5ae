"""sentence-transformers drop-ins: ``MultipleNegativesRankingLoss`` and its cached (chunked) form.

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

``exact``: float32 products in IEEE arithmetic; by default as torch's float32 matmul precision
allows (:func:`fastcl.integrations._common.exact_products`), as the library's own similarity
matrices.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .. import distributed as fdist
from ..train import chunked_loss
from ._common import exact_products, row_gap, row_gap_without, row_lse, row_lse_without, scaled_grad

Tensor = torch.Tensor

__all__ = ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss", "mnrl_from_embeddings"]

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


class MultipleNegativesRankingLoss(nn.Module):
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
        if mini_batch_size is not None and (not isinstance(mini_batch_size, int) or mini_batch_size < 1):
            raise ValueError(f"mini_batch_size must be a positive int or None, got {mini_batch_size!r}")
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

    def forward(self, sentence_features: Iterable[Dict[str, Any]], labels: Optional[Tensor] = None) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"Expected at least 2 inputs (anchors, positives), got {len(features)}")
        if self.mini_batch_size is None:
            return self.compute_loss_from_embeddings([self._embed(f) for f in features])
        return chunked_loss(self._embed, features, lambda *e: self.compute_loss_from_embeddings(list(e)),
                            self.mini_batch_size, progress=self.show_progress_bar)

    def get_config_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "similarity_fct": self.similarity, "directions": self.directions,
                "partition_mode": self.partition_mode, "mini_batch_size": self.mini_batch_size,
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
        if mini_batch_num_tokens is not None:
            raise ValueError("mini_batch_num_tokens is not supported; use mini_batch_size")
        super().__init__(model, scale, similarity_fct, gather_across_devices, directions,
                         partition_mode, hardness_mode, hardness_strength,
                         mini_batch_size=mini_batch_size, show_progress_bar=show_progress_bar,
                         backend=backend, exact=exact)
