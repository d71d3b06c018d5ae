"""Pure-PyTorch implementations: the fallback backend and the oracle of every test.

Two layers live here, and neither imports anything from the package:

* loss references (``info_nce``, ``clip_loss``) written the obvious way, on the materialised
  logits with ``F.cross_entropy``; float64-capable, differentiable by autograd.
* the engine (``engine_forward`` / ``engine_backward``): the statistics contract documented in
  ``fastcl.ops``, computed on materialised logits one row chunk at a time so that CPU memory stays
  bounded by ``chunk_rows x M``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# ----------------------------------------------------------------------------------------------
# Loss references (materialised)
# ----------------------------------------------------------------------------------------------


def _as_scalar(x, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x.reshape(()).to(like.dtype)
    return torch.tensor(float(x), dtype=like.dtype, device=like.device)


def logits(queries: Tensor, keys: Tensor, scale, bias=None) -> Tensor:
    """S = scale * queries @ keys.T + bias, materialised: (N, M)."""
    s = scale * (queries @ keys.transpose(0, 1))
    if bias is not None:
        s = s + bias
    return s


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _focal(per: Tensor, gamma: float) -> Tensor:
    p = torch.exp(-per)
    return (1 - p) ** gamma * per


def info_nce(queries: Tensor, keys: Tensor, positives: Optional[Tensor] = None, scale=1.0 / 0.07,
             bias=None, reduction: str = "mean", label_smoothing: float = 0.0,
             focal_gamma: float = 0.0, hard_negatives: Optional[Tensor] = None,
             fn_margin: Optional[float] = None, fn_ratio: Optional[float] = None,
             key_ids: Optional[Tensor] = None, logits_dtype: Optional[torch.dtype] = None,
             guide=None) -> Tensor:
    """One-way InfoNCE: ``L_i = CE(S_i, p(i))``; queries (N, D), keys (M, D), positives (N,) or
    arange; optional private hard negatives (N, h, D) appended as extra columns of each row;
    false negatives (columns j != p(i) with S_ij > S_ip - fn_margin, or c_ij > fn_ratio c_ip, or
    keys with key_ids[j] == key_ids[p(i)]) masked out; with ``guide`` (u (N, Dg), v (M, Dg)) the
    margin / ratio rule compares g = u v^T instead (margin 0 by default). ``logits_dtype`` casts
    the materialised logits before the loss (float32 as the common naive implementation does)."""
    c = queries @ keys.transpose(0, 1)
    if hard_negatives is not None:
        c = torch.cat([c, torch.einsum("nd,nhd->nh", queries, hard_negatives)], dim=1)
    S = scale * c + bias if bias is not None else scale * c
    S = S if logits_dtype is None else S.to(logits_dtype)
    pos = positives if positives is not None else torch.arange(queries.shape[0], device=queries.device)
    if fn_margin is not None or fn_ratio is not None or key_ids is not None or guide is not None:
        rows = torch.arange(queries.shape[0], device=queries.device)
        non_target = torch.ones_like(S, dtype=torch.bool)
        non_target[rows, pos] = False
        drop = torch.zeros_like(non_target)
        if guide is not None:
            g = (guide[0] @ guide[1].transpose(0, 1)).to(c.dtype)
            g_pos = g[rows, pos][:, None]
            drop |= g > (fn_ratio * g_pos if fn_ratio is not None else g_pos - (fn_margin or 0.0))
        elif fn_margin is not None:
            drop |= S > (S[rows, pos] - fn_margin)[:, None]
        elif fn_ratio is not None:
            drop |= c > (fn_ratio * c[rows, pos])[:, None]
        if key_ids is not None:
            drop[:, :keys.shape[0]] |= key_ids[None, :] == key_ids[pos][:, None]
        S = S.masked_fill(drop & non_target, -math.inf)
    if positives is None:
        positives = torch.arange(queries.shape[0], device=queries.device)
    per = F.cross_entropy(S, positives, reduction="none", label_smoothing=label_smoothing)
    if focal_gamma:
        per = _focal(per, focal_gamma)
    return _reduce(per, reduction)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
              reduction: str = "mean", label_smoothing: float = 0.0, focal_gamma: float = 0.0,
              logits_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Symmetric CLIP loss; ``reduction="none"`` gives (2, N): [image->text rows, text->image rows].
    ``logits_dtype`` casts the materialised logits before the loss."""
    S = logits(image_features, text_features, logit_scale, logit_bias)
    S = S if logits_dtype is None else S.to(logits_dtype)
    labels = torch.arange(S.shape[0], device=S.device)
    per = torch.stack([F.cross_entropy(S, labels, reduction="none", label_smoothing=label_smoothing),
                       F.cross_entropy(S.transpose(0, 1), labels, reduction="none",
                                       label_smoothing=label_smoothing)])
    if focal_gamma:
        per = _focal(per, focal_gamma)
    return _reduce(per, reduction)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                labels: Optional[Tensor] = None, reduction: str = "mean",
                logits_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Pairwise sigmoid loss; "none" gives per-image sums (N,) of -log sigmoid(z_ij S_ij), "mean"
    their mean (open_clip's value: the total divided by N)."""
    S = logits(image_features, text_features, logit_scale, logit_bias)
    S = S if logits_dtype is None else S.to(logits_dtype)
    if labels is None:
        z = 2 * torch.eye(S.shape[0], S.shape[1], dtype=S.dtype, device=S.device) - 1
    else:
        z = 2 * (labels[:, None] == labels[None, :]).to(S.dtype) - 1
    return _reduce(-F.logsigmoid(z * S).sum(1), reduction)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5, normalize: bool = True,
            reduction: str = "mean", logits_dtype: Optional[torch.dtype] = None) -> Tensor:
    """SimCLR NT-Xent over the 2N rows of Z = [z1; z2]: self excluded, positive of a is a +- N.
    ``logits_dtype`` casts the materialised logits before the loss."""
    Z = torch.cat([z1, z2])
    if normalize:
        Z = F.normalize(Z, dim=1)
    n2 = Z.shape[0]
    S = (Z @ Z.transpose(0, 1)) / temperature
    S = S if logits_dtype is None else S.to(logits_dtype)
    S = S.masked_fill(torch.eye(n2, dtype=torch.bool, device=Z.device), -math.inf)
    target = (torch.arange(n2, device=Z.device) + n2 // 2) % n2
    return F.cross_entropy(S, target, reduction=reduction)


def _flat_views(x, y):
    if x.dim() == 3:
        V = x.shape[1]
        return torch.cat(torch.unbind(x, dim=1)), y.repeat(V)
    return x, y


def supcon(features: Tensor, labels: Tensor, temperature: float = 0.1, variant: str = "out",
           normalize: bool = True, reduction: str = "mean", keys: Optional[Tensor] = None,
           key_labels: Optional[Tensor] = None, logits_dtype: Optional[torch.dtype] = None):
    """Supervised contrastive loss (Khosla et al.); features (B, D) or (B, V, D), labels (B,).

    Rows are the V*B views (view-major); A(i) = all j != i, P(i) = {j != i : y_j = y_i}; with
    ``keys``/``key_labels`` the columns are that separate set and nothing is excluded.
    Returns (loss, valid): rows without positives get loss 0 and are excluded from the mean.
    """
    features, labels = _flat_views(features, labels)
    if normalize:
        features = F.normalize(features, dim=1)
    if keys is None:
        cols, col_labels = features, labels
    else:
        cols, col_labels = _flat_views(keys, key_labels)
        if normalize:
            cols = F.normalize(cols, dim=1)
    n = features.shape[0]
    S = (features @ cols.transpose(0, 1)) / temperature
    S = S if logits_dtype is None else S.to(logits_dtype)
    if keys is None:
        eye = torch.eye(n, dtype=torch.bool, device=S.device)
    else:
        eye = torch.zeros_like(S, dtype=torch.bool)
    labels, col_labels = labels[:, None], col_labels[None, :]
    pos = (labels == col_labels) & ~eye
    lse_all = torch.logsumexp(S.masked_fill(eye, -math.inf), dim=1)
    npos = pos.sum(1)
    valid = npos > 0
    if variant == "out":
        mean_pos = torch.where(pos, S, 0.0).sum(1) / npos.clamp(min=1)
        per = lse_all - mean_pos
    else:
        lse_pos = torch.logsumexp(S.masked_fill(~pos, -math.inf), dim=1)
        per = lse_all - lse_pos + torch.log(npos.clamp(min=1).to(S.dtype))
    per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "mean":
        return per.sum() / valid.sum().clamp(min=1), valid
    return _reduce(per, reduction), valid


def dcl(z1: Tensor, z2: Tensor, temperature: float = 0.1, weight_sigma: Optional[float] = None,
        normalize: bool = True, reduction: str = "mean",
        logits_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Decoupled contrastive loss (Yeh et al.), both directions averaged: for view a of sample i,
    L = -w_i <a_i, b_i>/t + LSE over [a_i . a_j (j != i), a_i . b_j (j != i)] / t; DCLW weights
    w_i = 2 - N softmax_i(<a_i, b_i> / sigma). "none": (2N,) rows, z1's first.
    ``logits_dtype`` casts the materialised logits before the loss."""
    if normalize:
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = z1.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=z1.device)
    cast = (lambda x: x) if logits_dtype is None else (lambda x: x.to(logits_dtype))

    def one_way(a, b):
        s_aa = cast(a @ a.T / temperature)[off].view(n, n - 1)
        s_ab = cast(a @ b.T / temperature)
        pos = s_ab.diagonal()
        if weight_sigma is not None:
            pos = pos * (2 - n * torch.softmax((a * b).sum(1) / weight_sigma, dim=0))
        neg = torch.logsumexp(torch.cat([s_aa, s_ab[off].view(n, n - 1)], dim=1), dim=1)
        return neg - pos

    return _reduce(torch.cat([one_way(z1, z2), one_way(z2, z1)]), reduction)


def soft_info_nce(queries: Tensor, keys: Tensor, targets: Tensor, scale=1.0 / 0.07, bias=None,
                  reduction: str = "mean") -> Tensor:
    """Soft-target cross-entropy ``-sum_j T_ij log softmax_j(S_i)``, T a dense (N, M) tensor."""
    S = logits(queries, keys, scale, bias)
    return _reduce(-(targets * torch.log_softmax(S, dim=1)).sum(1), reduction)


def distill(queries: Tensor, keys: Tensor, teacher_queries: Tensor, teacher_keys: Tensor, scale,
            teacher_scale, reduction: str = "mean", objective: str = "kl") -> Tensor:
    """Per-row KL(softmax(teacher logits) || softmax(student logits)), teacher logits
    st <u_i, v_j>, materialised; ``objective="cross_entropy"``: -sum_j p_t log p_s."""
    S = logits(queries, keys, scale)
    St = teacher_scale * (teacher_queries @ teacher_keys.transpose(0, 1))
    logp_t = torch.log_softmax(St, dim=1)
    if objective == "cross_entropy":
        per = -(logp_t.exp() * torch.log_softmax(S, dim=1)).sum(1)
    else:
        per = (logp_t.exp() * (logp_t - torch.log_softmax(S, dim=1))).sum(1)
    return _reduce(per, reduction)


def cwcl(queries: Tensor, keys: Tensor, target_queries: Tensor, target_keys: Tensor, scale,
         reduction: str = "mean") -> Tensor:
    """Continuously weighted contrastive loss, one direction: T_ij = w_ij / sum_j w_ij with
    w_ij = (1 + <u_i, v_j>) / 2, L_i = -sum_j T_ij log softmax_j(S_i)."""
    w = (1 + target_queries @ target_keys.transpose(0, 1)) / 2
    T = w / w.sum(1, keepdim=True)
    return _reduce(-(T * torch.log_softmax(logits(queries, keys, scale), dim=1)).sum(1), reduction)


def softclip(image_features: Tensor, text_features: Tensor, logit_scale, target_features: Tensor,
             target_scale, alpha: float = 0.5, reduction: str = "mean") -> Tensor:
    """Soft-label CLIP: both directions' cross-entropy against (1 - alpha) I + alpha softmax(st U U^T);
    "none" gives (2, N)."""
    S = logits(image_features, text_features, logit_scale)
    n = S.shape[0]
    T = (1 - alpha) * torch.eye(n, dtype=S.dtype, device=S.device) + \
        alpha * torch.softmax(target_scale * (target_features @ target_features.transpose(0, 1)), dim=1)
    rows = -(T * torch.log_softmax(S, dim=1)).sum(1)
    cols = -(T * torch.log_softmax(S.transpose(0, 1), dim=1)).sum(1)
    return _reduce(torch.stack([rows, cols]), reduction)


def hcl(z1: Tensor, z2: Tensor, temperature: float = 0.5, beta: float = 1.0, tau_plus: float = 0.1,
        normalize: bool = True, reduction: str = "mean") -> Tensor:
    """Hard-negative contrastive loss (Robinson et al. 2021) over the 2N rows of [z1; z2] as in the
    paper's code: importance weights e^{beta S}, debiasing prior tau_plus, clamp at N_neg e^{-1/t}."""
    Z = torch.cat([z1, z2])
    if normalize:
        Z = F.normalize(Z, dim=1)
    n2 = Z.shape[0]
    S = Z @ Z.transpose(0, 1) / temperature
    rows = torch.arange(n2, device=Z.device)
    pos_idx = (rows + n2 // 2) % n2
    neg_mask = torch.ones_like(S, dtype=torch.bool)
    neg_mask[rows, rows] = False
    neg_mask[rows, pos_idx] = False
    neg = torch.exp(S[neg_mask].view(n2, n2 - 2))
    pos = torch.exp(S[rows, pos_idx])
    n_neg = n2 - 2
    imp = neg ** beta
    reweight = (imp * neg).sum(1) / imp.mean(1)
    ng = (-tau_plus * n_neg * pos + reweight) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n_neg * math.exp(-1 / temperature))
    return _reduce(-torch.log(pos / (pos + ng)), reduction)


def mv_infonce(features: Tensor, temperature: float = 0.1, normalize: bool = True,
               reduction: str = "mean") -> Tensor:
    """MV-InfoNCE over V views of B instances, features (B, V, D):
    L_i = log sum_v sum_{c != (v,i)} e^{S_(v,i),c} - log 2 - log sum_{v<w} e^{S_(v,i),(w,i)}."""
    B, V, _ = features.shape
    Z = torch.cat(torch.unbind(features, dim=1))  # view-major rows: (v, i) -> v * B + i
    if normalize:
        Z = F.normalize(Z, dim=1)
    S = Z @ Z.transpose(0, 1) / temperature
    S = S.masked_fill(torch.eye(V * B, dtype=torch.bool, device=S.device), -math.inf)
    all_terms = torch.logsumexp(S.view(V, B, V * B).permute(1, 0, 2).reshape(B, -1), dim=1)
    pairs = [S[v * B + torch.arange(B), w * B + torch.arange(B)] for v in range(V) for w in range(v + 1, V)]
    pos = torch.logsumexp(torch.stack(pairs, dim=1), dim=1)
    return _reduce(all_terms - math.log(2.0) - pos, reduction)


def mv_dhel(features: Tensor, temperature: float = 0.1, normalize: bool = True,
            reduction: str = "mean") -> Tensor:
    """MV-DHEL over V views of B instances, features (B, V, D):
    L_i = sum_v log sum_{j != i} e^{S_(v,i),(v,j)} - log sum_{v<w} e^{S_(v,i),(w,i)}."""
    B, V, _ = features.shape
    Z = F.normalize(features, dim=-1) if normalize else features
    off = torch.eye(B, dtype=torch.bool, device=Z.device)
    energy = sum(torch.logsumexp((Z[:, v] @ Z[:, v].T / temperature).masked_fill(off, -math.inf), dim=1)
                 for v in range(V))
    pairs = torch.stack([(Z[:, v] * Z[:, w]).sum(-1) / temperature
                         for v in range(V) for w in range(v + 1, V)])
    return _reduce(energy - torch.logsumexp(pairs, dim=0), reduction)


def uniformity(x: Tensor, t: float = 2.0, normalize: bool = True) -> Tensor:
    """``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` of the (by default L2-normalised) rows (Wang &
    Isola)."""
    x = F.normalize(x, dim=1) if normalize else x
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


# ----------------------------------------------------------------------------------------------
# The engine on materialised row chunks (contract: see fastcl/ops/__init__.py)
# ----------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 24  # at most 16M logits (64 MiB in fp32) materialised at once


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunks(n: int, m: int):
    step = max(1, min(n, _CHUNK_ELEMENTS // max(m, 1)))
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _tile(queries, keys, scale, bias, r0, r1, *, kind, exclude_self, offset, positives,
          row_labels, col_labels, dtype, fn_space=0, fn_threshold=None, row_ids=None, col_ids=None,
          target_weights=None, guide_queries=None, guide_keys=None):
    """Logits, raw similarities, validity, target masks and target weights of rows [r0, r1)
    (``target_weights`` (N, K) with positives (N, K): T_ij = sum_k w_ik [j == p_ik]; else the
    weights are T itself). False negatives: non-targets with S_ij (fn_space 1), c_ij (2) or the
    guide's products <u_i, v_j> (3) above fn_threshold_i leave ``valid``."""
    q = queries[r0:r1].to(dtype)
    c = q @ keys.to(dtype).transpose(0, 1)
    S = scale.to(dtype) * c
    if bias is not None:
        S = S + bias.to(dtype)
    rows = torch.arange(r0, r1, device=queries.device)
    cols = torch.arange(keys.shape[0], device=queries.device)
    if exclude_self:
        valid = cols[None, :] != (rows + offset)[:, None]
    else:
        valid = torch.ones_like(S, dtype=torch.bool)
    Tw = None
    if row_labels is not None:
        T = row_labels[r0:r1, None] == col_labels[None, :]
    elif target_weights is not None:
        hit = cols[None, None, :] == positives[r0:r1, :, None]  # (rows, K, M)
        Tw = (hit.to(dtype) * target_weights[r0:r1, :, None].to(dtype)).sum(1)
        T = Tw != 0
    else:
        p = positives[r0:r1] if positives is not None else rows + offset
        T = cols[None, :] == p[:, None]
    T = T & valid
    Tw = T.to(dtype) if Tw is None else torch.where(T, Tw, 0.0)
    if fn_space:
        thr = fn_threshold[r0:r1].to(dtype)[:, None]
        if fn_space == 3:
            x = guide_queries[r0:r1].to(dtype) @ guide_keys.to(dtype).transpose(0, 1)
        else:
            x = S if fn_space == 1 else c
        valid = valid & (T | ~(x > thr))
    if row_ids is not None:
        valid = valid & (T | (row_ids[r0:r1, None] != col_ids[None, :]))
    return S, c, valid, T, Tw, rows, cols


def _col_targets(rows, cols, col_positives, offset):
    pc = col_positives if col_positives is not None else cols - offset
    return rows[:, None] == pc[None, :]


def engine_forward(queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor], *,
                   kind: str = "softmax", symmetric: bool = False, exclude_self: bool = False,
                   offset: int = 0, positives=None, col_positives=None, row_labels=None,
                   col_labels=None, exclude_targets: bool = False, target_lse: bool = False,
                   fn_space: int = 0, fn_threshold=None, row_ids=None, col_ids=None,
                   teacher_queries=None, teacher_keys=None, teacher_scale=None,
                   lse2_ratio: Optional[float] = None, target_weights=None, lse_lo: bool = False,
                   guide_queries=None, guide_keys=None):
    """Returns (row_lse, row_pos, row_npos, col_lse | None, col_pos | None, row_aux | None);
    row_aux holds with teacher targets (4, N) the teacher LSE, sum_j Tt_ij St_ij - teacher LSE,
    row_pos's float32 rounding error (their sums in float64) and the column of each row's largest
    logit (integer bits: ``fastcl.ops.dominant_columns``), or (3, N) with the second LSE in row 2
    (lse2_ratio).
    ``lse_lo`` (softmax): also (row_lse_lo, col_lse_lo | None, row_pos_lo | None), the rounding
    errors of the float32 LSEs (each LSE max + log sum-exp in float64, then split), None for
    float64, and of the teacher targets' row_pos (row_aux[2])."""
    N, M = queries.shape[0], keys.shape[0]
    dt = _compute_dtype(queries)
    lo = lse_lo and kind == "softmax" and dt != torch.float64
    row_lo = torch.zeros(N, dtype=dt, device=queries.device) if lo else None
    col_lse64 = torch.full((M,), -math.inf, dtype=torch.float64, device=queries.device) \
        if lo and symmetric else None
    dev = queries.device
    keys = keys.to(dt)  # once, not per chunk
    row_lse = torch.empty(N, dtype=dt, device=dev)
    row_pos = torch.zeros(N, dtype=dt, device=dev)
    row_npos = torch.zeros(N, dtype=dt, device=dev)
    col_lse = torch.full((M,), -math.inf, dtype=dt, device=dev) if symmetric else None
    col_pos = torch.zeros(M, dtype=dt, device=dev) if symmetric else None
    has_aux = teacher_queries is not None or lse2_ratio is not None
    row_aux = torch.zeros((4 if teacher_queries is not None else 3, N), dtype=dt, device=dev) \
        if has_aux else None
    for r0, r1 in _chunks(N, M):
        S, _, valid, T, Tw, rows, cols = _tile(
            queries, keys, scale, bias, r0, r1, kind=kind, exclude_self=exclude_self,
            offset=offset, positives=positives, row_labels=row_labels, col_labels=col_labels,
            dtype=dt, fn_space=fn_space, fn_threshold=fn_threshold, row_ids=row_ids, col_ids=col_ids,
            target_weights=target_weights, guide_queries=guide_queries, guide_keys=guide_keys)
        if kind == "sigmoid":
            z = torch.where(T, 1.0, -1.0).to(dt)
            row_lse[r0:r1] = torch.where(valid, F.softplus(-z * S), 0.0).sum(1)
            continue
        Sm = S.masked_fill(~(valid & ~T) if exclude_targets else ~valid, -math.inf)
        if lo:
            row_lse[r0:r1], row_lo[r0:r1] = _split(_lse64(Sm, 1), dt)
        else:
            row_lse[r0:r1] = torch.logsumexp(Sm, dim=1)
        if lse2_ratio is not None:
            row_aux[2, r0:r1] = torch.logsumexp(Sm * lse2_ratio, dim=1)
        if target_lse:
            row_pos[r0:r1] = torch.logsumexp(S.masked_fill(~T, -math.inf), dim=1)
        else:
            row_pos[r0:r1] = torch.where(T, Tw * S, 0.0).sum(1)
        row_npos[r0:r1] = Tw.sum(1)
        if teacher_queries is not None:  # float64 sums of the float32 logits
            St = _teacher_logits(teacher_queries, teacher_keys, teacher_scale, r0, r1, dt)
            t_lse = _lse64(St.masked_fill(~valid, -math.inf), 1)
            Tt = torch.where(valid, torch.exp(St.double() - t_lse[:, None]), 0.0)
            w = teacher_scale[1].double()
            pos = (Tt * torch.where(valid, S, 0.0).double()).sum(1) * w + (1 - w) * row_pos[r0:r1].double()
            row_pos[r0:r1], row_aux[2, r0:r1] = _split(pos, dt)
            row_npos[r0:r1] = 1.0
            row_aux[0, r0:r1] = t_lse
            row_aux[1, r0:r1] = torch.where(
                t_lse > -math.inf, (Tt * torch.where(valid, St, 0.0).double()).sum(1) - t_lse, 0.0)
            bits = torch.int32 if dt == torch.float32 else torch.int64
            row_aux[3, r0:r1] = Sm.argmax(1).to(bits).view(dt)
        if symmetric:
            Tc = _col_targets(rows, cols, col_positives, offset) & valid
            Sc = S.masked_fill(~(valid & ~Tc), -math.inf) if exclude_targets else Sm
            if lo:
                col_lse64 = torch.logaddexp(col_lse64, _lse64(Sc, 0))
            else:
                col_lse = torch.logaddexp(col_lse, torch.logsumexp(Sc, dim=0))
            col_pos += torch.where(Tc, S, 0.0).sum(0)
    if not lse_lo:
        return row_lse, row_pos, row_npos, col_lse, col_pos, row_aux
    col_lo = None
    if col_lse64 is not None:
        col_lse, col_lo = _split(col_lse64, dt)
    pos_lo = row_aux[2] if teacher_queries is not None else None
    return row_lse, row_pos, row_npos, col_lse, col_pos, row_aux, row_lo, col_lo, pos_lo


def _lse64(S: Tensor, dim: int) -> Tensor:
    """LSE along ``dim`` as float64 max + log(sum exp(S - max)), the exponentials in S's dtype
    and their sum in float64 (beside a dominant 1, float32 additions round by up to 6e-8 each):
    where the LSE rounded to float32 is off by up to half an ulp of |LSE|."""
    m = S.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lg = torch.log(torch.exp(S - m).sum(dim, dtype=torch.float64))
    return m.squeeze(dim).double() + lg


def _split(x: Tensor, dt):
    hi = x.to(dt)
    lo = (x - hi.double()).to(dt)
    return hi, torch.where(torch.isfinite(hi), lo, torch.zeros_like(lo))


def _teacher_logits(tq, tk, ts, r0, r1, dt):
    """st <u_i, v_j> of rows [r0, r1); ts = (st, w)."""
    return ts[0].to(dt) * (tq[r0:r1].to(dt) @ tk.to(dt).transpose(0, 1))


def engine_backward(queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor], *,
                    row_lse: Tensor, row_npos: Tensor, col_lse: Optional[Tensor],
                    grad_row: Tensor, grad_col: Optional[Tensor], needs: Tuple[bool, ...],
                    kind: str = "softmax", symmetric: bool = False, exclude_self: bool = False,
                    offset: int = 0, positives=None, col_positives=None, row_labels=None,
                    col_labels=None, exclude_targets: bool = False, target_lse: bool = False,
                    row_pos: Optional[Tensor] = None, grad_row_pos: Optional[Tensor] = None,
                    grad_col_pos: Optional[Tensor] = None, fn_space: int = 0, fn_threshold=None,
                    row_ids=None, col_ids=None, teacher_queries=None, teacher_keys=None,
                    teacher_scale=None, row_aux: Optional[Tensor] = None,
                    lse2_ratio: Optional[float] = None, grad_row_lse2: Optional[Tensor] = None,
                    centres: Optional[Tuple[Tensor, Optional[Tensor]]] = None, target_weights=None,
                    line_sums: bool = False, guide_queries=None, guide_keys=None):
    """Returns (d_queries | None, d_keys | None, d_scale | None, d_bias | None), and with
    ``line_sums`` (sums of dS's row part per row (N,), of its column part per column (M,) | None).

    dS = a P + b dT + ac Pc + bc Tc with a = grad_row, b = grad_row_pos (None: tied, b = -a and
    rows without targets get no gradient), ac = grad_col, bc = grad_col_pos (None: -ac).
    ``centres`` (m (N,), n (M,) or None): d_scale is the centred sum
    sum R_ij (c_ij - m_i) + sum C_ij (c_ij - n_j) of dS's row part R and column part C instead."""
    N, M = queries.shape[0], keys.shape[0]
    dt = _compute_dtype(queries)
    need_q, need_k, need_s, need_b = needs
    dq = torch.zeros(queries.shape, dtype=dt, device=queries.device) if need_q else None
    dk = torch.zeros(keys.shape, dtype=dt, device=keys.device) if need_k else None
    ds = torch.zeros((), dtype=dt, device=queries.device)
    db = torch.zeros((), dtype=dt, device=queries.device)
    row_sums = torch.zeros(N, dtype=dt, device=queries.device) if line_sums else None
    col_sums = None
    if line_sums and symmetric and grad_col is not None:
        col_sums = torch.zeros(M, dtype=dt, device=queries.device)
    s = scale.to(dt).reshape(())
    keys_dtype = keys.dtype
    kf = keys = keys.to(dt)  # once, not per chunk
    for r0, r1 in _chunks(N, M):
        S, c, valid, T, Tw, rows, cols = _tile(
            queries, keys, scale, bias, r0, r1, kind=kind, exclude_self=exclude_self,
            offset=offset, positives=positives, row_labels=row_labels, col_labels=col_labels,
            dtype=dt, fn_space=fn_space, fn_threshold=fn_threshold, row_ids=row_ids, col_ids=col_ids,
            target_weights=target_weights, guide_queries=guide_queries, guide_keys=guide_keys)
        g = grad_row[r0:r1].to(dt)[:, None]
        if kind == "sigmoid":
            z = torch.where(T, 1.0, -1.0).to(dt)
            dS = torch.where(valid, -z * torch.sigmoid(-z * S) * g, 0.0)
        else:
            npos = row_npos[r0:r1].to(dt)[:, None]
            has = npos > 0
            in_lse = valid & ~T if exclude_targets else valid
            P = torch.where(in_lse, torch.exp(S - row_lse[r0:r1].to(dt)[:, None]), 0.0)
            if teacher_queries is not None:
                St = _teacher_logits(teacher_queries, teacher_keys, teacher_scale, r0, r1, dt)
                w = teacher_scale[1].to(dt)
                dT = (w * torch.where(valid, torch.exp(St - row_aux[0, r0:r1].to(dt)[:, None]), 0.0)
                      + (1 - w) * T.to(dt))
            elif target_lse:
                dT = torch.where(T, torch.exp(S - row_pos[r0:r1].to(dt)[:, None]), 0.0)
            else:
                dT = Tw / torch.where(has, npos, 1.0)
            if grad_row_pos is None:
                dS = torch.where(has, g * (P - dT), 0.0)
            else:
                dS = g * P + grad_row_pos[r0:r1].to(dt)[:, None] * dT
            if lse2_ratio is not None and grad_row_lse2 is not None:
                P2 = torch.where(in_lse, torch.exp(S * lse2_ratio - row_aux[2, r0:r1].to(dt)[:, None]), 0.0)
                dS = dS + (grad_row_lse2[r0:r1].to(dt) * lse2_ratio)[:, None] * P2
            dS_rows = dS
            if symmetric and grad_col is not None:
                Tc = _col_targets(rows, cols, col_positives, offset) & valid
                in_col = valid & ~Tc if exclude_targets else valid
                Pc = torch.where(in_col, torch.exp(S - col_lse.to(dt)[None, :]), 0.0)
                gc = grad_col.to(dt)[None, :]
                bc = -gc if grad_col_pos is None else grad_col_pos.to(dt)[None, :]
                dS_cols = gc * Pc + bc * Tc.to(dt)
                dS = dS + dS_cols
        if need_q:
            dq[r0:r1] = s * (dS @ kf)
        if need_k:
            dk += s * (dS.transpose(0, 1) @ queries[r0:r1].to(dt))
        if need_s and centres is not None:
            ds += (dS_rows * (c - centres[0][r0:r1].to(dt)[:, None])).sum()
            if centres[1] is not None:
                ds += (dS_cols * (c - centres[1].to(dt)[None, :])).sum()
        elif need_s:
            ds += (dS * c).sum()
        if need_b:
            db += dS.sum()
        if line_sums:
            row_sums[r0:r1] = dS_rows.sum(1)
            if col_sums is not None:
                col_sums += dS_cols.sum(0)
    out = (dq.to(queries.dtype) if need_q else None,
           dk.to(keys_dtype) if need_k else None,
           ds.reshape(1) if need_s else None,
           db.reshape(1) if need_b else None)
    return (*out, row_sums, col_sums) if line_sums else out


def engine_count_above(queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor],
                       threshold: Optional[Tensor], *, exclude_self: bool = False, offset: int = 0,
                       positives=None, row_labels=None, col_labels=None, **_):
    """(N,) for each row, the number of valid non-target j with S_ij > threshold_i (threshold
    None: the row's own target logit, one target per row)."""
    N, M = queries.shape[0], keys.shape[0]
    dt = _compute_dtype(queries)
    keys = keys.to(dt)
    out = torch.empty(N, dtype=dt, device=queries.device)
    for r0, r1 in _chunks(N, M):
        S, _, valid, T, _, _, _ = _tile(queries, keys, scale, bias, r0, r1, kind="softmax",
                                     exclude_self=exclude_self, offset=offset, positives=positives,
                                     row_labels=row_labels, col_labels=col_labels, dtype=dt)
        thr = (S.where(T, 0.0).sum(1) if threshold is None else threshold[r0:r1].to(dt))
        out[r0:r1] = (valid & ~T & (S > thr[:, None])).sum(1).to(dt)
    return out


def engine_top_negatives(queries: Tensor, keys: Tensor, k: int, *, exclude_self: bool = False,
                         offset: int = 0, positives=None, row_labels=None, col_labels=None, **_):
    """((N, k) values, (N, k) indices) of the k largest <q_i, k_j> over valid non-target j."""
    N, M = queries.shape[0], keys.shape[0]
    dt = _compute_dtype(queries)
    keys = keys.to(dt)
    vals = torch.full((N, k), -math.inf, dtype=dt, device=queries.device)
    idx = torch.full((N, k), -1, dtype=torch.int64, device=queries.device)
    one = torch.ones(1, dtype=dt, device=queries.device)
    for r0, r1 in _chunks(N, M):
        _, c, valid, T, _, _, _ = _tile(queries, keys, one, None, r0, r1, kind="softmax",
                                     exclude_self=exclude_self, offset=offset, positives=positives,
                                     row_labels=row_labels, col_labels=col_labels, dtype=dt)
        kk = min(k, M)
        v, i = torch.topk(c.masked_fill(~valid | T, -math.inf), kk, dim=1)
        vals[r0:r1, :kk] = v
        idx[r0:r1, :kk] = torch.where(v == -math.inf, -1, i)
    return vals, idx
