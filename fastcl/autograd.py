"""The autograd Functions over the engine: forward saves O(N + M) statistics, backward calls the
backend's fused gradient sweep. Every backend (triton, torch, cuda, cpu) goes through here.

* :class:`EngineLoss` returns per-row (and per-column) losses ``lse - target``: the closures every
  backend implements.
* :class:`EngineRowTotal` returns their (weighted) sum for a row-only closure, and where the
  engine takes a step for it (the CPU's C++ backend; Triton's sigmoid closure) computes its
  gradients in the forward, from one sweep.
* :class:`EngineStatistics` returns the statistics themselves (row LSE, target statistic, column
  LSE and target logit) as differentiable outputs, so a loss can be any function of them (plus
  O((N + M) D) terms) and autograd supplies separate weights for each; this needs a backend with
  ``SPLIT_TARGET_GRADS``.
* :class:`RowDots` gives those O((N + M) D) terms, ``<a_i, b_i>`` in float32, without float32
  copies of the features; :class:`RowBilinear` gives ``a_i^T W u_i`` the same way.
* :class:`UnitRows` stacks and L2-normalises the views of the self-similarity losses, keeping
  only its output for the backward.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from . import _backend
from .ops import EngineStats, LossSpec, Targets, col_losses, compiling, row_losses, row_target_logit

Tensor = torch.Tensor


_TWICE = ("fastcl's fused losses are differentiable once: their backward is not itself differentiable, "
          "so a second derivative (double backward after create_graph=True) is not supported")


def first_order_only(backward):
    """Decorates an autograd Function's backward that is not itself differentiable. It runs
    without grad; under ``create_graph=True`` its gradients get a node that raises if they are
    differentiated again. (torch's ``once_differentiable`` adds that node only when a grad_output
    requires grad, so a loss reduced with a constant weight would get a second derivative that
    silently treats the saved statistics as constants.)"""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        delayed = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)
        if delayed is None:  # no lazy error node in this torch: refuse now
            raise RuntimeError(_TWICE)
        outs = out if isinstance(out, tuple) else (out,)
        marked = []
        for g in outs:
            if isinstance(g, torch.Tensor):
                g = g.detach().requires_grad_(g.is_floating_point())
            marked.append(g)
        # the saved inputs that require grad feed the node too, so that differentiating the
        # gradients with respect to them reaches it (and raises) rather than finding no path
        inputs = [t for t in ctx.saved_tensors if isinstance(t, torch.Tensor) and t.requires_grad]
        res = delayed(_TWICE.encode(), len(marked) + len(inputs))(*marked, *inputs)
        res = res if isinstance(res, tuple) else (res,)
        return res[:len(outs)] if isinstance(out, tuple) else res[0]
    return wrapper


_DOT_CHUNK_BYTES = 16 << 20  # float32 bytes of one operand's row chunk in RowDots


def _dot_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_chunks(a: Tensor):
    """Row ranges of ``a`` (R, D) whose float32 copies take at most _DOT_CHUNK_BYTES (one range
    under torch.compile, whose fused kernels form no float32 copies: symbolic sizes stay so)."""
    R, D = a.shape
    if compiling():
        return [(0, R)]
    step = max(1, _DOT_CHUNK_BYTES // (4 * max(D, 1)))
    return [(r0, min(R, r0 + step)) for r0 in range(0, R, step)]


class RowDots(torch.autograd.Function):
    """``<a_i, b_i>`` (R,) in float32 (float64 for float64 inputs) for a (R, D) and b (R, D), or
    ``<a_i, b>`` for b (D,). Forward and backward upcast one row chunk at a time (at most 16 MiB
    of float32 per operand), where ``(a.float() * b.float()).sum(-1)`` would keep float32 copies
    of both operands for its backward: 4x a 16-bit operand's bytes."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        dt = _dot_dtype(a)
        ctx.save_for_backward(a, b)
        out = torch.empty(a.shape[0], dtype=dt, device=a.device)
        bv = b.to(dt) if b.dim() == 1 else None
        for r0, r1 in _row_chunks(a):
            other = bv if bv is not None else b[r0:r1].to(dt)
            out[r0:r1] = torch.linalg.vecdot(a[r0:r1].to(dt), other)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, g: Tensor):
        a, b = ctx.saved_tensors
        dt = _dot_dtype(a)
        g = g.to(dt)
        vector = b.dim() == 1
        bv = b.to(dt) if vector else None
        ga = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        gb = None
        if ctx.needs_input_grad[1]:
            gb = torch.zeros(b.shape, dtype=dt, device=b.device) if vector else torch.empty_like(b)
        for r0, r1 in _row_chunks(a):
            gi = g[r0:r1, None]
            if ga is not None:
                ga[r0:r1] = gi * (bv if vector else b[r0:r1].to(dt))
            if gb is not None:
                ai = a[r0:r1].to(dt)
                if vector:
                    gb += ai.t().mv(g[r0:r1])
                else:
                    gb[r0:r1] = gi * ai
        if vector and gb is not None:
            gb = gb.to(b.dtype)
        return ga, gb


