"""open_clip drop-ins: ``ClipLoss``, ``CoCaLoss``, ``DistillClipLoss`` and ``SigLipLoss`` with
open_clip's constructor and forward signatures and numbers, on the fused engine. open_clip itself is
not imported.

Single process (``world_size == 1``): the fused :func:`fastcl.clip_loss` / :func:`fastcl.siglip_loss`.
Several processes (``world_size > 1``, torch.distributed initialised, ``rank`` / ``world_size`` as
given to open_clip) reproduce open_clip's per-rank values and gradients:

* ``ClipLoss(local_loss=True, gather_with_grad=True)``: the rank's local rows against all-gathered
  features; with ``dist_mode="ring"`` the same value and feature gradients from
  :mod:`fastcl.distributed`'s ring instead (no rank holds all features). The ring splits the
  logit scale / bias gradient across ranks differently (each rank's share is its tiles' part):
  the sum over ranks, hence the DDP-averaged gradient, is the same.
* ``local_loss=False``: the full global loss on every rank from gathered features (the rank's own
  slice keeps its gradient when ``gather_with_grad=False``, as in open_clip).
* ``DistillClipLoss``: ``ClipLoss``'s term and the distillation term, each row's cross-entropy
  against the teacher's softmax over the same (gathered) columns, the teacher's logits recomputed
  in the tiles (:func:`fastcl.distill`, ``objective="cross_entropy"``). The teacher's features and
  scale are constants, as open_clip's training computes them (under ``torch.no_grad``): a
  teacher input that requires a gradient is refused.
* ``CoCaLoss``: ``ClipLoss``'s term, weighted, and the captioning term, torch's cross-entropy of
  the text decoder's logits (already the model's output; nothing to fuse) with ``pad_id`` ignored.
* ``SigLipLoss``: the rank's images against every rank's texts (the positive only on its own
  block), divided by the local batch size; ``dist_impl`` "gather" all-gathers the texts, every
  other value ("bidir", "shift", "reduce", "ring") uses the ring: the texts travel, not all held.
  (SigLIP's per-rank scale / bias gradients equal open_clip's in both: the tiles of a rank are
  exactly its own rows.)

``exact`` (both): float32 features' products in IEEE arithmetic; by default as torch's float32
matmul precision allows (:func:`fastcl.integrations._common.exact_products`), as open_clip's own
``image_features @ text_features.T``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as fdist
from ..losses import _check_pair, _prepare, _scalar_param, clip_loss, distill, info_nce, siglip_loss
from ._common import exact_products

Tensor = torch.Tensor

__all__ = ["ClipLoss", "CoCaLoss", "DistillClipLoss", "SigLipLoss"]


def _gather_no_grad(x: Tensor, rank: int, world_size: int, keep_local: bool) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    if keep_local:  # the local slice keeps its autograd graph
        parts[rank] = x
    return torch.cat(parts)


def _sdt(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class ClipLoss(nn.Module):
    """open_clip ``ClipLoss``: ``forward(image_features, text_features, logit_scale,
    logit_bias=None, output_dict=False)``, image/text features (n, D) per rank."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, dist_mode: str = "gather", backend: str = "auto",
                 exact: Optional[bool] = None):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported; run with torch.distributed")
        if dist_mode not in fdist.MODES:
            raise ValueError(f"dist_mode must be one of {fdist.MODES}, got {dist_mode!r}")
        if dist_mode == "ring" and world_size > 1 and not (local_loss and gather_with_grad):
            raise ValueError("dist_mode='ring' reproduces local_loss=True, gather_with_grad=True only")
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.cache_labels = cache_labels  # labels are never materialised: nothing to cache
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.dist_mode, self.backend, self.exact = dist_mode, backend, exact

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        ex = exact_products(self.exact)
        if self.world_size <= 1:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                             exact=ex)
        elif not self.local_loss:
            if self.gather_with_grad:
                all_i = fdist.all_gather_with_grad(image_features)
                all_t = fdist.all_gather_with_grad(text_features)
            else:
                all_i = _gather_no_grad(image_features, self.rank, self.world_size, True)
                all_t = _gather_no_grad(text_features, self.rank, self.world_size, True)
            loss = clip_loss(all_i, all_t, logit_scale, logit_bias, backend=self.backend, exact=ex)
        else:
            loss = self._local(image_features, text_features, logit_scale, logit_bias, ex)
        return {"contrastive_loss": loss} if output_dict else loss

    def _local(self, img: Tensor, txt: Tensor, logit_scale, logit_bias, ex: bool) -> Tensor:
        _check_pair("image_features", img, "text_features", txt)
        n = img.shape[0]
        if self.dist_mode == "ring":
            s = _scalar_param("logit_scale", logit_scale, img.device, optional=False, dtype=_sdt(img))
            b = _scalar_param("logit_bias", logit_bias, img.device, optional=True, dtype=_sdt(img))
            q, k, be = _prepare(img, txt, self.backend)
            rows, cols, _ = fdist._ring(q, k, s, b, None, kind="softmax", symmetric=True, exact=ex,
                                        backend=be, group=None)
            return (rows.sum() + cols.sum()) / (2 * n)
        if self.gather_with_grad:
            all_i, all_t = fdist.all_gather_with_grad(img), fdist.all_gather_with_grad(txt)
        else:
            all_i = _gather_no_grad(img, self.rank, self.world_size, False)
            all_t = _gather_no_grad(txt, self.rank, self.world_size, False)
        labels = torch.arange(n, device=img.device) + n * self.rank
        kw = dict(positives=labels, scale=logit_scale, bias=logit_bias, backend=self.backend, exact=ex)
        rows = info_nce(img, all_t, **kw)
        cols = info_nce(txt, all_i, **kw)
        return (rows + cols) / 2


