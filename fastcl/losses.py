"""Public loss functions and ``nn.Module`` wrappers.

Every function here validates its inputs, resolves the backend and calls the one autograd Function
(:mod:`fastcl.autograd`) with a :class:`~fastcl.ops.LossSpec` describing the closure.
Losses are returned in float32 (float64 for float64 inputs on the torch backend).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from . import _backend
from .autograd import engine_loss
from .ops import LossSpec, Targets

Tensor = torch.Tensor
Scalar = Union[float, int, Tensor]

__all__ = ["info_nce", "clip_loss", "InfoNCELoss", "ClipLoss"]

_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _check_features(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): the loss needs N >= 1 and D >= 1")


def _check_pair(qname: str, q: Tensor, kname: str, k: Tensor) -> None:
    _check_features(qname, q)
    _check_features(kname, k)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"{qname} and {kname} must share the feature dimension D, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if q.device != k.device:
        raise ValueError(f"{qname} and {kname} must be on the same device, got {q.device} and {k.device}")
    if q.dtype != k.dtype and not _autocast_dtype(q.device):
        raise TypeError(f"{qname} and {kname} must have the same dtype, got {q.dtype} and {k.dtype} "
                        "(cast one of them, or run under torch.autocast)")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _scalar_param(name: str, x, device: torch.device, *, optional: bool) -> Optional[Tensor]:
    """Floats become 0-d float32 tensors (no host-device copy); tensors keep their autograd graph."""
    if x is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a float or a one-element tensor, got None")
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != device and x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device} but the features are on {device}")
        return x.to(device) if x.device != device else x
    if isinstance(x, bool) or not isinstance(x, (float, int)):
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(x).__name__}")
    return torch.full((), float(x), dtype=torch.float32, device=device)


def _check_index(name: str, idx, n: int, bound: int, bound_name: str, device) -> Tensor:
    if not isinstance(idx, Tensor):
        raise TypeError(f"{name} must be an int64 tensor of shape ({n},), got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {idx.dtype}")
    if idx.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the features are on {device}")
    idx = idx.to(torch.int64)
    if idx.device.type == "cpu":
        if n and (int(idx.min()) < 0 or int(idx.max()) >= bound):
            raise ValueError(f"{name} must lie in [0, {bound}) ({bound_name}), got values in "
                             f"[{int(idx.min())}, {int(idx.max())}]")
    else:  # checked on the device without a host sync; fails at the next synchronisation
        torch._assert_async(((idx >= 0) & (idx < bound)).all(),
                            f"{name} must lie in [0, {bound}) ({bound_name})")
    return idx


# ----------------------------------------------------------------------------------------------
# autocast and backend
# ----------------------------------------------------------------------------------------------


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except TypeError:  # torch < 2.4 signature
        if device.type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def _prepare(q: Tensor, k: Tensor, backend: str) -> Tuple[Tensor, Tensor, str]:
    """Apply autocast (features cast like a matmul's inputs) and resolve the backend."""
    ac = _autocast_dtype(q.device)
    if ac is not None and (q.dtype == torch.float32 or k.dtype == torch.float32 or q.dtype != k.dtype):
        q, k = q.to(ac), k.to(ac)
    return q, k, _backend.resolve(backend, q.device, q.dtype)


def _reduce(per: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def info_nce(queries: Tensor, keys: Tensor, *, positives: Optional[Tensor] = None,
             scale: Scalar = 1.0 / 0.07, bias: Optional[Scalar] = None, reduction: str = "mean",
             backend: str = "auto", exact: bool = False) -> Tensor:
    """One-way InfoNCE (MoCo, DPR, MultipleNegativesRanking): ``L_i = LSE_j S_ij - S_{i,p(i)}``.

    Args:
        queries: (N, D) float16/bfloat16/float32/float64.
        keys: (M, D), same dtype and device; M >= N when ``positives`` is None (in-batch keys
            first, then extra hard-negative / queue keys). Keys may be detached (no gradient work).
        positives: (N,) int64 key index of each query's positive; default ``arange(N)``.
        scale: float or one-element tensor (1/temperature); a tensor gets a gradient.
        bias: optional float or one-element tensor added to every logit.
        reduction: "mean" | "sum" | "none" (per-query losses, shape (N,)).
        backend: "auto" (Triton on CUDA, torch elsewhere) | "triton" | "torch" | "cuda" | "cpu".
        exact: float32 inputs use IEEE fp32 products instead of TF32.
    Returns:
        scalar, or (N,) for ``reduction="none"``.
    """
    _check_pair("queries", queries, "keys", keys)
    _check_reduction(reduction)
    N, M = queries.shape[0], keys.shape[0]
    if positives is None:
        if M < N:
            raise ValueError(f"keys must have at least as many rows as queries when positives is "
                             f"None (key i is query i's positive), got N={N} queries and M={M} keys")
    else:
        positives = _check_index("positives", positives, N, M, "key indices", queries.device)
    s = _scalar_param("scale", scale, queries.device, optional=False)
    b = _scalar_param("bias", bias, queries.device, optional=True)
    queries, keys, be = _prepare(queries, keys, backend)
    spec = LossSpec(kind="softmax", exact=exact)
    rows, _ = engine_loss(queries, keys, s, b, Targets(positives=positives), spec, be)
    return _reduce(rows, reduction)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
              logit_bias: Optional[Scalar] = None, reduction: str = "mean", backend: str = "auto",
              exact: bool = False) -> Tensor:
    """Symmetric CLIP loss ``1/2 [CE(S, diag) + CE(S^T, diag)]`` in one fused sweep.

    Args:
        image_features: (N, D); text_features: (N, D), same dtype and device.
        logit_scale: the already-exponentiated scale as in open_clip (float or one-element tensor;
            a tensor gets its gradient).
        logit_bias: optional float or one-element tensor added to every logit.
        reduction: "mean" (open_clip's value) | "sum" | "none". "none" returns a (2, N) tensor:
            row 0 the image->text loss of each image, row 1 the text->image loss of each text;
            "mean" and "sum" are that tensor's ``mean()`` and ``sum()``.
        backend, exact: as in :func:`info_nce`.
    """
    _check_pair("image_features", image_features, "text_features", text_features)
    _check_reduction(reduction)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError("image_features and text_features must have the same batch size N, got "
                         f"{image_features.shape[0]} and {text_features.shape[0]}")
    s = _scalar_param("logit_scale", logit_scale, image_features.device, optional=False)
    b = _scalar_param("logit_bias", logit_bias, image_features.device, optional=True)
    q, k, be = _prepare(image_features, text_features, backend)
    spec = LossSpec(kind="softmax", symmetric=True, exact=exact)
    rows, cols = engine_loss(q, k, s, b, Targets(), spec, be)
    return _reduce(torch.stack([rows, cols]), reduction)


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce`: ``forward(queries (N, D), keys (M, D), positives=None)``."""

    def __init__(self, scale: Scalar = 1.0 / 0.07, bias: Optional[Scalar] = None,
                 reduction: str = "mean", backend: str = "auto", exact: bool = False):
        super().__init__()
        _check_reduction(reduction)
        self.scale, self.bias = scale, bias
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, queries: Tensor, keys: Tensor, positives: Optional[Tensor] = None) -> Tensor:
        return info_nce(queries, keys, positives=positives, scale=self.scale, bias=self.bias,
                        reduction=self.reduction, backend=self.backend, exact=self.exact)


class ClipLoss(nn.Module):
    """Drop-in for open_clip's ``ClipLoss`` (single process):
    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``."""

    def __init__(self, reduction: str = "mean", backend: str = "auto", exact: bool = False):
        super().__init__()
        _check_reduction(reduction)
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
                logit_bias: Optional[Scalar] = None, output_dict: bool = False):
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias,
                         reduction=self.reduction, backend=self.backend, exact=self.exact)
        return {"contrastive_loss": loss} if output_dict else loss