def row_dots(a: Tensor, b: Tensor) -> Tensor:
    """:class:`RowDots`: ``<a_i, b_i>`` (or ``<a_i, b>`` for a vector b) in float32."""
    return RowDots.apply(a, b)


class RowBilinear(torch.autograd.Function):
    """``a_i^T W u_i`` (R,) for a (R, D), W (D, E) and u (R, E), in float32 (float64 for float64
    a): a's rows are upcast one chunk at a time, forward and backward, where
    ``((a.float() @ W) * u).sum(-1)`` would keep a float32 copy of a for W's gradient."""

    @staticmethod
    def forward(ctx, a: Tensor, w: Tensor, u: Tensor) -> Tensor:
        dt = _dot_dtype(a)
        ctx.save_for_backward(a, w, u)
        out = torch.empty(a.shape[0], dtype=dt, device=a.device)
        wd = w.to(dt)
        for r0, r1 in _row_chunks(a):
            out[r0:r1] = torch.linalg.vecdot(a[r0:r1].to(dt) @ wd, u[r0:r1].to(dt))
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, g: Tensor):
        a, w, u = ctx.saved_tensors
        dt = _dot_dtype(a)
        wd, g = w.to(dt), g.to(dt)
        ga = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w.shape, dtype=dt, device=w.device) if ctx.needs_input_grad[1] else None
        gu = torch.empty_like(u) if ctx.needs_input_grad[2] else None
        for r0, r1 in _row_chunks(a):
            gi = g[r0:r1, None]
            if ga is not None or gw is not None:
                gui = gi * u[r0:r1].to(dt)  # g_i u_i
                if ga is not None:
                    ga[r0:r1] = gui @ wd.t()
                if gw is not None:
                    gw += a[r0:r1].to(dt).t() @ gui
            if gu is not None:
                gu[r0:r1] = gi * (a[r0:r1].to(dt) @ wd)
        return ga, (gw.to(w.dtype) if gw is not None else None), gu


def row_bilinear(a: Tensor, w: Tensor, u: Tensor) -> Tensor:
    """:class:`RowBilinear`: ``a_i^T W u_i`` in float32, without a float32 copy of a."""
    return RowBilinear.apply(a, w, u)


