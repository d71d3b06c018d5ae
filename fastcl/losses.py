"""Public loss functions and ``nn.Module`` wrappers.

Every function here validates its inputs, resolves the backend and calls the one autograd Function
(:mod:`fastcl.autograd`) with a :class:`~fastcl.ops.LossSpec` describing the closure.
Losses are returned in float32 (float64 for float64 inputs on the torch backend).
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _backend
from .autograd import (engine_loss, engine_row_total, engine_statistics, row_bilinear, row_dots,
                       unit_rows)
from .ops import LossSpec, Targets, compiling, merge_lse

Tensor = torch.Tensor
Scalar = Union[float, int, Tensor]

__all__ = ["info_nce", "clip_loss", "siglip_loss", "nt_xent", "supcon", "dcl", "soft_info_nce",
           "uniformity_loss", "alignment_loss", "distill", "softclip", "cwcl", "hcl", "mv_infonce",
           "mv_dhel", "InfoNCELoss", "ClipLoss", "SigLipLoss", "NTXentLoss", "SupConLoss", "DCLLoss"]

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


def _check_module_args(reduction: str, backend: str, **params) -> None:
    """A module's constructor arguments, checked when it is built rather than at its first call:
    the reduction, the backend's name, and float temperatures / scales (tensors are checked per
    call)."""
    _check_reduction(reduction)
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
    for name, x in params.items():
        if x is None or isinstance(x, Tensor):
            continue
        if name == "temperature":
            _inverse_temperature(x)
        elif name == "weight_sigma":
            _real(name, x, "a float or None", low=0.0)
        else:
            _real(name, x, "a float or a one-element tensor")


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
    return torch.full((), _real(name, x, "a float or a one-element tensor"), dtype=dtype,
                      device=device)


def _real(name: str, x, expected: str = "a float", *, low: Optional[float] = None,
          low_open: bool = True, high: Optional[float] = None, high_open: bool = True) -> float:
    """A finite Python / NumPy real number as float, optionally within (low | [low, high) | high]."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(x).__name__}")
    v = float(x)
    bad = not abs(v) < math.inf  # (not finite; NaN compares False: also under torch.compile's
    # symbolic floats, where math.isfinite does not trace)
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        if high is not None:
            lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
            where = f" in {lo}, {high:g}" + (")" if high_open else "]")
        elif low is not None:
            where = f" {'>' if low_open else '>='} {low:g}"
        else:
            raise ValueError(f"{name} must be finite, got {x}")
        raise ValueError(f"{name} must be{where} and finite, got {x}")
    return v


def _host_checks(x: Tensor) -> bool:
    """Whether checks of ``x``'s values read them here (CPU tensors, eagerly), raising ValueError;
    else they are assertions in the stream (a GPU's, without a host sync; a compiled graph's)."""
    return x.device.type == "cpu" and not compiling()


def _require(ok: Tensor, message: str) -> None:
    """A check of tensor values (``ok``: a 0-d bool tensor): a ValueError here for CPU tensors; on
    a GPU an asynchronous device assertion, without a host sync, that fails at the next
    synchronisation; under torch.compile an assertion in the graph (RuntimeError)."""
    if _host_checks(ok):
        if not bool(ok):
            raise ValueError(message)
    elif ok.device.type != "meta":
        torch._assert_async(ok, message)


def _check_nonnegative(name: str, w: Tensor) -> None:
    """Target weights must be finite and >= 0 (else the loss has no lower bound)."""
    _require((torch.isfinite(w) & (w >= 0)).all(), f"{name} must be >= 0 and finite")