class CoCaLoss(ClipLoss):
    """open_clip ``CoCaLoss``: ``forward(image_features, text_features, logits, labels,
    logit_scale, output_dict=False)`` -> (contrastive loss, caption loss), each weighted; the
    contrastive term as :class:`ClipLoss` (the same distributed options), the caption term the
    cross-entropy of ``logits`` (B, T, V) against ``labels`` (B, T), ``pad_id`` ignored."""

    def __init__(self, caption_loss_weight: float, clip_loss_weight: float, pad_id: int = 0,
                 local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, dist_mode: str = "gather", backend: str = "auto",
                 exact: Optional[bool] = None):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod,
                         dist_mode=dist_mode, backend=backend, exact=exact)
        self.clip_loss_weight, self.caption_loss_weight = clip_loss_weight, caption_loss_weight
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features: Tensor, text_features: Tensor, logits: Tensor,
                labels: Tensor, logit_scale, output_dict: bool = False):
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"logits must be (B, T, V) and labels (B, T), got {tuple(logits.shape)} "
                             f"and {tuple(labels.shape)}")
        if self.clip_loss_weight:
            contrastive = self.clip_loss_weight * super().forward(image_features, text_features,
                                                                  logit_scale)
        else:
            contrastive = torch.tensor(0, device=logits.device)
        caption = self.caption_loss_weight * self.caption_loss(logits.permute(0, 2, 1), labels)
        if output_dict:
            return {"contrastive_loss": contrastive, "caption_loss": caption}
        return contrastive, caption


class DistillClipLoss(ClipLoss):
    """open_clip ``DistillClipLoss``: ``forward(image_features, text_features, logit_scale,
    dist_image_features, dist_text_features, dist_logit_scale, output_dict=False)`` ->
    ``(contrastive_loss, distill_loss)`` (or the dict); constructor as :class:`ClipLoss`."""

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                dist_image_features: Tensor, dist_text_features: Tensor, dist_logit_scale,
                output_dict: bool = False):
        for name, x in (("dist_image_features", dist_image_features),
                        ("dist_text_features", dist_text_features), ("dist_logit_scale", dist_logit_scale)):
            if isinstance(x, Tensor) and x.requires_grad:
                raise ValueError(f"{name} requires a gradient, but the fused distillation term treats "
                                 "the teacher as a constant: compute it under torch.no_grad() or detach it")
        contrastive = super().forward(image_features, text_features, logit_scale)
        kw = dict(objective="cross_entropy", backend=self.backend, exact=exact_products(self.exact))
        img, txt, t_img, t_txt = image_features, text_features, dist_image_features, dist_text_features
        if self.world_size <= 1:
            loss = distill(img, txt, t_img, t_txt, logit_scale, dist_logit_scale, directions="both", **kw)
        else:
            all_ti = _gather_no_grad(t_img, self.rank, self.world_size, False)
            all_tt = _gather_no_grad(t_txt, self.rank, self.world_size, False)
            if self.gather_with_grad:
                all_i, all_t = fdist.all_gather_with_grad(img), fdist.all_gather_with_grad(txt)
            else:  # (the local slice keeps its graph for the global loss only, as in open_clip)
                all_i = _gather_no_grad(img, self.rank, self.world_size, not self.local_loss)
                all_t = _gather_no_grad(txt, self.rank, self.world_size, not self.local_loss)
            if self.local_loss:  # the rank's rows against every rank's columns, each direction
                rows = distill(img, all_t, t_img, all_tt, logit_scale, dist_logit_scale,
                               directions="row", **kw)
                cols = distill(txt, all_i, t_txt, all_ti, logit_scale, dist_logit_scale,
                               directions="row", **kw)
                loss = (rows + cols) / 2
            else:
                loss = distill(all_i, all_t, all_ti, all_tt, logit_scale, dist_logit_scale,
                               directions="both", **kw)
        return {"contrastive_loss": contrastive, "distill_loss": loss} if output_dict else (contrastive, loss)


class SigLipLoss(nn.Module):
    """open_clip ``SigLipLoss``: ``forward(image_features, text_features, logit_scale, logit_bias,
    output_dict=False)``; the value is ``-sum_ij log sigmoid(z_ij S_ij) / n_local``."""

    _IMPLS = ("bidir", "shift", "reduce", "gather", "ring")

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: str = "auto",
                 exact: Optional[bool] = None):
        super().__init__()
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in self._IMPLS:
            raise ValueError(f"dist_impl must be one of {self._IMPLS}, got {dist_impl!r}")
        self.cache_labels, self.rank, self.world_size, self.backend = cache_labels, rank, world_size, backend
        self.exact = exact

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        ex = exact_products(self.exact)
        if self.world_size <= 1:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                               exact=ex)
        else:
            _check_pair("image_features", image_features, "text_features", text_features)
            n = image_features.shape[0]
            dev = image_features.device
            s = _scalar_param("logit_scale", logit_scale, dev, optional=False, dtype=_sdt(image_features))
            b = _scalar_param("logit_bias", logit_bias, dev, optional=True, dtype=_sdt(image_features))
            q, k, be = _prepare(image_features, text_features, self.backend)
            loss = fdist._siglip_total(q, k, s, b, mode="gather" if self.dist_impl == "gather" else "ring",
                                       exact=ex, backend=be, group=None, weight=1.0 / n)
        return {"contrastive_loss": loss} if output_dict else loss