class UnitRows(torch.autograd.Function):
    """The rows of x_1 (R_1, D), ..., x_k (R_k, D) stacked and L2-normalised into one (sum R, D)
    tensor of ``dtype``: ``y_r = x_r / max(|x_r|, eps)``, F.normalize's values (its eps, 1e-12),
    with the norms in float32 (float64 for float64 inputs) and one rounding to ``dtype``.

    Saves the output (which the loss keeps anyway) and the (R,) inverse norms, where
    ``F.normalize(torch.cat(xs))`` keeps the concatenation (or F.normalize(x), x) beside its
    output. The gradient ``dx_r = (dy_r - y_r <y_r, dy_r>) / |x_r|`` (``dy_r / eps``
    for rows shorter than eps) is formed one row chunk at a time in float32, in the inputs'
    dtypes."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *xs: Tensor) -> Tensor:
        # F.normalize's eps, 1e-12, as literals: under torch.compile(dynamic=True) a module
        # global float would be a symbolic input, which dynamo fails to share between two
        # calls' graphs
        dt = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
        R = sum(x.shape[0] for x in xs)
        out = torch.empty((R, xs[0].shape[1]), dtype=dtype, device=xs[0].device)
        inv = torch.empty(R, dtype=dt, device=out.device)
        short = torch.empty(R, dtype=torch.bool, device=out.device)
        o = 0
        for x in xs:
            for r0, r1 in _row_chunks(x):
                xc = x[r0:r1].to(dt)
                n = torch.linalg.vector_norm(xc, dim=1)
                short[o + r0:o + r1] = n < 1e-12
                ic = 1.0 / n.clamp(min=1e-12)
                inv[o + r0:o + r1] = ic
                out[o + r0:o + r1] = xc * ic[:, None]
            o += x.shape[0]
        ctx.save_for_backward(out, inv, short)
        ctx.parts = [(x.shape[0], x.dtype) for x in xs]
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, gy: Tensor):
        y, inv, short = ctx.saved_tensors
        dt = inv.dtype
        grads = []
        o = 0
        for i, (n, dtype) in enumerate(ctx.parts):
            gx = None
            if ctx.needs_input_grad[1 + i]:
                gx = torch.empty((n, y.shape[1]), dtype=dtype, device=y.device)
                for r0, r1 in _row_chunks(gx):
                    a, b = o + r0, o + r1
                    yc, gc = y[a:b].to(dt), gy[a:b].to(dt)
                    c = torch.linalg.vecdot(yc, gc).masked_fill_(short[a:b], 0.0)
                    gx[r0:r1] = torch.addcmul(gc, yc, c[:, None], value=-1.0).mul_(inv[a:b, None])
            grads.append(gx)
            o += n
        return (None, *grads)


def unit_rows(*xs: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """:class:`UnitRows`: ``F.normalize(torch.cat(xs).to(dtype), dim=1)`` (dtype: the inputs')
    keeping only its output and O(R) norms for the backward."""
    return UnitRows.apply(dtype or xs[0].dtype, *xs)


def _scalar32(x: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """A (1,) float32 copy of a scalar parameter (float64 for float64 features)."""
    dt = torch.float64 if like.dtype == torch.float64 else torch.float32
    return None if x is None else x.detach().reshape(1).to(dt)


def _engine(backend: str, spec: LossSpec, targets: Targets, split: bool = False):
    """(engine module, concrete backend name) for a closure; ``split``: the caller needs separate
    gradients of the statistics."""
    extended = (split or spec.exclude_targets or spec.target_lse or spec.fn_space != 0
                or spec.lse2_ratio is not None or targets.row_ids is not None
                or targets.teacher_queries is not None or targets.target_weights is not None)
    backend = _backend.concrete(backend, extended)
    eng = _backend.engine(backend)
    if extended and not getattr(eng, "SPLIT_TARGET_GRADS", False):
        if split:
            raise ValueError(f"backend={backend!r} does not implement this loss (it needs separate "
                             "gradients of the statistics); use backend='triton' or backend='torch'")
        raise ValueError(f"backend={backend!r} does not implement this loss (decoupled, target-LSE "
                         "or false-negative closures); use backend='triton' or backend='torch'")
    return eng, backend


def _forward(ctx, queries, keys, scale, bias, targets, spec, backend, split=False) -> EngineStats:
    eng, backend = _engine(backend, spec, targets, split)
    prepare = getattr(eng, "prepare_targets", None)  # (torch 2.4's dynamo traces no hasattr)
    if prepare is not None:  # once for the forward and the backward
        targets = prepare(targets)
    scale32, bias32 = _scalar32(scale, queries), _scalar32(bias, queries)
    with torch.autocast(queries.device.type, enabled=False):
        stats = eng.forward(queries, keys, scale32, bias32, targets, spec)
    ctx.save_for_backward(queries, keys, scale32, bias32, *stats)
    ctx.targets, ctx.spec, ctx.backend = targets, spec, backend
    ctx.scale_meta = (scale.shape, scale.dtype)
    ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
    return stats


def _backward(ctx, grad_row, grad_col, **split):
    queries, keys, scale32, bias32, *saved = ctx.saved_tensors
    stats = EngineStats(*saved)
    needs = tuple(ctx.needs_input_grad[:4])
    if not any(needs):
        return (None,) * 4
    eng = _backend.engine(ctx.backend)
    gram = ctx.spec.gram
    if gram:  # queries is keys: one gradient for the shared tensor, returned in the queries slot
        both = needs[0] or needs[1]
        needs = (both, both and not getattr(eng, "GRAM", False), needs[2], needs[3])
    with torch.autocast(queries.device.type, enabled=False):
        dq, dk, ds, db = eng.backward(queries, keys, scale32, bias32, ctx.targets, ctx.spec,
                                      stats, grad_row, grad_col, needs, **split)
    if gram:
        dq = dq + dk if dk is not None else dq
        dk = None
    if ds is not None:
        ds = ds.reshape(ctx.scale_meta[0]).to(ctx.scale_meta[1])
    if db is not None:
        db = db.reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1])
    return dq, dk, ds, db


class EngineLoss(torch.autograd.Function):
    """Per-row (N,) and per-column (M,) losses of one engine closure.

    Inputs: queries (N, D), keys (M, D), scale (0-d or (1,) tensor), bias (same, or None),
    targets (:class:`fastcl.ops.Targets`), spec (:class:`fastcl.ops.LossSpec`), backend name.
    Outputs: row losses (N,), column losses (M,) when ``spec.symmetric`` else an empty tensor,
    and the number of targets of each row (N,) (not differentiable).
    """

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor],
                targets: Targets, spec: LossSpec, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
        stats = _forward(ctx, queries, keys, scale, bias, targets, spec, backend)
        rows = row_losses(stats, spec)
        cols = col_losses(stats) if spec.symmetric else rows.new_zeros(0)
        ctx.mark_non_differentiable(stats.row_npos, *([] if spec.symmetric else [cols]))
        return rows, cols, stats.row_npos

    @staticmethod
    @first_order_only
    def backward(ctx, grad_rows: Optional[Tensor], grad_cols: Optional[Tensor], _grad_npos=None):
        N = ctx.saved_tensors[0].shape[0]
        if grad_rows is None:
            grad_rows = ctx.saved_tensors[4].new_zeros(1).expand(N)
        if not ctx.spec.symmetric:
            grad_cols = None
        return (*_backward(ctx, grad_rows, grad_cols), None, None, None)


class EngineRowTotal(torch.autograd.Function):
    """``weight * sum_i L_i`` (0-d) of a row-only closure (``spec.symmetric`` false) and the
    number of targets of each row (N,) (not differentiable): the sum and mean reductions, whose
    rows all get the total's gradient.

    Inputs as :class:`EngineLoss`, plus ``step``: gradients will be asked for (grad mode on and an
    input that requires grad), and ``weight`` (a float: 1/N for a mean). Where the engine takes
    a step for the closure, the forward then computes the gradients too, from one sweep
    (:func:`fastcl.ops.cpp.step` on CPU tensors: each tile's products formed once, 3 GEMMs
    against the 4 of a forward and a backward sweep; :func:`fastcl.ops.triton.engine.step` for
    the sigmoid closure: the loss from the backward's sweep, no forward sweep), and the backward
    scales them by the total's gradient (exact for a gradient of 1 or a power of two, as loss
    scaling gives it); elsewhere this is :class:`EngineLoss` summed.
    """

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor],
                targets: Targets, spec: LossSpec, backend: str, step: bool, weight: float = 1.0):
        run_step = None
        ctx.weight = weight
        if step:
            run_step = step_of(_engine(backend, spec, targets)[0], queries, spec, targets)
        if run_step is None:
            ctx.grads = False
            stats = _forward(ctx, queries, keys, scale, bias, targets, spec, backend)
        else:
            needs = list(ctx.needs_input_grad[:4])
            if spec.gram:  # queries is keys: both parts of the one gradient
                needs[0] = needs[1] = needs[0] or needs[1]
            scale32, bias32 = _scalar32(scale, queries), _scalar32(bias, queries)
            with torch.autocast(queries.device.type, enabled=False):
                stats, grads = run_step(queries, keys, scale32, bias32, targets, spec, needs,
                                        weight)
            dq, dk, ds, db = grads
            if spec.gram and dq is not None:
                dq, dk = dq + dk, None
            ctx.grads = tuple(g is not None for g in (dq, dk, ds, db))
            # (the features too: a second derivative then reaches first_order_only's error)
            ctx.save_for_backward(queries, keys, *(g for g in (dq, dk, ds, db) if g is not None))
            ctx.metas = (queries.dtype, keys.dtype, (scale.shape, scale.dtype),
                         None if bias is None else (bias.shape, bias.dtype))
        total = row_losses(stats, spec).sum()
        if weight != 1.0:
            total = total * weight
        ctx.mark_non_differentiable(stats.row_npos)
        return total, stats.row_npos

    @staticmethod
    @first_order_only
    def backward(ctx, grad_total: Tensor, _grad_npos=None):
        if ctx.grads is False:
            N = ctx.saved_tensors[0].shape[0]
            grad_rows = (grad_total.reshape(1) * ctx.weight).to(ctx.saved_tensors[4].dtype).expand(N)
            return (*_backward(ctx, grad_rows, None), None, None, None, None, None)
        return (*scaled_step_grads(ctx.saved_tensors[2:], ctx.grads, ctx.metas, grad_total),
                None, None, None, None, None)


def grads_asked(*inputs: Optional[Tensor]) -> bool:
    """Whether gradients will be asked for: grad mode on and an input that requires grad."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)


def step_of(eng, queries: Tensor, spec: LossSpec, targets: Targets):
    """The engine module's ``step`` where it takes one for the closure (``takes_step``), else
    None."""
    takes = getattr(eng, "takes_step", None)
    return eng.step if takes is not None and takes(queries, spec, targets) else None


def scaled_step_grads(saved: Sequence[Tensor], has: Sequence[bool], metas, grad_total: Tensor):
    """A step's saved gradients (``saved``: those of (queries, keys, scale, bias) that ``has``
    marks) times the loss's gradient, in the inputs' dtypes (``metas``: queries' and keys'
    dtypes, the scale's and bias's (shape, dtype) | None): 4 tensors | None."""
    it = iter(saved)
    grads = [next(it) if h else None for h in has]
    q_dt, k_dt, s_meta, b_meta = metas
    g = grad_total.reshape(()).to(torch.float64 if q_dt == torch.float64 else torch.float32)
    out = [None if x is None else (x * g).to(dt) for x, dt in zip(grads, (q_dt, k_dt))]
    out += [None if x is None else (x * g).reshape(meta[0]).to(meta[1])
            for x, meta in zip(grads[2:], (s_meta, b_meta))]
    return out


def engine_row_total(queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor],
                     targets: Targets, spec: LossSpec, backend: str,
                     weight: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Functional form of :class:`EngineRowTotal`: (weight * sum_i L_i, row_npos)."""
    return EngineRowTotal.apply(queries, _gram_keys(queries, keys, spec), scale, bias, targets,
                                spec, backend, grads_asked(queries, keys, scale, bias),
                                float(weight))


class EngineStatistics(torch.autograd.Function):
    """The engine's statistics as differentiable outputs (softmax closures).

    Outputs: row_lse (N,), row target statistic (N,) (mean target logit, 0 for rows without
    targets, or the target LSE with ``spec.target_lse``), number of targets per row (N,) (not
    differentiable), when ``spec.symmetric`` col_lse (M,) and the column target logit (M,)
    (else empty tensors), and with teacher targets the (2, N) teacher statistics, the teacher
    LSE and sum_j Tt_ij St_ij minus it (not differentiable; else empty), with
    ``spec.lse2_ratio`` the second row LSE (N,) (differentiable; else empty), the rounding
    errors of the float32 row / column LSEs (N,) / (M,) where the backend keeps them, and with
    teacher targets that of the row target (N,) (not differentiable; else empty).
    """

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor],
                targets: Targets, spec: LossSpec, backend: str):
        if spec.kind != "softmax":
            raise ValueError("EngineStatistics serves the softmax closures")
        stats = _forward(ctx, queries, keys, scale, bias, targets, spec, backend, split=True)
        tgt = row_target_logit(stats, spec)
        if spec.symmetric:
            col_lse, col_pos = stats.col_lse, stats.col_pos
        else:  # (two tensors: torch.compile cannot trace a Function returning one tensor twice)
            col_lse, col_pos = stats.row_lse.new_zeros(0), stats.row_lse.new_zeros(0)
        aux = stats.row_aux[:2].clone() if stats.row_aux is not None else stats.row_lse.new_zeros(0)
        lse2 = stats.row_aux[2].clone() if spec.lse2_ratio is not None else stats.row_lse.new_zeros(0)
        empty = stats.row_lse.new_zeros
        row_lo = stats.row_lse_lo.clone() if stats.row_lse_lo is not None else empty(0)
        col_lo = stats.col_lse_lo.clone() if stats.col_lse_lo is not None else empty(0)
        tgt_lo = stats.row_pos_lo.clone() if stats.row_pos_lo is not None else empty(0)
        ctx.mark_non_differentiable(stats.row_npos, aux, row_lo, col_lo, tgt_lo,
                                    *([] if spec.symmetric else [col_lse, col_pos]),
                                    *([] if spec.lse2_ratio is not None else [lse2]))
        return stats.row_lse, tgt, stats.row_npos, col_lse, col_pos, aux, lse2, row_lo, col_lo, tgt_lo

    @staticmethod
    @first_order_only
    def backward(ctx, g_lse, g_tgt, _g_npos, g_col_lse, g_col_pos, _g_aux=None, g_lse2=None,
                 _g_row_lo=None, _g_col_lo=None, _g_tgt_lo=None):
        ref = ctx.saved_tensors[4]
        N = ctx.saved_tensors[0].shape[0]
        zeros = ref.new_zeros(1).expand(N)
        g_lse = zeros if g_lse is None else g_lse
        g_tgt = zeros if g_tgt is None else g_tgt
        grad_col = grad_col_pos = None
        if ctx.spec.symmetric and (g_col_lse is not None or g_col_pos is not None):
            M = ctx.saved_tensors[1].shape[0]
            mz = ref.new_zeros(1).expand(M)
            grad_col = mz if g_col_lse is None else g_col_lse
            grad_col_pos = mz if g_col_pos is None else g_col_pos
        split = dict(grad_row_pos=g_tgt, grad_col_pos=grad_col_pos)
        if ctx.spec.lse2_ratio is not None:
            split["grad_row_lse2"] = zeros if g_lse2 is None else g_lse2
        grads = _backward(ctx, g_lse, grad_col, **split)
        return (*grads, None, None, None)


def _gram_keys(queries: Tensor, keys: Tensor, spec: LossSpec) -> Tensor:
    """The keys of a ``spec.gram`` call (the queries themselves) as an alias without autograd
    history: the whole gradient comes back in the queries' slot, and torch.compile cannot trace
    a Function given one tensor twice."""
    return keys.detach() if spec.gram and keys is queries else keys


def engine_loss(queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor],
                targets: Targets, spec: LossSpec, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Functional form of :class:`EngineLoss` (inputs already validated and resolved)."""
    return EngineLoss.apply(queries, _gram_keys(queries, keys, spec), scale, bias, targets, spec,
                            backend)


class Statistics(NamedTuple):
    """What :func:`engine_statistics` returns (shapes as in :class:`EngineStatistics`).

    A loss built from them adds ``row_lse_lo`` (and subtracts ``row_target_lo``) where it forms
    ``row_lse - row_target`` (a row whose target dominates has a loss of ~1e-3 next to
    |row_lse| ~ 20, one float32 ulp of which is ~2e-6): :meth:`row_gap`. Each is None where the
    backend does not keep it."""
    row_lse: Tensor
    row_target: Tensor
    row_npos: Tensor
    col_lse: Tensor
    col_target: Tensor
    aux: Tensor
    lse2: Tensor
    row_lse_lo: Optional[Tensor]
    col_lse_lo: Optional[Tensor]
    row_target_lo: Optional[Tensor]

    def plus_lse_lo(self, x: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """``x + weight * row_lse_lo`` (N,), for an ``x`` formed as ``weight * row_lse - ...``."""
        if self.row_lse_lo is None:
            return x
        return x + (self.row_lse_lo if weight is None else weight * self.row_lse_lo)

    def row_gap(self) -> Tensor:
        """``row_lse - row_target`` (N,) with the rounding errors of both added back."""
        gap = self.plus_lse_lo(self.row_lse - self.row_target)
        return gap if self.row_target_lo is None else gap - self.row_target_lo


def engine_statistics(queries: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor],
                      targets: Targets, spec: LossSpec, backend: str) -> Statistics:
    """Functional form of :class:`EngineStatistics`, as a :class:`Statistics`."""
    *out, row_lo, col_lo, tgt_lo = EngineStatistics.apply(
        queries, _gram_keys(queries, keys, spec), scale, bias, targets, spec, backend)
    return Statistics(*out, *(x if x.numel() else None for x in (row_lo, col_lo, tgt_lo)))
