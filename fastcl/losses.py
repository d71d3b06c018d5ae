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

__all__ = ["info_nce", "clip_loss", "siglip_loss", "nt_xent", "supcon",
           "InfoNCELoss", "ClipLoss", "SigLipLoss", "NTXentLoss", "SupConLoss"]

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


def _scalar_param(name: str, x, device: torch.device, *, optional: bool,
                  dtype: torch.dtype = torch.float32) -> Optional[Tensor]:
    """Floats become 0-d tensors filled on the device (no host-device copy; float64 only for
    float64 features); tensors keep their autograd graph."""
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
    return torch.full((), float(x), dtype=dtype, device=device)


def _check_index(name: str, idx, n: int, bound: int, bound_name: str, device) -> Tensor:
    if not isinstance(idx, Tensor):
        raise TypeError(f"{name} must be an int64 tensor of shape ({n},), got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {idx.dtype}")
    if idx.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the features are on {device}")
    idx = idx.to(torch.int64).contiguous()
    if idx.device.type == "cpu":
        if n and (int(idx.min()) < 0 or int(idx.max()) >= bound):
            raise ValueError(f"{name} must lie in [0, {bound}) ({bound_name}), got values in "
                             f"[{int(idx.min())}, {int(idx.max())}]")
    else:  # checked on the device without a host sync; fails at the next synchronisation
        torch._assert_async(((idx >= 0) & (idx < bound)).all(),
                            f"{name} must lie in [0, {bound}) ({bound_name})")
    return idx


def _check_labels(name: str, labels, n: int, device) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape ({n},), got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (class ids), got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    return labels.to(torch.int64).contiguous()


def _inverse_temperature(temperature) -> Scalar:
    if isinstance(temperature, Tensor):
        return 1.0 / temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (float, int)):
        raise TypeError(f"temperature must be a float or a one-element tensor, got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return 1.0 / float(temperature)


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
    s = _scalar_param("scale", scale, queries.device, optional=False,
                      dtype=queries.dtype if queries.dtype == torch.float64 else torch.float32)
    b = _scalar_param("bias", bias, queries.device, optional=True,
                      dtype=queries.dtype if queries.dtype == torch.float64 else torch.float32)
    queries, keys, be = _prepare(queries, keys, backend)
    spec = LossSpec(kind="softmax", exact=exact)
    rows, _, _ = engine_loss(queries, keys, s, b, Targets(positives=positives), spec, be)
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
    s = _scalar_param("logit_scale", logit_scale, image_features.device, optional=False,
                      dtype=image_features.dtype if image_features.dtype == torch.float64 else torch.float32)
    b = _scalar_param("logit_bias", logit_bias, image_features.device, optional=True,
                      dtype=image_features.dtype if image_features.dtype == torch.float64 else torch.float32)
    q, k, be = _prepare(image_features, text_features, backend)
    spec = LossSpec(kind="softmax", symmetric=True, exact=exact)
    rows, cols, _ = engine_loss(q, k, s, b, Targets(), spec, be)
    return _reduce(torch.stack([rows, cols]), reduction)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
                logit_bias: Optional[Scalar], *, labels: Optional[Tensor] = None,
                reduction: str = "mean", backend: str = "auto", exact: bool = False) -> Tensor:
    """SigLIP pairwise sigmoid loss ``-(1/N) sum_ij log sigmoid(z_ij S_ij)``, fused (no N x N matrix).

    Args:
        image_features: (N, D); text_features: (M, D) (M = N for paired batches).
        logit_scale, logit_bias: floats or one-element tensors (tensors get gradients); SigLIP
            initialises them to 10 and -10.
        labels: optional (N,) class ids when N == M: z_ij = +1 where labels match (several
            positives per row); default: z_ij = +1 on the diagonal only.
        reduction: "mean" (open_clip's value, the total over N) | "sum" | "none" ((N,) per-image sums).
    """
    _check_pair("image_features", image_features, "text_features", text_features)
    _check_reduction(reduction)
    N, M = image_features.shape[0], text_features.shape[0]
    targets = Targets()
    if labels is not None:
        if M != N:
            raise ValueError(f"labels need paired batches (N == M), got N={N}, M={M}")
        labels = _check_labels("labels", labels, N, image_features.device)
        targets = Targets(row_labels=labels, col_labels=labels)
    s = _scalar_param("logit_scale", logit_scale, image_features.device, optional=False,
                      dtype=image_features.dtype if image_features.dtype == torch.float64 else torch.float32)
    b = _scalar_param("logit_bias", logit_bias, image_features.device, optional=True,
                      dtype=image_features.dtype if image_features.dtype == torch.float64 else torch.float32)
    q, k, be = _prepare(image_features, text_features, backend)
    rows, _, _ = engine_loss(q, k, s, b, targets, LossSpec(kind="sigmoid", exact=exact), be)
    return _reduce(rows, reduction)