def _check_positive_tensor(name: str, x: Tensor) -> None:
    """A one-element tensor parameter must be finite and > 0."""
    if x.numel() != 1:
        raise ValueError(f"{name} must be a float or a one-element tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    v = x.detach()
    _require((torch.isfinite(v) & (v > 0)).all(), f"{name} must be > 0 and finite")


def _check_index(name: str, idx, n: int, bound: int, bound_name: str, device, *,
                 allow_missing: bool = False) -> Tensor:
    """(n,) integer indices in [0, bound) (or -1 for "none" with ``allow_missing``), as int64."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"{name} must be an int64 tensor of shape ({n},), got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {idx.dtype}")
    if idx.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the features are on {device}")
    idx = idx.to(torch.int64).contiguous()
    low = -1 if allow_missing else 0
    if _host_checks(idx):
        if n and (int(idx.min()) < low or int(idx.max()) >= bound):
            raise ValueError(f"{name} must lie in [{low}, {bound}) ({bound_name}), got values in "
                             f"[{int(idx.min())}, {int(idx.max())}]")
    else:
        _require(((idx >= low) & (idx < bound)).all(), f"{name} must lie in [{low}, {bound}) ({bound_name})")
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


def _stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype of statistics and scalar parameters for features x: float64 only for float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _temperature_scale(temperature, like: Tensor) -> Tensor:
    """scale = 1 / temperature as a scalar parameter (a tensor temperature keeps its gradient)."""
    return _scalar_param("temperature", _inverse_temperature(temperature), like.device,
                         optional=False, dtype=_stat_dtype(like))


def _no_targets(n: int, device) -> Tensor:
    """Positives -1: rows without an in-kernel target (the loss supplies its own target terms)."""
    return torch.full((n,), -1, dtype=torch.int64, device=device)


def _inverse_temperature(temperature) -> Scalar:
    if isinstance(temperature, Tensor):
        _check_positive_tensor("temperature", temperature)
        return 1.0 / temperature
    return 1.0 / _real("temperature", temperature, "a float or a one-element tensor", low=0.0)


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


def _cast_dtype(*xs: Tensor) -> torch.dtype:
    """The features' dtype for the kernels: autocast's when it is on and any of ``xs`` is float32
    or their dtypes differ (cast like a matmul's inputs), else theirs."""
    ac = _autocast_dtype(xs[0].device)
    if ac is not None and any(x.dtype == torch.float32 or x.dtype != xs[0].dtype for x in xs):
        return ac
    return xs[0].dtype


def _prepare(q: Tensor, k: Tensor, backend: str) -> Tuple[Tensor, Tensor, str]:
    """Apply autocast (features cast like a matmul's inputs) and resolve the backend."""
    dt = _cast_dtype(q, k)
    q, k = q.to(dt), k.to(dt)
    return q, k, _backend.resolve(backend, q.device, q.dtype)


def _stack_rows(parts, normalize: bool, dtype: torch.dtype) -> Tensor:
    """The rows of ``parts`` (each (R_i, D)) stacked in ``dtype``, L2-normalised if ``normalize``
    (:func:`unit_rows`: the backward keeps only the result, not the stacked or cast inputs).
    Under torch.compile, F.normalize: the compiler chooses what its graph saves, and torch 2.4's
    dynamo mistraces a Function whose output is written in place (as unit_rows's, by row chunks)
    when another Function consumes it: the engine's gradient then comes out wrong."""
    parts = list(parts)
    if normalize and not compiling():
        return unit_rows(*parts, dtype=dtype)
    parts = [p.to(dtype) for p in parts]
    z = parts[0] if len(parts) == 1 else torch.cat(parts)
    return torch.nn.functional.normalize(z, dim=1) if normalize else z


def _two_views(z1: Tensor, z2: Tensor, normalize: bool, backend: str, min_batch: int = 1):
    """Validate two views (N, D) and stack them: (Z (2N, D), positives a +- N (2N,), backend)."""
    _check_pair("z1", z1, "z2", z2)
    if z1.shape[0] != z2.shape[0]:
        raise ValueError(f"z1 and z2 must have the same batch size, got {z1.shape[0]} and {z2.shape[0]}")
    if z1.shape[0] < min_batch:
        raise ValueError(f"this loss needs at least {min_batch} samples: with fewer there are no negatives")
    Z = _stack_rows((z1, z2), normalize, _cast_dtype(z1, z2))
    be = _backend.resolve(backend, Z.device, Z.dtype)
    n2 = Z.shape[0]
    return Z, torch.arange(n2, device=Z.device).add_(n2 // 2).remainder_(n2), be


def _sums_rows(x: Tensor, reduction: str, any_device: bool = False) -> bool:
    """Whether a row-only loss is reduced by :func:`fastcl.autograd.engine_row_total` ("sum" or
    "mean"; CPU tensors, or any with ``any_device``): where the engine takes a step for the
    closure (the C++ backend on the CPU, Triton's for the sigmoid closure) the gradients are
    then formed with the loss."""
    return reduction != "none" and (any_device or x.device.type == "cpu")


def _reduce_total(total: Tensor, count, reduction: str) -> Tensor:
    """"mean" (``total / count``) or "sum" of a row total."""
    return total / count if reduction == "mean" else total


def _reduce(per: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per


def _check_unit(name: str, x: float, *, high_open: bool = True) -> float:
    """A float in [0, 1) (or [0, 1] with ``high_open=False``)."""
    return _real(name, x, low=0.0, low_open=False, high=1.0, high_open=high_open)


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """<a_i, b_i> (a, b: (N, D); or <a_i, b> for b: (D,)) in float32 (float64 for float64
    inputs): O(N D), differentiable, without float32 copies of the operands."""
    return row_dots(a, b)


def _smoothing_term(q: Tensor, k: Tensor, pos: Optional[Tensor], s: Tensor, extra_sum=None,
                    extra_count: int = 0, totals=None) -> Tensor:
    """S_{i,p(i)} - mean_j S_ij = s <q_i, k_{p(i)} - mean_j k_j> (the bias cancels), O(N D).

    ``extra_sum`` (N, D) / ``extra_count`` add private columns to the mean (hard negatives);
    ``totals``: (sum_j k_j (D,), count) over more keys than ``k`` (every rank's), else k's own."""
    kp = k[: q.shape[0]] if pos is None else k.index_select(0, pos)
    dt = _stat_dtype(q)
    total, count = totals if totals is not None else (k.sum(0, dtype=dt), k.shape[0])
    if extra_sum is None:
        mean = total / count
    else:
        mean = (total + extra_sum.to(dt)) / (count + extra_count)
    return s.to(dt) * (_row_dots(q, kp) - _row_dots(q, mean))


def _shaping(label_smoothing, focal_gamma) -> Tuple[float, float]:
    """The checked (label_smoothing, focal_gamma) of :func:`info_nce` and :func:`clip_loss`."""
    eps = _check_unit("label_smoothing", label_smoothing, high_open=False)
    gamma = _real("focal_gamma", focal_gamma, low=0.0, low_open=False)
    if eps and gamma:
        raise ValueError("label_smoothing and focal_gamma cannot be combined")
    return eps, gamma


def _check_hard_negatives(hard_negatives, queries: Tensor) -> None:
    """(N, h, D) private negatives of each query, in the queries' dtype (or any under autocast)
    and on their device."""
    N, D = queries.shape
    if not isinstance(hard_negatives, Tensor) or hard_negatives.dim() != 3 or \
            hard_negatives.shape[0] != N or hard_negatives.shape[2] != D:
        raise ValueError(f"hard_negatives must have shape (N={N}, h, D={D}), got "
                         f"{tuple(hard_negatives.shape) if isinstance(hard_negatives, Tensor) else type(hard_negatives).__name__}")
    if not hard_negatives.is_floating_point():
        raise TypeError(f"hard_negatives must be a floating-point tensor, got {hard_negatives.dtype}")
    if hard_negatives.dtype != queries.dtype and not _autocast_dtype(queries.device):
        raise TypeError(f"hard_negatives must have the queries' dtype {queries.dtype}, got {hard_negatives.dtype}")
    if hard_negatives.device != queries.device:
        raise ValueError(f"hard_negatives is on {hard_negatives.device} but queries are on {queries.device}")


def _with_hard_negatives(st, queries: Tensor, hard_negatives: Tensor, s: Tensor,
                         b: Optional[Tensor], threshold: Optional[Tensor] = None,
                         fn_space: int = 0) -> Tuple[Tensor, Tensor]:
    """(rows (N,), the negatives' sums (N, D)): each row's loss from the keys' statistics ``st``
    (:class:`fastcl.autograd.Statistics`) with its private negatives (N, h, D) merged into its
    LSE; ``threshold`` / ``fn_space``: the keys' false-negative rule, applied to them too."""
    dt = _stat_dtype(queries)
    hn = hard_negatives.to(queries.dtype)
    dots_h = torch.stack([_row_dots(queries, hn[:, j]) for j in range(hn.shape[1])], 1)
    logits_h = s.to(dt) * dots_h
    if b is not None:
        logits_h = logits_h + b.to(dt)
    if threshold is not None:  # the same false-negative rule as the keys' in the tiles
        above = (logits_h if fn_space == 1 else dots_h).detach() > threshold.to(dt)[:, None]
        logits_h = logits_h.masked_fill(above, -math.inf)
    # merged with the row LSE (finite: the positive stays in it; fully masked rows add 0) as
    # LSE - target + softplus(LSE_h - LSE): the row LSE's weight 1 - sigmoid(LSE_h - LSE)
    # then sums with the target's to -sigmoid(LSE_h - LSE), the negatives' share, to float32
    # accuracy; through logsumexp's exp(LSE - merged) it carried an ulp of the merged LSE
    # (~2e-6 next to shares of ~1e-5 on converged rows), which the scale gradient multiplies
    lse_h = torch.logsumexp(logits_h, dim=1)
    rows = st.row_gap() + nn.functional.softplus(lse_h - st.row_lse)
    return rows, hn.sum(1, dtype=dt)


def _focal(loss: Tensor, gamma: float) -> Tensor:
    """(1 - p)^gamma * loss with p = exp(-loss) the positive's probability."""
    return (-torch.expm1(-loss)).clamp(min=0).pow(gamma) * loss


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def info_nce(queries: Tensor, keys: Tensor, *, positives: Optional[Tensor] = None,
             scale: Scalar = 1.0 / 0.07, bias: Optional[Scalar] = None, reduction: str = "mean",
             label_smoothing: float = 0.0, focal_gamma: float = 0.0,
             hard_negatives: Optional[Tensor] = None, fn_margin: Optional[float] = None,
             fn_ratio: Optional[float] = None, key_ids: Optional[Tensor] = None,
             guide: Optional[Tuple[Tensor, Tensor]] = None, backend: str = "auto",
             exact: bool = False) -> Tensor:
    """One-way InfoNCE (MoCo, DPR, MultipleNegativesRanking): ``L_i = LSE_j S_ij - S_{i,p(i)}``.

    Args:
        queries: (N, D) float16/bfloat16/float32/float64.
        keys: (M, D), same dtype and device; M >= N when ``positives`` is None (in-batch keys
            first, then extra hard-negative / queue keys shared by every row). Keys may be
            detached (no gradient work).
        positives: (N,) int64 key index of each query's positive; default ``arange(N)``.
        scale: float or one-element tensor (1/temperature); a tensor gets a gradient.
        bias: optional float or one-element tensor added to every logit.
        reduction: "mean" | "sum" | "none" (per-query losses, shape (N,)).
        label_smoothing: epsilon of ``F.cross_entropy``'s label smoothing (uniform over all
            columns; not with false-negative masking).
        focal_gamma: per-row focal weighting ``(1 - p_i)^gamma * L_i``, p_i the positive's probability.
        hard_negatives: optional (N, h, D) private negatives of each query, merged into its LSE.
        fn_margin / fn_ratio / key_ids: in-tile false-negative masking: keys j != p(i) with
            ``S_ij > S_{i,p(i)} - fn_margin``, or cosine ``c_ij > fn_ratio * c_{i,p(i)}``, or
            ``key_ids[j] == key_ids[p(i)]`` (duplicates of the positive, (M,) int64) leave row i.
            ``fn_margin`` / ``fn_ratio`` apply to ``hard_negatives`` too; ``key_ids`` covers the
            keys only. Entries within rounding of the threshold (:func:`tie_slack`) stay, so
            exact duplicates of the positive do at margin 0 / ratio 1.
        guide: optional (guide_queries (N, Dg), guide_keys (M, Dg)), a guide model's embeddings
            (GISTEmbed; normalise them for cosines): the false-negative rule compares the guide's
            products ``g_ij = <u_i, v_j>``, recomputed in the tiles, instead of the model's:
            keys j != p(i) with ``g_ij > g_{i,p(i)} - fn_margin`` (default margin 0), or
            ``g_ij > fn_ratio * g_{i,p(i)}``, leave row i. The guide is cast to the features'
            dtype and its products formed in their precision; ties stay as above. No gradient
            reaches the guide; not with ``hard_negatives``.
        backend: "auto" (Triton on CUDA; on the CPU the C++ kernels where they implement the
            closure, else torch) | "triton" | "torch" | "cuda" | "cpu".
        exact: float32 inputs use IEEE fp32 products instead of TF32.
    Returns:
        scalar, or (N,) for ``reduction="none"``.
    """
    _check_pair("queries", queries, "keys", keys)
    _check_reduction(reduction)
    eps, gamma = _shaping(label_smoothing, focal_gamma)
    N, M = queries.shape[0], keys.shape[0]
    if positives is None:
        if M < N:
            raise ValueError(f"keys must have at least as many rows as queries when positives is "
                             f"None (key i is query i's positive), got N={N} queries and M={M} keys")
    else:
        positives = _check_index("positives", positives, N, M, "key indices", queries.device)
    if hard_negatives is not None:
        _check_hard_negatives(hard_negatives, queries)
    dt = _stat_dtype(queries)
    s = _scalar_param("scale", scale, queries.device, optional=False, dtype=dt)
    b = _scalar_param("bias", bias, queries.device, optional=True, dtype=dt)
    if fn_margin is not None and fn_ratio is not None:
        raise ValueError("fn_margin and fn_ratio cannot be combined")
    if eps and (fn_margin is not None or fn_ratio is not None or key_ids is not None
                or guide is not None):
        # (its uniform part would run over the dropped keys too: a different loss)
        raise ValueError("label_smoothing cannot be combined with false-negative masking "
                         "(fn_margin, fn_ratio, key_ids, guide)")
    if key_ids is not None:
        key_ids = _check_labels("key_ids", key_ids, M, queries.device)
    queries, keys, be = _prepare(queries, keys, backend)
    fn_space, threshold, row_ids, gu, gv = 0, None, None, None, None
    tf32 = tf32_products(queries, be, exact)
    if guide is not None:
        if not isinstance(guide, (tuple, list)) or len(guide) != 2:
            raise TypeError("guide must be a pair (guide_queries (N, Dg), guide_keys (M, Dg)), got "
                            f"{type(guide).__name__}")
        if hard_negatives is not None:
            raise ValueError("guide cannot be combined with hard_negatives")
        gu, gv = _teacher_pair("guide_queries", guide[0], "guide_keys", guide[1], N, M, queries)
        with torch.no_grad():
            g_pos = _row_dots(gu, gv[:N] if positives is None else gv.index_select(0, positives))
            fn_space = 3
            threshold = float(fn_ratio) * g_pos if fn_ratio is not None else \
                g_pos - float(fn_margin or 0.0)
            threshold = threshold + tie_slack(gu, gv, tf32)
    elif fn_margin is not None or fn_ratio is not None:
        with torch.no_grad():
            kp = keys[:N] if positives is None else keys.index_select(0, positives)
            c_pos = _row_dots(queries, kp)
            slack = tie_slack(queries, keys, tf32)
            if fn_margin is not None:
                fn_space = 1
                threshold = s.detach() * c_pos - float(fn_margin) + s.detach().abs() * slack
                threshold = threshold + b.detach() if b is not None else threshold
            else:
                fn_space, threshold = 2, float(fn_ratio) * c_pos + slack
    if key_ids is not None:
        row_ids = key_ids[:N] if positives is None else key_ids.index_select(0, positives)
    spec = LossSpec(kind="softmax", exact=exact, fn_space=fn_space)
    targets = Targets(positives=positives, fn_threshold=threshold, row_ids=row_ids,
                      col_ids=key_ids if row_ids is not None else None, guide_queries=gu,
                      guide_keys=gv)
    extra_sum = None
    if hard_negatives is None and not gamma and _sums_rows(queries, reduction):
        total, _ = engine_row_total(queries, keys, s, b, targets, spec, be)
        if eps:
            total = total + eps * _smoothing_term(queries, keys, positives, s).sum()
        return _reduce_total(total, N, reduction)
    if hard_negatives is None:
        rows, _, _ = engine_loss(queries, keys, s, b, targets, spec, be)
    else:
        st = engine_statistics(queries, keys, s, b, targets, spec, be)
        rows, extra_sum = _with_hard_negatives(st, queries, hard_negatives, s, b, threshold,
                                               fn_space)
    if eps:
        rows = rows + eps * _smoothing_term(queries, keys, positives, s, extra_sum,
                                            0 if hard_negatives is None else hard_negatives.shape[1])
    if gamma:
        rows = _focal(rows, gamma)
    return _reduce(rows, reduction)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
              logit_bias: Optional[Scalar] = None, reduction: str = "mean", backend: str = "auto",
              exact: bool = False, *, label_smoothing: float = 0.0, focal_gamma: float = 0.0) -> Tensor:
    """Symmetric CLIP loss ``1/2 [CE(S, diag) + CE(S^T, diag)]`` in one fused sweep.

    Args:
        image_features: (N, D); text_features: (N, D), same dtype and device.
        logit_scale: the already-exponentiated scale as in open_clip (float or one-element tensor;
            a tensor gets its gradient).
        logit_bias: optional float or one-element tensor added to every logit.
        reduction: "mean" (open_clip's value) | "sum" | "none". "none" returns a (2, N) tensor:
            row 0 the image->text loss of each image, row 1 the text->image loss of each text;
            "mean" and "sum" are that tensor's ``mean()`` and ``sum()``.
        label_smoothing, focal_gamma: as in :func:`info_nce`, applied in both directions.
        backend, exact: as in :func:`info_nce`.
    """
    _check_pair("image_features", image_features, "text_features", text_features)
    _check_reduction(reduction)
    eps, gamma = _shaping(label_smoothing, focal_gamma)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError("image_features and text_features must have the same batch size N, got "
                         f"{image_features.shape[0]} and {text_features.shape[0]}")
    dt = _stat_dtype(image_features)
    s = _scalar_param("logit_scale", logit_scale, image_features.device, optional=False, dtype=dt)
    b = _scalar_param("logit_bias", logit_bias, image_features.device, optional=True, dtype=dt)
    q, k, be = _prepare(image_features, text_features, backend)
    spec = LossSpec(kind="softmax", symmetric=True, exact=exact)
    rows, cols, _ = engine_loss(q, k, s, b, Targets(), spec, be)
    if eps:
        rows = rows + eps * _smoothing_term(q, k, None, s)
        cols = cols + eps * _smoothing_term(k, q, None, s)
    if gamma:
        rows, cols = _focal(rows, gamma), _focal(cols, gamma)
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
    dt = _stat_dtype(image_features)
    s = _scalar_param("logit_scale", logit_scale, image_features.device, optional=False, dtype=dt)
    b = _scalar_param("logit_bias", logit_bias, image_features.device, optional=True, dtype=dt)
    q, k, be = _prepare(image_features, text_features, backend)
    spec = LossSpec(kind="sigmoid", exact=exact)
    if _sums_rows(q, reduction, any_device=True):  # (the mean's 1/N in each row's gradient weight)
        return engine_row_total(q, k, s, b, targets, spec, be,
                                weight=1.0 / N if reduction == "mean" else 1.0)[0]
    rows, _, _ = engine_loss(q, k, s, b, targets, spec, be)
    return _reduce(rows, reduction)


def nt_xent(z1: Tensor, z2: Tensor, temperature: Scalar = 0.5, *, normalize: bool = True,
            reduction: str = "mean", backend: str = "auto", exact: bool = False) -> Tensor:
    """SimCLR NT-Xent over the 2N rows of ``Z = [z1; z2]``: self excluded, positive of a is a +- N.

    Args:
        z1, z2: (N, D) the two views' embeddings; temperature: float or one-element tensor.
        normalize: L2-normalise the rows first (cosine similarity, as SimCLR).
        reduction: "mean" | "sum" | "none" ((2N,) per-row losses, z1's rows first).
    """
    _check_reduction(reduction)
    Z, positives, be = _two_views(z1, z2, normalize, backend)
    s = _temperature_scale(temperature, Z)
    spec = LossSpec(kind="softmax", exclude_self=True, gram=True, exact=exact)
    if _sums_rows(Z, reduction):
        total, _ = engine_row_total(Z, Z, s, None, Targets(positives=positives), spec, be)
        return _reduce_total(total, Z.shape[0], reduction)
    rows, _, _ = engine_loss(Z, Z, s, None, Targets(positives=positives), spec, be)
    return _reduce(rows, reduction)


def _views_flat(name: str, x, labels, label_name: str):
    """(B, D) or (B, V, D) features + (B,) labels -> the V views (B, D), whose rows taken
    view-major are the loss's, + (V*B,) labels."""
    if not isinstance(x, Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"{name} must be a tensor of shape (B, D) or (B, V, D), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    labels = _check_labels(label_name, labels, x.shape[0], x.device)
    if x.dim() == 2:
        _check_features(name, x)
        return [x], labels
    V = x.shape[1]
    if V == 0:
        raise ValueError(f"{name} of shape (B, V, D) needs V >= 1 views, got {tuple(x.shape)}")
    views = list(torch.unbind(x, dim=1))
    _check_features(name, views[0])
    return views, labels.repeat(V)


def _softplus_gap(negatives: Tensor, targets: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """``log(1 + e^(negatives - targets))`` = LSE(negatives, targets) - targets from the two LSEs
    (N,) kept apart (0 where there are no negatives); rows outside ``valid`` (no targets) get a
    finite placeholder, so that a ``torch.where`` around the result passes no NaN gradient."""
    gap = negatives - targets
    if valid is not None:
        gap = torch.where(valid, gap, torch.zeros_like(gap))
    return torch.nn.functional.softplus(gap)


def supcon(features: Tensor, labels: Tensor, temperature: Scalar = 0.1, *, variant: str = "out",
           keys: Optional[Tensor] = None, key_labels: Optional[Tensor] = None,
           self_offset: Optional[int] = None, normalize: bool = True, reduction: str = "mean",
           backend: str = "auto", exact: bool = False, return_valid: bool = False):
    """Supervised contrastive loss (Khosla et al. 2020), fused.

    Args:
        features: (B, D), or (B, V, D) for V views of each sample (rows are taken view-major, as
            ``torch.cat(features.unbind(1))``); labels: (B,) integer class ids.
        variant: "out" (mean log-probability of the positives: the paper's L_out) or "in"
            (log of the mean probability: L_in = LSE_A - LSE_P + log |P|).
        keys, key_labels: the rectangular form: anchors (``features``) against a separate key set
            ((B_k, D) or (B_k, V_k, D)) with its own labels; no self-exclusion then, unless
            ``self_offset`` o is given: row i's own entry is key i + o (a memory bank that holds
            the batch), left out of its positives and its denominator.
        normalize: L2-normalise the rows first.
        reduction: "mean" over rows that have at least one positive | "sum" | "none" ((V*B,)).
        return_valid: also return the (V*B,) bool mask of rows that have a positive. Rows without
            a positive get loss 0 and no gradient; they never produce NaN.
    """
    if variant not in ("out", "in"):
        raise ValueError(f"variant must be 'out' or 'in', got {variant!r}")
    _check_reduction(reduction)
    row_views, rows_y = _views_flat("features", features, labels, "labels")
    n_rows = sum(v.shape[0] for v in row_views)
    if keys is None:
        if key_labels is not None:
            raise ValueError("key_labels needs keys")
        col_views, cols_y = row_views, rows_y
    else:
        if key_labels is None:
            raise ValueError("keys need key_labels")
        col_views, cols_y = _views_flat("keys", keys, key_labels, "key_labels")
        _check_pair("features", row_views[0], "keys", col_views[0])
    n_cols = sum(v.shape[0] for v in col_views)
    if self_offset is not None:
        if keys is None:
            raise ValueError("self_offset needs keys")
        if (isinstance(self_offset, bool) or not isinstance(self_offset, int) or self_offset < 0
                or self_offset + n_rows > n_cols):
            raise ValueError(f"self_offset must be an int with 0 <= self_offset <= "
                             f"{n_cols - n_rows} (keys minus rows), got {self_offset!r}")
    s = _temperature_scale(temperature, row_views[0])
    dt = _cast_dtype(row_views[0], col_views[0])
    rows_x = _stack_rows(row_views, normalize, dt)
    cols_x = rows_x if keys is None else _stack_rows(col_views, normalize, dt)
    be = _backend.resolve(backend, rows_x.device, rows_x.dtype)
    targets = Targets(row_labels=rows_y, col_labels=cols_y)
    spec = LossSpec(kind="softmax", exclude_self=keys is None or self_offset is not None,
                    offset=self_offset or 0, exclude_targets=variant == "in",
                    target_lse=variant == "in", gram=keys is None, exact=exact)
    if variant == "out" and _sums_rows(rows_x, reduction):
        total, npos = engine_row_total(rows_x, cols_x, s, None, targets, spec, be)
        valid = npos > 0
        loss = _reduce_total(total, valid.sum().clamp(min=1), reduction)
        return (loss, valid) if return_valid else loss
    if variant == "out":
        per, _, npos = engine_loss(rows_x, cols_x, s, None, targets, spec, be)
        valid = npos > 0
    else:
        # L_in = softplus(LSE_{A \ P} - LSE_P) + log |P|: the negatives' LSE and the positives'
        # from one sweep, so a row whose positives dominate has no difference of two ~|S| LSEs
        st = engine_statistics(rows_x, cols_x, s, None, targets, spec, be)
        valid = st.row_npos > 0
        per = torch.where(valid, _softplus_gap(st.row_lse, st.row_target, valid)
                          + torch.log(st.row_npos.clamp(min=1)), torch.zeros_like(st.row_lse))
    if reduction == "mean":
        loss = per.sum() / valid.sum().clamp(min=1)
    else:
        loss = _reduce(per, reduction)
    return (loss, valid) if return_valid else loss


def dcl(z1: Tensor, z2: Tensor, temperature: Scalar = 0.1, *, weight_sigma: Optional[float] = None,
        normalize: bool = True, reduction: str = "mean", backend: str = "auto",
        exact: bool = False) -> Tensor:
    """Decoupled contrastive loss (Yeh et al. 2022) over the 2N rows of ``[z1; z2]``: the positive
    is left out of the denominator, ``L_a = -w_a S_{a,p(a)} + LSE_{b not in {a, p(a)}} S_ab``.

    Args:
        z1, z2: (N, D) the two views; temperature: float or one-element tensor.
        weight_sigma: DCLW when set (the paper uses 0.5): ``w_a = 2 - N softmax_a(<z1_a, z2_a> / sigma)``
            over the batch (von Mises-Fisher weighting); else w = 1 (DCL).
        normalize: L2-normalise the rows first.
        reduction: "mean" | "sum" | "none" ((2N,) per-row losses, z1's rows first).
    """
    _check_reduction(reduction)
    if weight_sigma is not None:
        weight_sigma = _real("weight_sigma", weight_sigma, "a float or None", low=0.0)
    Z, _, be = _two_views(z1, z2, normalize, backend, min_batch=2)
    s = _temperature_scale(temperature, Z)
    weights = None
    if weight_sigma is not None:
        half = Z.shape[0] // 2
        w = _dclw_weights(_row_dots(Z[:half], Z[half:]), weight_sigma)
        weights = torch.cat([w, w])
    return _reduce(_dcl_rows(Z, s, weights, be, exact), reduction)


def _dclw_weights(cos: Tensor, sigma: float) -> Tensor:
    """DCLW's weights ``2 - N softmax(cos / sigma)`` (N,) from the N pairs' cosines (N,)."""
    return 2.0 - cos.shape[0] * torch.softmax(cos / sigma, dim=0)


def _dcl_rows(Z: Tensor, s: Tensor, weights: Optional[Tensor], be: str, exact: bool,
              sweep=None, offset: int = 0) -> Tensor:
    """Per-row DCL losses (2n,) of the two views' rows Z = [z1; z2] (2n, D) (row i's positive
    i +- n); ``weights`` (2n,) DCLW's or None. A row's negatives are the other rows of its view
    and the other view's rows but its pair, so its LSE is that of two sweeps which each leave
    out the band j = i only (:func:`_dcl_negatives`): with nothing but the band masked, their
    interior tiles take the kernels' lean path, where one sweep of [z1; z2] against itself that
    left the positives out too would mask every tile. The positive logit ``s <z1_i, z2_i>``
    comes from the pair's row product. ``sweep`` (:func:`engine_statistics`'s signature, given
    this rank's keys) takes the rows against every rank's rows of the same view, this rank's at
    ``offset``; by default the views' own."""
    n = Z.shape[0] // 2
    z1, z2 = Z[:n], Z[n:]
    lse, lo = _dcl_negatives(z1, z2, s, be, exact, sweep, offset)
    dt = lse.dtype
    pos = s.to(dt) * _row_dots(z1, z2).to(dt)
    pos = torch.cat([pos, pos])
    return (lse - (pos if weights is None else pos * weights)) + lo


def _dcl_negatives(z1: Tensor, z2: Tensor, s: Tensor, be: str, exact: bool, sweep=None,
                   offset: int = 0) -> Tuple[Tensor, Tensor]:
    """Each row's LSE over its DCL negatives for two views z1, z2 (n, D) (row i of z1 against
    z1's other rows and z2's rows but i; z2's rows likewise): :func:`_view_negatives` of the two
    views."""
    return _view_negatives([z1, z2], s, be, exact, sweep, offset)


def _view_negatives(views: Sequence[Tensor], s: Tensor, be: str, exact: bool, sweep=None,
                    offset: int = 0) -> Tuple[Tensor, Tensor]:
    """Each row's LSE over the rows of V views (n, D) each, as the kernels take them, but its
    own instance's (row i of view v against every view's rows but their row i), as
    ``(hi (V n,), lo (V n,))``, view-major: hi differentiable, lo its rounding error. Each view
    against itself and against every other view, each sweep leaving out its band j = i
    (+ ``offset``), so that every sweep's interior tiles take the kernels' lean path; a row's
    LSEs merge in float64 with their lo parts. By default one self-similarity sweep per view
    and one symmetric sweep per pair of views (its columns the second view's rows); with
    ``sweep`` (:func:`engine_statistics`'s signature, given this rank's keys: the rows against
    every rank's rows of a view, this rank's at ``offset``) V^2 one-way sweeps. ``s`` a 0-d
    tensor."""
    V = len(views)
    parts: List[List[Tuple[Tensor, Optional[Tensor]]]] = [[] for _ in range(V)]
    if sweep is None:
        own = LossSpec(kind="softmax", exclude_self=True, gram=True, exact=exact)
        pair = LossSpec(kind="softmax", symmetric=True, exclude_self=True, exact=exact)
        for v in range(V):
            st = engine_statistics(views[v], views[v], s, None, Targets(), own, be)
            parts[v].append((st.row_lse, st.row_lse_lo))
            for w in range(v + 1, V):
                st = engine_statistics(views[v], views[w], s, None, Targets(), pair, be)
                parts[v].append((st.row_lse, st.row_lse_lo))
                parts[w].append((st.col_lse, st.col_lse_lo))
    else:
        spec = LossSpec(kind="softmax", exclude_self=True, offset=offset, exact=exact)
        for v in range(V):
            for w in [v] + [u for u in range(V) if u != v]:
                st = sweep(views[v], views[w], s, None, Targets(), spec, be)
                parts[v].append((st.row_lse, st.row_lse_lo))
    out = []
    for lines in parts:
        hi, lo = lines[0]
        for hi2, lo2 in lines[1:]:
            hi, lo = merge_lse(hi, lo, hi2, lo2)
        out.append((hi, lo if lo is not None else torch.zeros_like(hi)))
    return torch.cat([p[0] for p in out]), torch.cat([p[1] for p in out]).detach()


def soft_info_nce(queries: Tensor, keys: Tensor, targets, *, scale: Scalar = 1.0 / 0.07,
                  bias: Optional[Scalar] = None, reduction: str = "mean", backend: str = "auto",
                  exact: bool = False) -> Tensor:
    """InfoNCE with soft targets: ``L_i = (sum_j T_ij) LSE_j S_ij - sum_j T_ij S_ij``.

    Args:
        queries: (N, D); keys: (M, D).
        targets: either a pair ``(indices, weights)`` of (N, K) tensors -- a sparse list of K
            targets per row (mixup / i-Mix / MixCo: ``[[i, perm[i]]]`` with ``[[lam, 1 - lam]]``) --
            or a dense (N, M) float tensor (a fallback for small M: it is an N x M input).
            Sparse targets are compared inside the kernels' tiles (K compares per entry), so the
            target term's gradient cancels against P before dS is rounded; dense targets have
            their term computed beside the kernels (O(N M D) as a product with the keys), and
            for 16-bit features at low temperatures the gradient of rows that fit their targets
            closely is then less accurate than a materialised loss's.
        scale, bias, reduction, backend, exact: as in :func:`info_nce`.
    """
    _check_pair("queries", queries, "keys", keys)
    _check_reduction(reduction)
    N, M = queries.shape[0], keys.shape[0]
    dt = _stat_dtype(queries)
    if isinstance(targets, (tuple, list)) and len(targets) == 2:
        idx, w = targets
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.shape[0] != N:
            raise ValueError(f"target indices must have shape (N={N}, K), got "
                             f"{tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__}")
        if not isinstance(w, Tensor) or w.shape != idx.shape or not w.is_floating_point():
            raise ValueError(f"target weights must be a float tensor of shape {tuple(idx.shape)}")
        idx = _check_index("target indices", idx.reshape(-1), idx.numel(), M, "key indices",
                           queries.device).reshape(idx.shape)
        if w.device != queries.device:
            raise ValueError(f"target weights are on {w.device} but queries are on {queries.device}")
        _check_nonnegative("target weights", w.detach())
        dense = None
    elif isinstance(targets, Tensor):
        if targets.shape != (N, M) or not targets.is_floating_point():
            raise ValueError(f"dense targets must be a float tensor of shape (N={N}, M={M}), got "
                             f"{tuple(targets.shape)} {targets.dtype}")
        if targets.device != queries.device:
            raise ValueError(f"dense targets are on {targets.device} but queries are on {queries.device}")
        _check_nonnegative("dense targets", targets.detach())
        dense, idx, w = targets, None, None
    else:
        raise TypeError("targets must be (indices, weights) of shape (N, K) or a dense (N, M) tensor")
    s = _scalar_param("scale", scale, queries.device, optional=False, dtype=dt)
    b = _scalar_param("bias", bias, queries.device, optional=True, dtype=dt)
    queries, keys, be = _prepare(queries, keys, backend)
    spec = LossSpec(kind="softmax", exact=exact)
    if dense is None and idx.shape[1] == 1:  # one target per row: w_i (LSE_i - S_{i,t(i)}), the
        # target's gradient formed in the tiles (where it cancels against P before rounding)
        st = engine_statistics(queries, keys, s, b, Targets(positives=idx[:, 0]), spec, be)
        return _reduce(w[:, 0].to(dt) * st.row_gap(), reduction)
    if dense is None:  # K weighted index targets per row, in the tiles:
        # L_i = mass_i (LSE_i - mean target logit_i), mass_i = sum_k w_ik
        wf = w.detach().to(torch.float32 if dt == torch.float32 else dt).contiguous()
        st = engine_statistics(
            queries, keys, s, b, Targets(positives=idx.contiguous(), target_weights=wf), spec, be)
        lse = st.row_lse
        rows = st.row_npos.to(dt) * st.row_gap()  # row_npos: the mass
        if w.requires_grad:  # dL_i / dw_ik = LSE_i - S_{i,p_ik}: a term of value 0
            logits = s.to(dt) * torch.einsum("nd,nkd->nk", queries.to(dt), keys.to(dt)[idx])
            if b is not None:
                logits = logits + b.to(dt)
            rows = rows + ((w.to(dt) - w.detach().to(dt)) * (lse[:, None] - logits).detach()).sum(1)
        return _reduce(rows, reduction)
    # the row LSE alone (the default diagonal target's statistic goes unused: no weight on it)
    st = engine_statistics(queries, keys, s, b, Targets(), spec, be)
    qf = queries.to(dt)
    wf = dense.to(dt)
    mass = wf.sum(1)
    weighted = s.to(dt) * _row_dots(qf, wf @ keys.to(dt))
    if b is not None:
        weighted = weighted + b.to(dt) * mass
    return _reduce(st.plus_lse_lo(mass * st.row_lse - weighted, mass), reduction)


def _teacher_pair(name_q: str, u: Tensor, name_k: str, v: Tensor, n: int, m: int, like: Tensor):
    _check_pair(name_q, u, name_k, v)
    if u.shape[0] != n or v.shape[0] != m:
        raise ValueError(f"{name_q} / {name_k} must have {n} / {m} rows (one per query / key), got "
                         f"{u.shape[0]} / {v.shape[0]}")
    if u.device != like.device:
        raise ValueError(f"{name_q} is on {u.device} but the features are on {like.device}")
    return u.detach().to(like.dtype), v.detach().to(like.dtype)


def tf32_products(q: Tensor, backend: str, exact: bool) -> bool:
    """Whether the products of float32 features ``q`` may be TF32 ones: not ``exact``, and the
    Triton backend or CUDA tensors (torch's own matmuls there may use TF32)."""
    return q.dtype == torch.float32 and not exact and (backend == "triton" or q.device.type == "cuda")


def tie_slack(u: Tensor, v: Tensor, tf32: bool = False) -> Tensor:
    """(N,) what a false-negative threshold on products ``<u_i, v_j>`` gains so that rounding
    cannot drop a key whose product ties with the positive's (an exact duplicate of it, which the
    rule keeps): the products in the tiles and the positive's, formed apart, differ by at most
    ``(D + 2) eps |u_i| |v_j|`` (the sums' rounding, eps of float32 or float64; Cauchy-Schwarz),
    or with TF32 products (``tf32``) by the inputs' rounding, ``2^-10 |u_i| |v_j|``."""
    dt = _stat_dtype(u)
    if tf32:
        rel = 2.0 ** -10
    else:
        rel = (u.shape[1] + 2) * (2.0 ** -53 if dt == torch.float64 else 2.0 ** -24)
    norm_v = v.to(dt).norm(dim=1).amax() if v.shape[0] else torch.zeros((), dtype=dt, device=v.device)
    return rel * u.to(dt).norm(dim=1) * norm_v


def _teacher_stats(q, k, s, u, v, ts, spec, be, weight: Optional[float] = None):
    """Engine statistics of queries vs keys with teacher softmax targets softmax_j(ts <u_i, v_j>),
    or with ``weight`` w the targets w softmax_j(ts <u_i, v_j>) + (1 - w) [j = i]."""
    t32 = ts.detach().reshape(1).to(_stat_dtype(q))
    t32 = torch.cat([t32, torch.full_like(t32, 1.0 if weight is None else weight)])  # (st, w)
    # weight: the diagonal (the default index target) mixed in, inside the tiles
    positives = _no_targets(q.shape[0], q.device) if weight is None else None
    targets = Targets(positives=positives, teacher_queries=u, teacher_keys=v, teacher_scale=t32)
    return engine_statistics(q, k, s, None, targets, spec, be)


def distill(queries: Tensor, keys: Tensor, teacher_queries: Tensor, teacher_keys: Tensor,
            scale: Scalar, teacher_scale: Scalar, *, directions: str = "both",
            objective: str = "kl", reduction: str = "mean", backend: str = "auto",
            exact: bool = False) -> Tensor:
    """Contrastive distillation (CLIP-KD, DistillClipLoss): ``KL(softmax(St_i) || softmax(S_i))``
    with teacher logits ``St_ij = teacher_scale <qt_i, kt_j>`` recomputed inside the tiles (two
    GEMMs per tile, no N x M matrix); the teacher gets no gradient.

    Args:
        queries (N, D), keys (M, D): the student's embeddings; teacher_queries (N, Dt),
            teacher_keys (M, Dt): the teacher's (any Dt).
        scale, teacher_scale: floats or one-element tensors (the student's scale gets a gradient).
        directions: "row" (queries -> keys), "col" (keys -> queries) or "both".
        objective: "kl", or "cross_entropy" ``-sum_j softmax(St_i)_j log softmax(S_i)_j`` (the KL
            plus the teacher's entropy, a constant: open_clip's ``DistillClipLoss.dist_loss``).
        reduction: "mean" | "sum" | "none" ((N,) per row, or (2, N) for "both", rows then columns).
    """
    _check_pair("queries", queries, "keys", keys)
    _check_reduction(reduction)
    if directions not in ("row", "col", "both"):
        raise ValueError(f"directions must be 'row', 'col' or 'both', got {directions!r}")
    if objective not in ("kl", "cross_entropy"):
        raise ValueError(f"objective must be 'kl' or 'cross_entropy', got {objective!r}")
    N, M = queries.shape[0], keys.shape[0]
    if directions == "both" and N != M:
        raise ValueError(f"directions='both' needs N == M, got N={N}, M={M}")
    u, v = _teacher_pair("teacher_queries", teacher_queries, "teacher_keys", teacher_keys, N, M, queries)
    dt = _stat_dtype(queries)
    s = _scalar_param("scale", scale, queries.device, optional=False, dtype=dt)
    ts = _scalar_param("teacher_scale", teacher_scale, queries.device, optional=False, dtype=dt)
    q, k, be = _prepare(queries, keys, backend)
    spec = LossSpec(kind="softmax", exact=exact)
    parts = []
    for a, b_, ua, vb in ((q, k, u, v), (k, q, v, u)):
        if (directions == "row" and a is k) or (directions == "col" and a is q):
            continue
        st = _teacher_stats(a, b_, s, ua.to(a.dtype), vb.to(a.dtype), ts, spec, be)
        # KL = (sum_j Tt St - LSEt) + (LSE - sum_j Tt S); the cross-entropy is the second term
        parts.append(st.row_gap() if objective == "cross_entropy" else st.aux[1] + st.row_gap())
    per = torch.stack(parts) if directions == "both" else parts[0]
    return _reduce(per, reduction)


def softclip(image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
             target_features: Tensor, target_scale: Scalar = 10.0, *, alpha: float = 0.5,
             reduction: str = "mean", backend: str = "auto", exact: bool = False) -> Tensor:
    """SoftCLIP-style soft labels: symmetric CLIP cross-entropy against
    ``(1 - alpha) I + alpha softmax_j(target_scale <u_i, u_j>)``, u = ``target_features`` (N, Du)
    (e.g. intra-modal or region features; no gradient), the soft part recomputed in-tile.

    Returns as :func:`clip_loss` ("none": (2, N)).
    """
    _check_pair("image_features", image_features, "text_features", text_features)
    _check_reduction(reduction)
    alpha = _check_unit("alpha", alpha, high_open=False)
    N = image_features.shape[0]
    if text_features.shape[0] != N:
        raise ValueError("image_features and text_features must have the same batch size N")
    u, _ = _teacher_pair("target_features", target_features, "target_features", target_features,
                         N, N, image_features)
    dt = _stat_dtype(image_features)
    s = _scalar_param("logit_scale", logit_scale, image_features.device, optional=False, dtype=dt)
    ts = _scalar_param("target_scale", target_scale, image_features.device, optional=False, dtype=dt)
    q, k, be = _prepare(image_features, text_features, backend)
    spec = LossSpec(kind="softmax", exact=exact)
    parts = []
    for a, b_ in ((q, k), (k, q)):  # the target logit sum_j T_ij S_ij, T mixed in the tiles
        st = _teacher_stats(a, b_, s, u.to(a.dtype), u.to(a.dtype), ts, spec, be, weight=alpha)
        parts.append(st.row_gap())
    return _reduce(torch.stack(parts), reduction)


def cwcl(queries: Tensor, keys: Tensor, target_queries: Tensor, target_keys: Optional[Tensor] = None,
         *, scale: Scalar = 1.0 / 0.07, reduction: str = "mean", backend: str = "auto",
         exact: bool = False) -> Tensor:
    """Continuously weighted contrastive loss (CWCL, Srinivasa et al. 2023), one direction:
    ``L_i = -sum_j T_ij log softmax_j(S_i)`` with ``T_ij = w_ij / sum_j w_ij``,
    ``w_ij = (1 + <u_i, v_j>) / 2`` from a frozen modality's L2-normalised embeddings u (N, Du),
    v (M, Du) (default v = u). The weighted sum is the affine identity
    ``sum_j w_ij S_ij = (s <q_i, sum k> + s q_i^T (K^T V) u_i + b terms) / 2``: O((N + M) D Du)
    beside the fused LSE sweep, no N x M matrix.
    """
    _check_pair("queries", queries, "keys", keys)
    _check_reduction(reduction)
    N, M = queries.shape[0], keys.shape[0]
    if target_keys is None:
        if M != N:
            raise ValueError("target_keys is required when keys and queries differ in number")
        target_keys = target_queries
    u, v = _teacher_pair("target_queries", target_queries, "target_keys", target_keys, N, M, queries)
    u = torch.nn.functional.normalize(u.double() if u.dtype == torch.float64 else u.float(), dim=1)
    v = torch.nn.functional.normalize(v.double() if v.dtype == torch.float64 else v.float(), dim=1)
    dt = _stat_dtype(queries)
    s = _scalar_param("scale", scale, queries.device, optional=False, dtype=dt)
    q, k, be = _prepare(queries, keys, backend)
    # the row LSE alone (the default diagonal target's statistic goes unused: no weight on it)
    st = engine_statistics(q, k, s, None, Targets(), LossSpec(kind="softmax", exact=exact), be)
    u, v = u.to(dt), v.to(dt)
    mass = (M + u @ v.sum(0)) / 2  # W_i = sum_j w_ij
    # K^T V and sum_j k_j from a float32 copy of the keys that autograd does not keep (only V for
    # K's gradient); the queries' terms one float32 row chunk at a time (row_dots, row_bilinear)
    kf = k.to(dt)
    kv, ksum = kf.transpose(0, 1) @ v, kf.sum(0)
    del kf
    weighted = (s.to(dt) / 2) * (_row_dots(q, ksum) + row_bilinear(q, kv, u))
    return _reduce(st.plus_lse_lo(st.row_lse - weighted / mass), reduction)


def hcl(z1: Tensor, z2: Tensor, temperature: float = 0.5, *, beta: float = 1.0, tau_plus: float = 0.1,
        normalize: bool = True, reduction: str = "mean", backend: str = "auto",
        exact: bool = False) -> Tensor:
    """Hard-negative contrastive loss (Robinson et al. 2021) with debiasing (Chuang et al. 2020)
    over the 2N rows of ``[z1; z2]`` (positive a +- N, negatives the other 2N - 2 rows):

        R_i = |N| sum_neg e^{(1+beta) S} / sum_neg e^{beta S}
        Ng_i = max((R_i - |N| tau_plus e^{S_pos}) / (1 - tau_plus), |N| e^{-1/t})
        L_i = -S_pos + log(e^{S_pos} + Ng_i)

    Both negatives-only LSEs (of (1+beta) S / t and beta S / t) come from one fused sweep; the rest
    is evaluated in log space, so small temperatures do not overflow.
    """
    _check_reduction(reduction)
    temperature, beta, tau_plus = _hcl_params(temperature, beta, tau_plus)
    Z, positives, be = _two_views(z1, z2, normalize, backend, min_batch=2)
    per = _hcl_rows(Z, positives, temperature, beta, tau_plus, Z.shape[0] - 2, be, exact)
    return _reduce(per, reduction)


def _hcl_params(temperature, beta, tau_plus) -> Tuple[float, float, float]:
    """:func:`hcl`'s (temperature, beta, tau_plus), validated."""
    return (_real("temperature", temperature, "a float (hcl takes no tensor temperature)", low=0.0),
            _real("beta", beta, low=0.0, low_open=False), _check_unit("tau_plus", tau_plus))


def _hcl_rows(Z: Tensor, positives: Tensor, temperature: float, beta: float, tau_plus: float,
              n_neg: int, be: str, exact: bool, sweep=None, offset: int = 0) -> Tensor:
    """Per-row HCL losses (R,) of the rows Z (R, D); ``positives`` (R,) index Z; ``n_neg`` each
    row's number of negatives. ``sweep`` (:func:`engine_statistics`'s signature, given this
    rank's keys) takes the rows against every rank's rows, Z's at ``offset`` (left out; the
    targets' indices and labels are global); by default :func:`engine_statistics` against Z
    itself."""
    dt = _stat_dtype(Z)
    inv_t = 1.0 / float(temperature)
    s_hi = torch.full((), (1.0 + beta) * inv_t, dtype=dt, device=Z.device)
    # one sweep: LSE over negatives of (1 + beta) S / t, and of beta S / t = ratio * the former
    spec = LossSpec(kind="softmax", exclude_self=True, exclude_targets=True, gram=sweep is None,
                    offset=offset, exact=exact, lse2_ratio=beta / (1.0 + beta) if beta > 0 else None)
    st = (sweep or engine_statistics)(Z, Z, s_hi, None, Targets(positives=positives + offset),
                                      spec, be)
    lse_1b, pos_hi, lse_b = st.row_lse, st.row_target, st.lse2
    if not beta > 0:  # e^{0 S}: the plain count of negatives
        lse_b = torch.full_like(lse_1b, math.log(n_neg))
    s_pos = pos_hi / (1.0 + beta)  # the positive logit S_pos = <z_a, z_p> / t
    log_r = math.log(n_neg) + st.plus_lse_lo(lse_1b - lse_b)  # (the second LSE keeps no lo)
    log_c = math.log(n_neg * tau_plus) + s_pos if tau_plus > 0 else torch.full_like(s_pos, -math.inf)
    gap = (log_c - log_r).clamp(max=0.0)
    log_a = torch.where(log_c < log_r, log_r + torch.log1p(-torch.exp(gap).clamp(max=1 - 1e-12)),
                        torch.full_like(log_r, -math.inf)) - math.log(1.0 - tau_plus)
    log_ng = torch.maximum(log_a, torch.full_like(log_a, math.log(n_neg) - inv_t))
    # log(e^S_pos + Ng) - S_pos as softplus(log Ng - S_pos): without the rounding of a sum ~S_pos
    return nn.functional.softplus(log_ng - s_pos)


def mv_infonce(features: Tensor, temperature: Scalar = 0.1, *, normalize: bool = True,
               reduction: str = "mean", backend: str = "auto", exact: bool = False) -> Tensor:
    """MV-InfoNCE for V >= 2 views of B instances (features (B, V, D)), fused over the V*B rows:

        L_i = log sum_v sum_{c != (v,i)} e^{S_(v,i),c} - log 2 - log sum_{v<w} e^{S_(v,i),(w,i)}

    V = 2: one sweep, the pair's logit each row's index target (the other view), a linear term
    the lean path handles, its gradient formed in the tiles with the rest. V > 2: row (v, i)
    has its targets in the other views of i; by symmetry ``sum_{v<w} e^{S_(v,i),(w,i)} =
    1/2 sum_v sum_{w != v} e^{S_(v,i),(w,i)}``, so
    ``L_i = softplus(LSE_v(negatives' LSE_(v,i)) - LSE_v(target LSE_(v,i)))`` with the
    negatives' and the targets' LSEs kept apart: the negatives' from the views' sweeps against
    themselves and each other, each leaving out its band j = i only (lean tiles, as
    :func:`dcl`'s), the targets' from the views' row products. "none" gives (B,).
    """
    B, V = _check_multi_view(features)
    _check_reduction(reduction)
    views = torch.unbind(features, dim=1)
    s = _temperature_scale(temperature, features)
    Z = _stack_rows(views, normalize, _cast_dtype(features))
    be = _backend.resolve(backend, Z.device, Z.dtype)
    return _reduce(_mv_infonce_rows(Z, B, V, s, be, exact), reduction)


def _mv_infonce_rows(Z: Tensor, B: int, V: int, s: Tensor, be: str, exact: bool,
                     sweep=None, offset: int = 0, key_ids: Optional[Tensor] = None,
                     view_offset: Optional[int] = None) -> Tensor:
    """Per-instance MV-InfoNCE losses (B,) of the rows Z (V*B, D), view-major; ``sweep`` and
    ``offset`` as :func:`_hcl_rows`. V > 2: ``key_ids`` every key's instance id (default: Z's,
    ``arange(B).repeat(V)``); Z's instances are ``offset // V + arange(B)``, so each rank's
    block holds its instances' V views view-major. ``view_offset`` (V > 2, with ``sweep``):
    each view's rows against every rank's rows of each view instead (:func:`_view_negatives`),
    Z's rows of a view at ``view_offset`` among that view's; else one sweep of Z against
    every rank's rows with the instances as labels."""
    gram = sweep is None
    stats = sweep or engine_statistics
    if V == 2:  # the pair's logit S_(0,i),(1,i), each row's target (its half of the gradient)
        # row (v, i): the LSE over c != (v, i)
        spec = LossSpec(kind="softmax", exclude_self=True, gram=gram, offset=offset, exact=exact)
        pair = torch.arange(2 * B, device=Z.device).add_(B).remainder_(2 * B).add_(offset)
        st = stats(Z, Z, s, None, Targets(positives=pair), spec, be)
        # L_i = log((e^{g_(0,i)} + e^{g_(1,i)}) / 2) for the rows' gaps g = LSE - S_pair with
        # the LSEs' lo parts, as hi + log1p(expm1(lo - hi) / 2): a near-duplicate pair's loss is
        # far below one ulp of |LSE| and of log 2 (maximum / minimum split a tie's gradient)
        g0, g1 = st.row_gap().view(V, B)
        hi, lo = torch.maximum(g0, g1), torch.minimum(g0, g1)
        return hi + torch.log1p(torch.expm1(lo - hi) / 2)
    # row (v, i): the LSE over the negatives (c not an (w, i)) and over the targets (w, i),
    # w != v; L_i = softplus(LSE_v(negatives) - LSE_v(targets)), as in supcon's L_in
    if (gram and B > 1 and be == "triton") or view_offset is not None:
        # the negatives from the views' sweeps against themselves and each other, each leaving
        # out its band j = i only (lean tiles); the targets, V - 1 per row, from the views'
        # row products: O(B V^2 D). (The Triton kernels' lean path; the torch engine takes the
        # one sweep, a graph torch.compile builds V (V + 1) / 2 times faster.)
        views = list(Z.view(V, B, -1))
        neg_hi, neg_lo = _view_negatives(views, s, be, exact, sweep, view_offset or 0)
        dt = neg_hi.dtype
        negatives = (neg_hi.double() + neg_lo.double()).view(V, B)
        pairs = {(v, w): s.to(dt) * _row_dots(views[v], views[w]).to(dt)
                 for v in range(V) for w in range(v + 1, V)}
        # each instance's logits of its ordered pairs of views (B, V (V - 1)): both orders
        S = torch.stack([pairs[min(v, w), max(v, w)]
                         for v in range(V) for w in range(V) if v != w], 1)
        return _softplus_gap(torch.logsumexp(negatives, dim=0),
                             torch.logsumexp(S.double(), dim=1)).to(dt)
    spec = LossSpec(kind="softmax", exclude_self=True, exclude_targets=True, target_lse=True,
                    gram=gram, offset=offset, exact=exact)
    ids = torch.arange(B, device=Z.device).add_(offset // V).repeat(V)
    st = stats(Z, Z, s, None, Targets(row_labels=ids, col_labels=ids if key_ids is None else key_ids),
               spec, be)
    # (B = 1 has no negatives: their LSEs are -inf, floored so that logsumexp's gradient is 0)
    negatives = st.row_lse.clamp(min=-1e30).view(V, B)
    return _softplus_gap(torch.logsumexp(negatives, dim=0),
                         torch.logsumexp(st.row_target.view(V, B), dim=0))


def _check_multi_view(features, min_instances: int = 1) -> Tuple[int, int]:
    """(B, V) of multi-view features (B, V, D) with V >= 2 views and B >= ``min_instances``."""
    if not isinstance(features, Tensor) or features.dim() != 3 or features.shape[1] < 2:
        raise ValueError("features must have shape (B, V, D) with V >= 2 views, got "
                         f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
    B, V, _ = features.shape
    _check_features("features", features[:, 0])
    if B < min_instances:
        raise ValueError(f"this loss needs at least {min_instances} instances (B): with fewer "
                         f"there are no negatives, got features of shape {tuple(features.shape)}")
    return B, V


def mv_dhel(features: Tensor, temperature: Scalar = 0.1, *, normalize: bool = True,
            reduction: str = "mean", backend: str = "auto", exact: bool = False) -> Tensor:
    """MV-DHEL (multi-view decoupled hyperspherical energy loss) for V >= 2 views of B >= 2
    instances, features (B, V, D):

        L_i = sum_v log sum_{j != i} e^{S_(v,i),(v,j)} - log sum_{v<w} e^{S_(v,i),(w,i)}

    with S = <z, z'> / temperature. Uniformity within each view (one fused self-similarity
    sweep of B rows per view: V B^2 D products, a V-th of MV-InfoNCE's), alignment over the
    V (V - 1) / 2 pairs of each instance's views (O(V^2 B D)). "none" gives (B,).
    """
    _check_reduction(reduction)
    B, V = _check_multi_view(features, min_instances=2)
    s = _temperature_scale(temperature, features)
    dt = _cast_dtype(features)
    views = [_stack_rows([v], normalize, dt) for v in torch.unbind(features, dim=1)]
    be = _backend.resolve(backend, views[0].device, views[0].dtype)
    return _reduce(_mv_dhel_rows(views, s, be, exact), reduction)


def _mv_dhel_rows(views, s: Tensor, be: str, exact: bool, sweep=None, offset: int = 0) -> Tensor:
    """Per-instance MV-DHEL losses (B,) of the V views' rows (each (B, D), as the kernels take
    them). ``sweep`` and ``offset`` as :func:`_hcl_rows`: each view's rows against every rank's
    rows of that view; by default against their own."""
    spec = LossSpec(kind="softmax", exclude_self=True, gram=sweep is None, offset=offset,
                    exact=exact)
    energy = None
    for z in views:  # the LSE over j != i within the view (no targets: the diagonal is left out)
        st = (sweep or engine_statistics)(z, z, s, None, Targets(), spec, be)
        lse = st.plus_lse_lo(st.row_lse)
        energy = lse if energy is None else energy + lse
    dt = energy.dtype
    pairs = torch.stack([_row_dots(views[v], views[w]) for v in range(len(views))
                         for w in range(v + 1, len(views))])
    return energy - torch.logsumexp(s.to(dt) * pairs.to(dt), dim=0)


def uniformity_loss(x: Tensor, t: float = 2.0, *, normalize: bool = True, backend: str = "auto",
                    exact: bool = False) -> Tensor:
    """Uniformity (Wang & Isola 2020): ``log mean_{i != j} exp(-t ||x_i - x_j||^2)`` over the
    rows of x (N, D), N >= 2, L2-normalised first unless ``normalize=False``: for unit rows a
    global LSE of ``2t <x_i, x_j>`` (one symmetric sweep); for rows as given, of
    ``2t <x_i, x_j> - t |x_i|^2 - t |x_j|^2``, the column term carried by an extra feature
    (keys ``[x_j, -|x_j|^2 / 2]`` against queries ``[x_i, 1]``)."""
    _check_features("x", x)
    if x.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got {x.shape[0]}")
    t = _real("t", t, "a float (uniformity takes no tensor t)", low=0.0)
    x = _stack_rows([x], normalize, _cast_dtype(x))
    be = _backend.resolve(backend, x.device, x.dtype)
    n = x.shape[0]
    return torch.logsumexp(_uniformity_terms(x, t, normalize, be, exact), 0) - math.log(n * (n - 1))


def _uniformity_terms(x: Tensor, t: float, normalize: bool, be: str, exact: bool,
                      sweep=None, offset: int = 0) -> Tensor:
    """Each row's term (n,) of uniformity = logsumexp(terms) - log(N (N - 1)): the row's LSE over
    j != i of ``2t <x_i, x_j> - t |x_i|^2 - t |x_j|^2`` (x (n, D) as the kernels take it: unit
    rows when ``normalize``). ``sweep`` and ``offset`` as :func:`_hcl_rows`: the rows against
    every rank's rows; by default against x's own."""
    dt = _stat_dtype(x)
    s = _scalar_param("t", 2.0 * t, x.device, optional=False, dtype=dt)
    n = x.shape[0]
    stats = sweep or engine_statistics
    # the row LSE over j != i (the default target, the diagonal, is excluded with it)
    spec = LossSpec(kind="softmax", exclude_self=True, gram=normalize and sweep is None,
                    offset=offset, exact=exact)
    if normalize:
        return stats(x, x, s, None, Targets(), spec, be).row_lse - 2.0 * t
    sq = x.to(dt).pow(2).sum(1)  # |x_i|^2, float32
    queries = torch.cat([x, x.new_ones(n, 1)], 1)
    keys = torch.cat([x, (-0.5 * sq).to(x.dtype).unsqueeze(1)], 1)
    return stats(queries, keys, s, None, Targets(), spec, be).row_lse - t * sq


def alignment_loss(x: Tensor, y: Tensor, alpha: float = 2.0, *, normalize: bool = True) -> Tensor:
    """Alignment (Wang & Isola 2020): ``mean_i ||x_i - y_i||^alpha`` of paired rows (N, D)."""
    _check_pair("x", x, "y", y)
    alpha = _real("alpha", alpha, low=0.0)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    if normalize:
        x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    return (x - y).norm(dim=1).pow(alpha).mean()


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------


class _ScaledLoss(nn.Module):
    """A loss of queries against keys with a scale and an optional bias."""

    def __init__(self, scale: Scalar = 1.0 / 0.07, bias: Optional[Scalar] = None,
                 reduction: str = "mean", backend: str = "auto", exact: bool = False):
        super().__init__()
        _check_module_args(reduction, backend, scale=scale, bias=bias)
        self.scale, self.bias = scale, bias
        self.reduction, self.backend, self.exact = reduction, backend, exact


class InfoNCELoss(_ScaledLoss):
    """Module form of :func:`info_nce`: ``forward(queries (N, D), keys (M, D), positives=None)``."""

    def forward(self, queries: Tensor, keys: Tensor, positives: Optional[Tensor] = None) -> Tensor:
        return info_nce(queries, keys, positives=positives, scale=self.scale, bias=self.bias,
                        reduction=self.reduction, backend=self.backend, exact=self.exact)


class ClipLoss(nn.Module):
    """Drop-in for open_clip's ``ClipLoss`` (single process):
    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``."""

    def __init__(self, reduction: str = "mean", backend: str = "auto", exact: bool = False):
        super().__init__()
        _check_module_args(reduction, backend)
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
        _check_module_args(reduction, backend)
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
        _check_module_args(reduction, backend, temperature=temperature)
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
        if variant not in ("out", "in"):
            raise ValueError(f"variant must be 'out' or 'in', got {variant!r}")
        _check_module_args(reduction, backend, temperature=temperature)
        self.temperature, self.variant, self.normalize = temperature, variant, normalize
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return supcon(features, labels, self.temperature, variant=self.variant,
                      normalize=self.normalize, reduction=self.reduction, backend=self.backend,
                      exact=self.exact)


class DCLLoss(nn.Module):
    """Module form of :func:`dcl` (DCLW with ``weight_sigma``): ``forward(z1 (N, D), z2 (N, D))``."""

    def __init__(self, temperature: Scalar = 0.1, weight_sigma: Optional[float] = None,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 exact: bool = False):
        super().__init__()
        _check_module_args(reduction, backend, temperature=temperature, weight_sigma=weight_sigma)
        self.temperature, self.weight_sigma, self.normalize = temperature, weight_sigma, normalize
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return dcl(z1, z2, self.temperature, weight_sigma=self.weight_sigma, normalize=self.normalize,
                   reduction=self.reduction, backend=self.backend, exact=self.exact)


class SoftInfoNCELoss(_ScaledLoss):
    """Module form of :func:`soft_info_nce`: ``forward(queries (N, D), keys (M, D), targets)``,
    targets ``(indices, weights)`` (N, K) each or a dense (N, M) tensor."""

    def forward(self, queries: Tensor, keys: Tensor, targets) -> Tensor:
        return soft_info_nce(queries, keys, targets, scale=self.scale, bias=self.bias,
                             reduction=self.reduction, backend=self.backend, exact=self.exact)


class DistillLoss(nn.Module):
    """Module form of :func:`distill`: ``forward(queries (N, D), keys (M, D), teacher_queries
    (N, Dt), teacher_keys (M, Dt), scale, teacher_scale)`` (the scales per call, as a CLIP
    student's and teacher's learnt logit scales are)."""

    def __init__(self, directions: str = "both", objective: str = "kl", reduction: str = "mean",
                 backend: str = "auto", exact: bool = False):
        super().__init__()
        _check_module_args(reduction, backend)
        if directions not in ("row", "col", "both"):
            raise ValueError(f"directions must be 'row', 'col' or 'both', got {directions!r}")
        if objective not in ("kl", "cross_entropy"):
            raise ValueError(f"objective must be 'kl' or 'cross_entropy', got {objective!r}")
        self.directions, self.objective = directions, objective
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, queries: Tensor, keys: Tensor, teacher_queries: Tensor, teacher_keys: Tensor,
                scale: Scalar, teacher_scale: Scalar) -> Tensor:
        return distill(queries, keys, teacher_queries, teacher_keys, scale, teacher_scale,
                       directions=self.directions, objective=self.objective,
                       reduction=self.reduction, backend=self.backend, exact=self.exact)


class SoftClipLoss(nn.Module):
    """Module form of :func:`softclip`:
    ``forward(image_features (N, D), text_features (N, D), logit_scale, target_features (N, Du))``."""

    def __init__(self, target_scale: Scalar = 10.0, alpha: float = 0.5, reduction: str = "mean",
                 backend: str = "auto", exact: bool = False):
        super().__init__()
        _check_module_args(reduction, backend, target_scale=target_scale)
        _check_unit("alpha", alpha, high_open=False)
        self.target_scale, self.alpha = target_scale, alpha
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
                target_features: Tensor) -> Tensor:
        return softclip(image_features, text_features, logit_scale, target_features,
                        self.target_scale, alpha=self.alpha, reduction=self.reduction,
                        backend=self.backend, exact=self.exact)


class CWCLLoss(nn.Module):
    """Module form of :func:`cwcl`:
    ``forward(queries (N, D), keys (M, D), target_queries (N, Du), target_keys=None)``."""

    def __init__(self, scale: Scalar = 1.0 / 0.07, reduction: str = "mean", backend: str = "auto",
                 exact: bool = False):
        super().__init__()
        _check_module_args(reduction, backend, scale=scale)
        self.scale = scale
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, queries: Tensor, keys: Tensor, target_queries: Tensor,
                target_keys: Optional[Tensor] = None) -> Tensor:
        return cwcl(queries, keys, target_queries, target_keys, scale=self.scale,
                    reduction=self.reduction, backend=self.backend, exact=self.exact)


class HCLLoss(nn.Module):
    """Module form of :func:`hcl`: ``forward(z1 (N, D), z2 (N, D))``."""

    def __init__(self, temperature: float = 0.5, beta: float = 1.0, tau_plus: float = 0.1,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 exact: bool = False):
        super().__init__()
        _check_module_args(reduction, backend)
        self.temperature, self.beta, self.tau_plus = _hcl_params(temperature, beta, tau_plus)
        self.normalize = normalize
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return hcl(z1, z2, self.temperature, beta=self.beta, tau_plus=self.tau_plus,
                   normalize=self.normalize, reduction=self.reduction, backend=self.backend,
                   exact=self.exact)


class _MultiViewLoss(nn.Module):
    """A multi-view loss of features (B, V, D) with a temperature."""

    _loss = None

    def __init__(self, temperature: Scalar = 0.1, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", exact: bool = False):
        super().__init__()
        _check_module_args(reduction, backend, temperature=temperature)
        self.temperature, self.normalize = temperature, normalize
        self.reduction, self.backend, self.exact = reduction, backend, exact

    def forward(self, features: Tensor) -> Tensor:
        return type(self)._loss(features, self.temperature, normalize=self.normalize,
                                reduction=self.reduction, backend=self.backend, exact=self.exact)


class MVInfoNCELoss(_MultiViewLoss):
    """Module form of :func:`mv_infonce`: ``forward(features (B, V, D))``."""

    _loss = staticmethod(mv_infonce)


class MVDHELLoss(_MultiViewLoss):
    """Module form of :func:`mv_dhel`: ``forward(features (B, V, D))``."""

    _loss = staticmethod(mv_dhel)


class UniformityLoss(nn.Module):
    """Module form of :func:`uniformity_loss`: ``forward(x (N, D))``."""

    def __init__(self, t: float = 2.0, normalize: bool = True, backend: str = "auto",
                 exact: bool = False):
        super().__init__()
        _check_module_args("mean", backend)
        self.t = _real("t", t, "a float (uniformity takes no tensor t)", low=0.0)
        self.normalize, self.backend, self.exact = normalize, backend, exact

    def forward(self, x: Tensor) -> Tensor:
        return uniformity_loss(x, self.t, normalize=self.normalize, backend=self.backend,
                               exact=self.exact)


class AlignmentLoss(nn.Module):
    """Module form of :func:`alignment_loss`: ``forward(x (N, D), y (N, D))``."""

    def __init__(self, alpha: float = 2.0, normalize: bool = True):
        super().__init__()
        self.alpha = _real("alpha", alpha, low=0.0)
        self.normalize = normalize

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return alignment_loss(x, y, self.alpha, normalize=self.normalize)