def nt_xent(z1: Tensor, z2: Tensor, temperature: Scalar = 0.5, *, normalize: bool = True,
            reduction: str = "mean", backend: str = "auto", exact: bool = False) -> Tensor:
    """SimCLR NT-Xent over the 2N rows of ``Z = [z1; z2]``: self excluded, positive of a is a +- N.

    Args:
        z1, z2: (N, D) the two views' embeddings; temperature: float or one-element tensor.
        normalize: L2-normalise the rows first (cosine similarity, as SimCLR).
        reduction: "mean" | "sum" | "none" ((2N,) per-row losses, z1's rows first).
    """
    _check_pair("z1", z1, "z2", z2)
    _check_reduction(reduction)
    if z1.shape[0] != z2.shape[0]:
        raise ValueError(f"z1 and z2 must have the same batch size, got {z1.shape[0]} and {z2.shape[0]}")
    inv_t = _inverse_temperature(temperature)
    s = _scalar_param("temperature", inv_t, z1.device, optional=False,
                      dtype=z1.dtype if z1.dtype == torch.float64 else torch.float32)
    z1, z2, be = _prepare(z1, z2, backend)
    Z = torch.cat([z1, z2])
    if normalize:
        Z = torch.nn.functional.normalize(Z, dim=1)
    n2 = Z.shape[0]
    positives = torch.arange(n2, device=Z.device).add_(n2 // 2).remainder_(n2)
    spec = LossSpec(kind="softmax", exclude_self=True, exact=exact)
    rows, _, _ = engine_loss(Z, Z, s, None, Targets(positives=positives), spec, be)
    return _reduce(rows, reduction)


def supcon(features: Tensor, labels: Tensor, temperature: Scalar = 0.1, *, variant: str = "out",
           normalize: bool = True, reduction: str = "mean", backend: str = "auto",
           exact: bool = False, return_valid: bool = False):
    """Supervised contrastive loss (Khosla et al. 2020), fused.

    Args:
        features: (B, D), or (B, V, D) for V views of each sample (rows are taken view-major, as
            ``torch.cat(features.unbind(1))``); labels: (B,) integer class ids.
        variant: "out" (L^sup_out: mean log-probability of the positives; the paper's choice).
        normalize: L2-normalise the rows first.
        reduction: "mean" over rows that have at least one positive | "sum" | "none" ((V*B,)).
        return_valid: also return the (V*B,) bool mask of rows that have a positive. Rows without
            a positive get loss 0 and no gradient; they never produce NaN.
    """
    if not isinstance(features, Tensor) or features.dim() not in (2, 3):
        raise ValueError("features must be a tensor of shape (B, D) or (B, V, D), got "
                         f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
    if variant != "out":
        raise ValueError(f"variant must be 'out', got {variant!r}")
    _check_reduction(reduction)
    B = features.shape[0]
    labels = _check_labels("labels", labels, B, features.device)
    if features.dim() == 3:
        V = features.shape[1]
        features = torch.cat(torch.unbind(features, dim=1))
        labels = labels.repeat(V)
    _check_features("features", features)
    inv_t = _inverse_temperature(temperature)
    s = _scalar_param("temperature", inv_t, features.device, optional=False,
                      dtype=features.dtype if features.dtype == torch.float64 else torch.float32)
    features, _, be = _prepare(features, features, backend)
    if normalize:
        features = torch.nn.functional.normalize(features, dim=1)
    spec = LossSpec(kind="softmax", exclude_self=True, exact=exact)
    rows, _, npos = engine_loss(features, features, s, None,
                                Targets(row_labels=labels, col_labels=labels), spec, be)
    valid = npos > 0
    if reduction == "mean":
        loss = rows.sum() / valid.sum().clamp(min=1)
    else:
        loss = _reduce(rows, reduction)
    return (loss, valid) if return_valid else loss


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


class SigLipLoss(nn.Module):
    """Module form of :func:`siglip_loss`:
    ``forward(image_features, text_features, logit_scale, logit_bias, labels=None)``."""

    def __init__(self, reduction: str = "mean", backend: str = "auto", exact: bool = False):
        super().__init__()
        _check_reduction(reduction)
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
                logit_bias: Optional[Scalar], labels: Optional[Tensor] = None) -> Tensor:
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, labels=labels,
                           reduction=self.reduction, backend=self.backend, exact=self.exact)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`: ``forward(z1 (N, D), z2 (N, D))``."""

    def __init__(self, temperature: Scalar = 0.5, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", exact: bool = False):
        super().__init__()
        _check_reduction(reduction)
        self.temperature, self.normalize = temperature, normalize
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent(z1, z2, self.temperature, normalize=self.normalize,
                       reduction=self.reduction, backend=self.backend, exact=self.exact)


class SupConLoss(nn.Module):
    """Module form of :func:`supcon`: ``forward(features (B, D) or (B, V, D), labels (B,))``."""

    def __init__(self, temperature: Scalar = 0.1, variant: str = "out", normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", exact: bool = False):
        super().__init__()
        _check_reduction(reduction)
        self.temperature, self.variant, self.normalize = temperature, variant, normalize
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return supcon(features, labels, self.temperature, variant=self.variant,
                      normalize=self.normalize, reduction=self.reduction, backend=self.backend,
                      exact=self.exact)
