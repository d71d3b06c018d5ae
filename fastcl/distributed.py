"""Contrastive losses over a data-parallel group (``torch.distributed``): gather and ring modes.

Every rank holds its local slice of the global batch: ``n`` queries/images and ``m`` keys/texts
(the same ``n``, ``m`` on every rank; uneven slices are rejected with a ValueError). The loss is the
single-process loss of the concatenated global batch (rank order), N = W * n rows.

Modes
-----
``mode="gather"``: the keys (and, for the symmetric CLIP loss, the queries) are all-gathered with
an autograd-aware gather; each rank computes the loss rows of its local queries against all keys
(positives offset by ``rank * m``) and, for CLIP, the rows of its local texts against all images.
Memory per rank: O(N * D) features.

The self-similarity losses (:func:`nt_xent`, :func:`supcon`, :func:`dcl`, :func:`hcl`,
:func:`mv_infonce`, :func:`mv_dhel`, :func:`uniformity_loss`) take each rank's rows against the
rows of every rank, its own left out, in either mode (gather by default): in the ring a rank's
rows are its queries and the blocks that travel are the other ranks' rows (NT-Xent's ring sweeps
each pair of ranks' tile once, :func:`_mirror_steps`).

``mode="ring"``: no rank ever holds more than two key blocks. Key blocks travel around the ring
(``batch_isend_irecv`` to rank + 1, posted before the tile's compute so the transfer overlaps it);
each rank merges the row statistics of its queries over all blocks (log-sum-exp with ``logaddexp``,
positive terms summed), while the column statistics of a block travel with it and are merged on the
way, then sent home. The backward runs the same ring: a key block travels with its column
statistics and column gradient weights, and its dK accumulator follows it, so each rank ends with
the exact dQ of its queries and dK of its keys. Memory per rank: O((n + m) * D). SigLIP, whose rows
need no global statistic, takes one ring when gradients are asked for (:class:`_RingStep`).

Gradient convention (both modes): data-parallel *averaging*, as ``DistributedDataParallel`` does.
* The returned loss is the global single-process loss, the same value on every rank.
* The gradient of a rank's local features is ``W`` times its slice of the single-process gradient,
  so that after DDP averages parameter gradients over the W ranks they equal the single-process
  gradients exactly. (Without DDP: all-reduce parameter gradients and divide by W.)
* A learnable scale / bias gets its gradient all-reduced inside the loss: every rank holds exactly
  the single-process ``dL/d scale`` (averaging identical values leaves them unchanged, so it is right
  both inside a DDP module and outside one).

This is open_clip's convention for ``local_loss=True, gather_with_grad=True`` (its gradients are
the same), except that the returned value is the global loss instead of the rank's local term.

Collectives and P2P ops are the same on NCCL (CUDA tensors) and gloo (CPU tensors); the only host
synchronisation is the optional batch-size check (``check_sizes=True``: one tiny all-gather).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import _backend
from .autograd import (Statistics, _engine, _scalar32, engine_row_total, engine_statistics,
                       first_order_only, grads_asked, scaled_step_grads, step_of)
from .losses import (_cast_dtype, _check_features, _check_hard_negatives, _check_index,
                     _check_labels, _check_multi_view, _check_pair, _dcl_rows, _dclw_weights,
                     _focal, _hcl_params, _hcl_rows, _mv_dhel_rows, _mv_infonce_rows, _prepare,
                     _real, _row_dots, _scalar_param, _shaping, _smoothing_term, _stack_rows,
                     _stat_dtype, _temperature_scale, _two_views, _uniformity_terms, _views_flat,
                     _with_hard_negatives)
from .ops import (EngineStats, LossSpec, Targets, centred_scale_sums, closure_weights,
                  correct_line_totals, merge_lse, row_losses, row_target_logit, split_lse,
                  tied_scale_totals)

Tensor = torch.Tensor

__all__ = ["all_gather_with_grad", "clip_loss", "info_nce", "siglip_loss", "nt_xent", "supcon",
           "dcl", "hcl", "mv_infonce", "mv_dhel", "uniformity_loss", "MODES"]

MODES = ("gather", "ring")


# ----------------------------------------------------------------------------------------------
# group helpers
# ----------------------------------------------------------------------------------------------


def _world(group) -> Tuple[int, int]:
    """(world size, rank) of the group; (1, 0) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _global_rank(group, rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


def _is_nccl(group) -> bool:
    return str(dist.get_backend(group)).lower() == "nccl"


def _check_sizes(name: str, local: int, group, device: torch.device) -> None:
    """Every rank must hold the same number of rows (one tiny all-gather: a host sync)."""
    W, _ = _world(group)
    if W == 1:
        return
    mine = torch.tensor([local], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(every, mine, group=group)
    sizes = [int(x.item()) for x in every]
    if len(set(sizes)) != 1:
        raise ValueError(f"{name} must have the same number of rows on every rank, got {sizes} "
                         "(rank order); pad or drop the last uneven batch")


def _check_mode(mode: str, reduction: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for a distributed loss, got {reduction!r}")


# ----------------------------------------------------------------------------------------------
# autograd-aware collectives
# ----------------------------------------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    """(n, ...) on every rank -> (W * n, ...) in rank order; backward sums the gradients of all
    ranks and returns this rank's slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        W, r = _world(group)
        ctx.group, ctx.rank, ctx.world = group, r, W
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(W)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        n = grad.shape[0] // ctx.world
        if _is_nccl(ctx.group):
            out = grad.new_empty((n,) + grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        return grad[ctx.rank * n:(ctx.rank + 1) * n], None


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """All-gather (n, ...) -> (W * n, ...) in rank order, differentiable: the gradient of the
    local slice is the sum over ranks of the gradients of the gathered copies."""
    W, _ = _world(group)
    if W == 1:
        return x
    return _AllGather.apply(x, group)


class _ScalarGradMean(torch.autograd.Function):
    """Identity in the forward; the backward all-reduces the scalar's gradient and divides by W."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor):
        W, _ = _world(ctx.group)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad / W, None


def _sync_scalar(x: Optional[Tensor], group) -> Optional[Tensor]:
    if x is None or not x.requires_grad or _world(group)[0] == 1:
        return x
    return _ScalarGradMean.apply(x, group)


def _global_value(contribution: Tensor, group) -> Tensor:
    """A tensor whose value is the sum of every rank's contribution and whose gradient is that of
    ``W * contribution`` (the data-parallel averaging convention)."""
    W, _ = _world(group)
    if W == 1:
        return contribution
    total = contribution.detach().clone()
    dist.all_reduce(total, group=group)
    graph = contribution * W
    return graph + (total - graph).detach()


# ----------------------------------------------------------------------------------------------
# ring P2P
# ----------------------------------------------------------------------------------------------


class _Ring:
    """Sends to rank + 1 and receives from rank - 1 with ``batch_isend_irecv`` (valid on NCCL)."""

    def __init__(self, group):
        self.group = group
        W, r = _world(group)
        self.world, self.rank = W, r
        self.next = _global_rank(group, (r + 1) % W)
        self.prev = _global_rank(group, (r - 1) % W)

    def exchange(self, send: Sequence[Tensor], recv: Sequence[Tensor], hops: int = 1
                 ) -> Tuple[List, tuple]:
        """Posts the transfers to rank + ``hops`` and from rank - ``hops``; returns (requests,
        tensors) - the tensors stay referenced until :meth:`wait` so that no buffer in flight is
        freed and reused."""
        to, frm = self.next, self.prev
        if hops != 1:
            to = _global_rank(self.group, (self.rank + hops) % self.world)
            frm = _global_rank(self.group, (self.rank - hops) % self.world)
        ops = [dist.P2POp(dist.isend, t, to, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, frm, self.group) for t in recv]
        return dist.batch_isend_irecv(ops), (tuple(send), tuple(recv))

    @staticmethod
    def wait(pending) -> None:
        if not pending:
            return
        for req in pending[0]:
            req.wait()


def _merge_col(acc: Tensor, part: Tensor) -> Tensor:
    """Column statistics packed as (3, m): [col_lse; col_pos; col_lse_lo] (lse = hi + lo)."""
    hi, lo = merge_lse(acc[0], acc[2], part[0], part[2])
    return torch.stack([hi, acc[1] + part[1], lo])


def _tile_args(base: LossSpec, positives, labels, block_labels, r, o, m):
    """Spec and targets of the (local queries) x (key block of rank o) tile: with offset
    (r - o) * m the default positive i + offset, and the excluded self, are in range only on the
    diagonal block. Index ``positives`` lie in the own block; with ``labels`` every block's keys
    of the row's class are its positives (``block_labels``: the block's)."""
    if o == r and positives is not None:
        return replace(base, offset=0), Targets(positives=positives)
    spec = replace(base, offset=(r - o) * m)
    if labels is not None:
        return spec, Targets(row_labels=labels, col_labels=block_labels)
    return spec, Targets()


def _travel(ring: "_Ring", tensors: Sequence[Optional[Tensor]]):
    """Posts the next block of each tensor not None (sent on to rank + 1, received from rank - 1):
    (pending, the received buffers with None kept in place)."""
    send = [t for t in tensors if t is not None]
    recv = [torch.empty_like(t) for t in send]
    pending = ring.exchange(send, recv)
    it = iter(recv)
    return pending, [None if t is None else next(it) for t in tensors]


def _around(ring: "_Ring", tensors: Sequence[Optional[Tensor]], steps: Optional[int] = None):
    """The ring's steps: yields (t, o, blocks), the blocks of ``tensors`` (None kept) that this
    rank holds at step t, rank o = rank - t's; the next step's are in flight while the caller
    computes, and arrive before the next yield. ``steps``: the first so many (default: all W)."""
    blocks = list(tensors)
    steps = ring.world if steps is None else steps
    for t in range(steps):
        pending, nxt = None, blocks
        if t < steps - 1:
            pending, nxt = _travel(ring, blocks)
        yield t, (ring.rank - t) % ring.world, blocks
        ring.wait(pending)
        blocks = nxt


def _home(ring: "_Ring", t: int, part: List[Tensor], state: list, merge=None) -> None:
    """Accumulators that travel with block o = rank - t (its dK, its column statistics, ...):
    this rank's ``part`` is merged (``merge(received, part)``; by default added) with what the
    ranks the block visited before sent, and sent on; after the last step :func:`_arrived` gives
    the own block's. ``state``: [pending, received] between steps."""
    if t > 0:
        ring.wait(state[0])
        part = [a + b if merge is None else merge(a, b) for a, b in zip(state[1], part)]
    if ring.world == 1:
        state[:] = [None, part]
    else:
        state[:] = list(_travel(ring, part))


def _arrived(ring: "_Ring", state: list) -> List[Tensor]:
    """The own block's accumulators once they are home (see :func:`_home`)."""
    ring.wait(state[0])
    return state[1]


def _mirror_steps(world: int) -> int:
    """The steps of a ring over a Gram matrix that uses its symmetry: tile (r, o) is tile
    (o, r) transposed, so rank r sweeps blocks o = r - t for t = 0 .. W // 2 only, those with
    0 < t < W - t symmetric, for both ranks' rows (:func:`_mirrored`); W even, the tiles of
    t = W / 2 pair the ranks two by two and each sweeps its own rows' tile."""
    return world // 2 + 1


def _mirrored(ring: "_Ring", t: int) -> bool:
    """Whether step t's tile of a Gram ring also gives its columns' lines (:func:`_mirror_steps`)."""
    return 0 < t < ring.world - t


def _to_owner(ring: "_Ring", t: int, part: List[Tensor], state: list, merge=None) -> None:
    """Sends ``part``, computed at step t on block o = rank - t, straight to rank o, and posts
    the receipt of this rank's own from rank + t, which holds this rank's block at step t; what
    arrived at the previous call is merged into the total ``state[2]`` (``merge(acc, part)``; by
    default added) first, so that one receipt is in flight at a time. ``state``: [pending, received,
    accumulated]; :func:`_owned` gives the total."""
    _owned(ring, state, merge)
    recv = [torch.empty_like(x) for x in part]
    state[0], state[1] = ring.exchange(part, recv, hops=-t), recv


def _owned(ring: "_Ring", state: list, merge=None) -> Optional[List[Tensor]]:
    """What :func:`_to_owner` received so far, merged (None if nothing arrived)."""
    if state[0] is not None:
        ring.wait(state[0])
        acc = state[2]
        state[2] = state[1] if acc is None else [
            a + b if merge is None else merge(a, b) for a, b in zip(acc, state[1])]
        state[0] = state[1] = None
    return state[2]


class _RingLoss(torch.autograd.Function):
    """Per-row losses (n,) of the local queries against every rank's keys, and (symmetric) the
    per-column losses (m,) of the local keys against every rank's queries, with exact global
    statistics, and each row's number of targets (n,). Gradients are those of the sum over ranks
    of each rank's weighted outputs (scale and bias: this rank's share; the caller all-reduces
    them).

    cfg = (spec, gap, backend, group, mirror): ``spec`` the closure (its offset set per block),
    ``gap`` the rows' loss ``softplus(LSE_negatives - LSE_targets) + log npos`` (SupCon L_in:
    ``spec.exclude_targets`` and ``spec.target_lse``) instead of ``lse - target``. ``labels``
    (n,) travel with the key blocks (the self-similarities: the keys are the queries).
    ``mirror``: the keys are the queries and every row's targets lie in its own block (NT-Xent):
    the ring uses the Gram matrix's symmetry (:func:`_mirror_steps`), each tile of two ranks'
    blocks swept once, symmetric, its columns' statistics and gradients sent to their owner."""

    @staticmethod
    def forward(ctx, queries, keys, scale, bias, positives, labels, cfg):
        spec0, gap, backend, group, mirror = cfg
        kind, symmetric, tlse = spec0.kind, spec0.symmetric, spec0.target_lse
        ring = _Ring(group)
        steps = _mirror_steps(ring.world) if mirror else None
        r = ring.rank
        eng = _backend.engine(backend)
        s32, b32 = _scalar32(scale, queries), _scalar32(bias, queries)
        n, m = queries.shape[0], keys.shape[0]
        sdt = torch.float64 if queries.dtype == torch.float64 else torch.float32
        f64 = torch.float64
        dev = queries.device
        # (softmax: the row LSEs merged in float64 from each block's hi + lo parts)
        row_lse = torch.full((n,), -math.inf if kind == "softmax" else 0.0,
                             dtype=f64 if kind == "softmax" else sdt, device=dev)
        row_pos = (torch.full((n,), -math.inf, dtype=f64, device=dev) if tlse
                   else torch.zeros(n, dtype=sdt, device=dev))
        row_npos = torch.zeros(n, dtype=sdt, device=dev)
        home = [None, None]  # the column statistics of the block held, on their way home
        owed = [None, None, None]  # mirror: the own rows' LSEs from other ranks' tiles
        with torch.autocast(dev.type, enabled=False):
            for t, o, (kb, lb) in _around(ring, [keys.contiguous(), labels], steps):
                spec, targets = _tile_args(spec0, positives, labels, lb, r, o, m)
                mirrored = mirror and _mirrored(ring, t)
                if mirrored:  # (off the own block: no targets, no self)
                    spec = replace(spec, symmetric=True, exclude_self=False)
                st = eng.forward(queries, kb, s32, b32, targets, spec)
                if kind == "sigmoid":
                    row_lse = row_lse + st.row_lse.to(sdt)
                else:
                    lse = st.row_lse.double()
                    if st.row_lse_lo is not None:
                        lse = lse + st.row_lse_lo.double()
                    row_lse = torch.logaddexp(row_lse, lse)
                    row_pos = (torch.logaddexp(row_pos, st.row_pos.double()) if tlse
                               else row_pos + st.row_pos.to(sdt))
                    row_npos = row_npos + st.row_npos.to(sdt)
                if symmetric:
                    lo = st.col_lse_lo if st.col_lse_lo is not None else torch.zeros_like(st.col_lse)
                    part = torch.stack([st.col_lse.to(sdt), st.col_pos.to(sdt), lo.to(sdt)])
                    _home(ring, t, [part], home, merge=_merge_col)
                if mirrored:  # block o's rows' LSEs over this rank's rows, to rank o
                    col = st.col_lse.double()
                    if st.col_lse_lo is not None:
                        col = col + st.col_lse_lo.double()
                    _to_owner(ring, t, [col], owed, merge=torch.logaddexp)
            own_col = _arrived(ring, home)[0] if symmetric else None
            owed = _owned(ring, owed, merge=torch.logaddexp)
            if owed is not None:
                row_lse = torch.logaddexp(row_lse, owed[0])
        row_lo, sig = None, None
        if gap:  # L_in from the float64 LSEs; its gradient weight sigmoid(gap) on the tied closure
            valid = row_npos > 0
            d = torch.where(valid, row_lse - row_pos, torch.zeros_like(row_lse))
            sig = torch.where(valid, torch.sigmoid(d), torch.zeros_like(d)).to(sdt)
            rows = torch.where(valid, torch.nn.functional.softplus(d)
                               + torch.log(row_npos.clamp(min=1)).to(f64), torch.zeros_like(d)).to(sdt)
        if kind == "softmax":
            row_lse, row_lo = split_lse(row_lse, sdt)
        row_pos = row_pos.to(sdt)
        if not gap:
            rows = row_losses(EngineStats(row_lse, row_pos, row_npos, row_lse_lo=row_lo), spec0)
        cols = (own_col[0] - own_col[1]) + own_col[2] if symmetric else rows.new_zeros(0)
        ctx.save_for_backward(queries, keys, s32, b32, row_lse, row_pos, row_npos,
                              own_col[0] if symmetric else None, positives, labels, sig)
        ctx.cfg = cfg
        ctx.scale_meta = (scale.shape, scale.dtype)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.mark_non_differentiable(row_npos, *([] if symmetric else [cols]))
        return rows, cols, row_npos

    @staticmethod
    @first_order_only
    def backward(ctx, grad_rows, grad_cols, _grad_npos=None):
        (queries, keys, s32, b32, row_lse, row_pos, row_npos, col_lse, positives, labels,
         sig) = ctx.saved_tensors
        spec0, gap, backend, group, mirror = ctx.cfg
        kind, symmetric = spec0.kind, spec0.symmetric
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        ring = _Ring(group)
        W, r = ring.world, ring.rank
        steps = _mirror_steps(W) if mirror else None
        eng = _backend.engine(backend)
        n, m = queries.shape[0], keys.shape[0]
        sdt = row_lse.dtype
        dev = queries.device
        g = (grad_rows if grad_rows is not None else torch.zeros(n, device=dev)).to(sdt).contiguous()
        if gap:  # d L_in / d LSE_negatives = -d L_in / d LSE_targets = sigmoid(gap)
            g = g * sig
        stats_dt = torch.float64 if queries.dtype == torch.float64 else torch.float32
        dq = torch.zeros(queries.shape, dtype=stats_dt, device=dev) if need_q else None
        ds = torch.zeros(1, dtype=sdt, device=dev)
        db = torch.zeros(1, dtype=sdt, device=dev)
        # column info travelling with the key block: [col_lse; col grad weights]
        cinfo = None
        if symmetric:
            gc = grad_cols if grad_cols is not None else torch.zeros(m, device=dev)
            cinfo = torch.stack([col_lse, gc.to(sdt)])
        elif mirror:  # the block's rows, the columns of a mirrored tile: their LSEs and weights
            cinfo = torch.stack([row_lse, g])
        # what travels home with block o: its dK accumulator and (float32, IEEE products) its
        # columns' sums of dS's column part; the rows' sums of the local queries stay here. With
        # them the whole lines' sums are known after the ring (fastcl.ops.correct_line_totals).
        # (mirror: sent from the tile's rank straight to block o's; the own block's kept here)
        home, owed, own = [None, None], [None, None, None], []
        row_sums = None
        needs = (bool(need_q), bool(need_k), bool(need_s), bool(need_b))
        with torch.autocast(dev.type, enabled=False):
            for t, o, (kb, cinfo, lb) in _around(ring, [keys.contiguous(), cinfo, labels], steps):
                spec, targets = _tile_args(spec0, positives, labels, lb, r, o, m)
                mirrored = mirror and _mirrored(ring, t)
                if mirrored:  # (off the own block: no targets, no self)
                    spec = replace(spec, symmetric=True, exclude_self=False)
                columns = symmetric or mirrored
                stats = EngineStats(row_lse, row_pos, row_npos,
                                    cinfo[0].contiguous() if columns else None, None)
                gcol = cinfo[1].contiguous() if columns else None
                # (a block is not its lines' whole: its lines' sums are added up over the ring)
                out = eng.backward(queries, kb, s32, b32, targets, spec, stats, g, gcol, needs,
                                   whole_lines=W == 1, return_line_sums=W > 1)
                dq_t, dk_t, ds_t, db_t = out[:4]
                rs_t, cs_t = out[4:] if W > 1 else (None, None)
                if rs_t is not None:
                    row_sums = rs_t.to(sdt) if row_sums is None else row_sums + rs_t.to(sdt)
                if need_q:
                    dq += dq_t.to(stats_dt)
                if kind == "softmax" and t > 0 and (need_s or need_b):
                    # the backend centres its scale sums and adds the lines' totals over this
                    # block's entries; those of the whole lines are the own block's (t = 0):
                    # every row's statistics are global, and each column's positive lies there
                    tot = tied_scale_totals(spec, targets, stats, g, gcol, s32, b32, kb.shape[0])
                    ds_t = ds_t - tot[0] if need_s else ds_t
                    db_t = db_t - tot[1] if need_b else db_t
                if need_s:
                    ds += ds_t.to(sdt)
                if need_b:
                    db += db_t.to(sdt)
                if mirror and cs_t is None and rs_t is not None:  # (every step's the same parts)
                    cs_t = torch.zeros(m, dtype=sdt, device=dev)
                part = ([dk_t.to(stats_dt)] if need_k else []) + (
                    [cs_t.to(sdt)] if cs_t is not None else [])
                if part and not mirror:
                    _home(ring, t, part, home)
                elif part and t == 0:
                    own = part
                elif part:
                    _to_owner(ring, t, part, owed)
            if mirror:  # this rank's block's dK and its rows' sums as other ranks' columns
                owed = _owned(ring, owed)
                travel_own = own if owed is None else [a + b for a, b in zip(own, owed)]
                if row_sums is not None:
                    row_sums = row_sums + travel_own[-1]
            else:
                travel_own = _arrived(ring, home)
            dk_own = travel_own[0] if need_k else None
            if row_sums is not None:  # the whole lines' sums against their exact totals
                col_sums = travel_own[-1] if symmetric else None
                stats = EngineStats(row_lse, row_pos, row_npos, col_lse if symmetric else None, None)
                weights = closure_weights(spec0, stats, g, grad_col=gc.to(sdt) if symmetric else None)
                if labels is None:  # every line's targets lie in the own block
                    spec, targets = _tile_args(spec0, positives, None, None, r, r, m)
                    correct_line_totals(dq, dk_own, queries, keys, s32, spec, targets, stats,
                                        weights, row_sums, col_sums)
                else:
                    _correct_labels_ring(ring, dq, dk_own, queries, keys, labels, s32, spec0,
                                         stats, weights, row_sums)
        d_scale = ds.reshape(ctx.scale_meta[0]).to(ctx.scale_meta[1]) if need_s else None
        d_bias = db.reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1]) if need_b else None
        return (dq.to(queries.dtype) if need_q else None,
                dk_own.to(keys.dtype) if need_k else None,
                d_scale, d_bias, None, None, None)


def _correct_labels_ring(ring, dq, dk, queries, keys, labels, s32, spec0, stats, weights,
                         row_sums) -> None:
    """:func:`fastcl.ops.correct_line_totals` of label targets over the ring, in place: a row's
    targets lie in every block, so once its whole line's sums are known the key blocks go round
    again (with their labels). Each rank corrects its rows' dQ from a block's keys of their class
    and adds its rows' share to the block's dK correction, which travels with the block and
    comes home after the last step."""
    r, m = ring.rank, keys.shape[0]
    home = [None, None]
    for t, o, (kb, lb) in _around(ring, [keys.contiguous(), labels]):
        spec, targets = _tile_args(spec0, None, labels, lb, r, o, m)
        fix = torch.zeros_like(dk) if dk is not None else None
        correct_line_totals(dq, fix, queries, kb, s32, spec, targets, stats, weights, row_sums)
        if fix is not None:
            _home(ring, t, [fix], home)
    if dk is not None:
        dk += _arrived(ring, home)[0]


class _RingStep(torch.autograd.Function):
    """``weight * sum_i L_i`` (0-d) of the local queries' rows against every rank's keys, for a
    row-only closure the engine takes a step for (``takes_step``: SigLIP on the Triton engine,
    any on CPU tensors) and whose rows need no global statistic (the sigmoid closure): each
    block's step (``eng.step``) gives the rows' losses over it and the gradients, so the
    forward's ring is the only one. A block's dK accumulator travels home with it (as in
    :class:`_RingLoss`'s backward); the backward scales the gradients by the total's. Per rank:
    one sweep of each block instead of a forward and a backward sweep, and one ring instead of
    two. Gradients as :class:`_RingLoss`'s (scale and bias: this rank's share).

    cfg = (spec, backend, group, weight, labels); ``weight`` (1 / N for a mean) goes into the
    kernels before the 16-bit gradients' rounding; ``labels`` (n,) | None, the pairs' classes
    (positives: the keys of the row's class), travel with the key blocks. The blocks' gradients
    are summed and held in float32 until the backward, which rounds them once after scaling
    ((n + m) D floats: held in the features' dtype, a gradient that is not a power of two would
    round them twice, past twice PyTorch's bf16 error)."""

    @staticmethod
    def forward(ctx, queries, keys, scale, bias, cfg):
        spec0, backend, group, weight, labels = cfg
        ring = _Ring(group)
        r, m = ring.rank, keys.shape[0]
        eng = _backend.engine(backend)
        s32, b32 = _scalar32(scale, queries), _scalar32(bias, queries)
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:4])
        gdt = torch.float64 if queries.dtype == torch.float64 else torch.float32
        dq = torch.zeros(queries.shape, dtype=gdt, device=queries.device) if needs[0] else None
        ds = torch.zeros(1, dtype=gdt, device=queries.device)
        db = torch.zeros(1, dtype=gdt, device=queries.device)
        total = torch.zeros((), dtype=gdt, device=queries.device)
        home = [None, None]  # the dK of the block held, on its way home
        with torch.autocast(queries.device.type, enabled=False):
            for t, o, (kb, lb) in _around(ring, [keys.contiguous(), labels]):
                spec, targets = _tile_args(spec0, None, labels, lb, r, o, m)
                stats, (dq_t, dk_t, ds_t, db_t) = eng.step(queries, kb, s32, b32, targets, spec,
                                                           needs, weight)
                total = total + row_losses(stats, spec).to(gdt).sum()
                if dq_t is not None:
                    dq += dq_t.to(gdt)
                if ds_t is not None:
                    ds += ds_t.to(gdt).reshape(1)
                if db_t is not None:
                    db += db_t.to(gdt).reshape(1)
                if dk_t is not None:
                    _home(ring, t, [dk_t.to(gdt)], home)
            dk = _arrived(ring, home)[0] if needs[1] else None
        grads = (dq, dk, ds if needs[2] else None, db if needs[3] and bias is not None else None)
        ctx.grads = tuple(x is not None for x in grads)
        ctx.save_for_backward(*(x for x in grads if x is not None))
        ctx.metas = (queries.dtype, keys.dtype, (scale.shape, scale.dtype),
                     None if bias is None else (bias.shape, bias.dtype))
        return total * weight

    @staticmethod
    @first_order_only
    def backward(ctx, grad_total):
        # (the float32 sums scaled, then rounded once to the features' dtype)
        return (*scaled_step_grads(ctx.saved_tensors, ctx.grads, ctx.metas, grad_total), None)


class _RingStatistics(torch.autograd.Function):
    """The global row statistics of the local queries against every rank's keys, over the ring:
    what :class:`fastcl.autograd.EngineStatistics` gives for rows against the concatenated keys
    (row-only softmax closures: LSEs with targets or the queries' own copies left out, a target
    LSE, a second LSE), for the family's row formulas in ring mode.

    Outputs: row_lse (n,), the row target statistic (n,), the number of targets (n,) (not
    differentiable), the second LSE (n,) with ``spec.lse2_ratio`` (else empty) and the row LSE's
    rounding error (n,) (not differentiable). The forward merges each block's statistics in
    float64; the backward runs the ring again with the split gradients of all three, each block's
    dK travelling home (scale and bias: this rank's share; the caller all-reduces them).
    cfg = (spec, backend, group); ``positives`` (n,) index the own block; ``labels`` (n,) travel
    with the key blocks (the keys are the queries' rows)."""

    @staticmethod
    def forward(ctx, queries, keys, scale, bias, positives, labels, cfg):
        spec0, backend, group = cfg
        ring = _Ring(group)
        eng = _backend.engine(backend)
        s32, b32 = _scalar32(scale, queries), _scalar32(bias, queries)
        n, m = queries.shape[0], keys.shape[0]
        sdt = torch.float64 if queries.dtype == torch.float64 else torch.float32
        f64, tlse, two = torch.float64, spec0.target_lse, spec0.lse2_ratio is not None
        lse = torch.full((n,), -math.inf, dtype=f64, device=queries.device)
        lse2 = lse.clone() if two else None
        pos = lse.clone() if tlse else torch.zeros(n, dtype=sdt, device=queries.device)
        npos = torch.zeros(n, dtype=sdt, device=queries.device)
        with torch.autocast(queries.device.type, enabled=False):
            for _, o, (kb, lb) in _around(ring, [keys.contiguous(), labels]):
                spec, targets = _tile_args(spec0, positives, labels, lb, ring.rank, o, m)
                st = eng.forward(queries, kb, s32, b32, targets, spec)
                part = st.row_lse.double()
                lse = torch.logaddexp(lse, part if st.row_lse_lo is None
                                      else part + st.row_lse_lo.double())
                pos = torch.logaddexp(pos, st.row_pos.double()) if tlse else pos + st.row_pos.to(sdt)
                npos = npos + st.row_npos.to(sdt)
                if two:
                    lse2 = torch.logaddexp(lse2, st.row_aux[2].double())
        row_lse, row_lo = split_lse(lse, sdt)
        pos = pos.to(sdt)
        lse2 = lse2.to(sdt) if two else row_lse.new_zeros(0)
        target = row_target_logit(EngineStats(row_lse, pos, npos), spec0)
        ctx.save_for_backward(queries, keys, s32, b32, row_lse, pos, npos, lse2, positives, labels)
        ctx.cfg = cfg
        ctx.scale_meta = (scale.shape, scale.dtype)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.mark_non_differentiable(npos, row_lo, *([] if two else [lse2]))
        return row_lse, target, npos, lse2, row_lo

    @staticmethod
    @first_order_only
    def backward(ctx, g_lse, g_tgt, _g_npos=None, g_lse2=None, _g_lo=None):
        queries, keys, s32, b32, row_lse, pos, npos, lse2, positives, labels = ctx.saved_tensors
        spec0, backend, group = ctx.cfg
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        ring = _Ring(group)
        W, r = ring.world, ring.rank
        eng = _backend.engine(backend)
        n, m = queries.shape[0], keys.shape[0]
        sdt = row_lse.dtype
        zeros = row_lse.new_zeros(n)
        g_lse = zeros if g_lse is None else g_lse.to(sdt).contiguous()
        g_tgt = zeros if g_tgt is None else g_tgt.to(sdt).contiguous()
        a2, aux = None, None
        if spec0.lse2_ratio is not None:
            a2 = zeros if g_lse2 is None else g_lse2.to(sdt).contiguous()
            aux = torch.stack([zeros, zeros, lse2])
        stats = EngineStats(row_lse, pos, npos, row_aux=aux)
        weights = closure_weights(spec0, stats, g_lse, g_tgt)
        dq = torch.zeros(queries.shape, dtype=sdt, device=queries.device) if need_q else None
        ds = torch.zeros(1, dtype=sdt, device=queries.device)
        db = torch.zeros(1, dtype=sdt, device=queries.device)
        needs = (bool(need_q), bool(need_k), bool(need_s), bool(need_b))
        row_sums, home = None, [None, None]
        with torch.autocast(queries.device.type, enabled=False):
            for t, o, (kb, lb) in _around(ring, [keys.contiguous(), labels]):
                spec, targets = _tile_args(spec0, positives, labels, lb, r, o, m)
                # (a block is not its lines' whole: their sums are added up over the ring)
                out = eng.backward(queries, kb, s32, b32, targets, spec, stats, g_lse, None, needs,
                                   grad_row_pos=g_tgt, grad_row_lse2=a2, whole_lines=W == 1,
                                   return_line_sums=W > 1)
                dq_t, dk_t, ds_t, db_t = out[:4]
                if W > 1 and out[4] is not None:
                    row_sums = out[4].to(sdt) if row_sums is None else row_sums + out[4].to(sdt)
                if need_q:
                    dq += dq_t.to(sdt)
                if t > 0 and (need_s or need_b):  # the lines' totals once, as on the own block
                    tot = centred_scale_sums(row_lse.new_zeros(2), spec, targets, stats,
                                             *weights[:2], s32.to(sdt).reshape(()),
                                             None if b32 is None else b32.to(sdt).reshape(()),
                                             kb.shape[0], a2_row=a2)
                    ds_t = ds_t - tot[0] if need_s else ds_t
                    db_t = db_t - tot[1] if need_b else db_t
                if need_s:
                    ds += ds_t.to(sdt)
                if need_b:
                    db += db_t.to(sdt)
                if need_k:
                    _home(ring, t, [dk_t.to(sdt)], home)
            dk = _arrived(ring, home)[0] if need_k else None
            if row_sums is not None:  # the whole lines' sums against their exact totals
                if labels is None:  # every line's targets lie in the own block
                    spec, targets = _tile_args(spec0, positives, None, None, r, r, m)
                    correct_line_totals(dq, dk, queries, keys, s32, spec, targets, stats, weights,
                                        row_sums, a2_row=a2)
                else:
                    _correct_labels_ring(ring, dq, dk, queries, keys, labels, s32, spec0, stats,
                                         weights, row_sums)
        d_scale = ds.reshape(ctx.scale_meta[0]).to(ctx.scale_meta[1]) if need_s else None
        d_bias = db.reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1]) if need_b else None
        return (dq.to(queries.dtype) if need_q else None, dk.to(keys.dtype) if need_k else None,
                d_scale, d_bias, None, None, None)


def _ring_sweep(group):
    """A sweep of the family's row formulas (as :func:`_gatherer`) over the ring: the rows'
    global statistics from :class:`_RingStatistics`, the key blocks travelling (the keys given are
    this rank's rows, as the queries or with an extra feature). The formulas' global indexing is
    taken back to the ring's: ``spec.offset`` is the rows' place, the index targets lie in the own
    block, and the row labels travel with the blocks as their keys' labels."""
    def sweep(queries, keys, scale, bias, targets, spec, backend):
        positives = None if targets.positives is None else targets.positives - spec.offset
        spec = replace(spec, gram=False, offset=0)
        _, backend = _engine(backend, spec, targets, split=True)
        row_lse, target, npos, lse2, row_lo = _RingStatistics.apply(
            queries, keys.contiguous(), scale, bias, positives, targets.row_labels,
            (spec, backend, group))
        empty = row_lse.new_zeros(0)
        return Statistics(row_lse, target, npos, empty, empty, empty, lse2,
                          row_lo if row_lo.numel() else None, None, None)
    return sweep


def _ring(queries, keys, scale, bias, positives, *, kind="softmax", symmetric=False, exact,
          backend, group, labels=None, exclude_self=False, variant_in=False, mirror=False):
    """Rows (n,), columns (m,) (empty unless symmetric) and targets per row (n,) of the ring;
    ``variant_in``: SupCon L_in's closure (targets out of the LSE, their own LSE); ``mirror``:
    the keys are the queries, each row's targets in its own block (:class:`_RingLoss`)."""
    spec = LossSpec(kind=kind, symmetric=symmetric, exact=exact, exclude_self=exclude_self,
                    exclude_targets=variant_in, target_lse=variant_in)
    _, backend = _engine(backend, spec, Targets())
    return _RingLoss.apply(queries, keys, scale, bias, positives, labels,
                           (spec, variant_in, backend, group, mirror))


# ----------------------------------------------------------------------------------------------
# public losses
# ----------------------------------------------------------------------------------------------


def _setup(qname, q, kname, k, scale_name, scale, bias_name, bias, *, mode, reduction, group,
           check_sizes, backend, scale_optional=False, paired=False):
    _check_pair(qname, q, kname, k)
    if paired and q.shape[0] != k.shape[0]:
        raise ValueError(f"{qname} and {kname} must have the same batch size n, got "
                         f"{q.shape[0]} and {k.shape[0]}")
    _check_mode(mode, reduction)
    if check_sizes:
        _check_sizes(qname, q.shape[0], group, q.device)
        _check_sizes(kname, k.shape[0], group, q.device)
    sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = _scalar_param(scale_name, scale, q.device, optional=scale_optional, dtype=sdt)
    b = _scalar_param(bias_name, bias, q.device, optional=True, dtype=sdt)
    s, b = _sync_scalar(s, group), _sync_scalar(b, group)
    q, k, be = _prepare(q, k, backend)
    return q, k, s, b, be


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *,
              mode: str = "ring", group=None, reduction: str = "mean", backend: str = "auto",
              exact: bool = False, check_sizes: bool = True, label_smoothing: float = 0.0,
              focal_gamma: float = 0.0) -> Tensor:
    """Symmetric CLIP loss of the global batch, from each rank's local pairs.

    Args:
        image_features, text_features: (n, D) local pairs (the same n on every rank).
        logit_scale: the exponentiated scale (float or one-element tensor); logit_bias optional.
        mode: "ring" (P2P key ring, no rank holds all features) | "gather" (all-gather).
        group: the process group (default: the world).
        reduction: "mean" (open_clip's value over the global batch) | "sum".
        check_sizes: verify equal n on every rank (ValueError otherwise); one tiny all-gather.
        label_smoothing, focal_gamma: as :func:`fastcl.clip_loss`, over the global batch (the
            smoothing's uniform part over every rank's columns: their mean, one all-gather of
            (D,) sums).
    Returns:
        the global loss (same value on every rank); gradients follow the averaging convention of
        this module's docstring.
    """
    eps, gamma = _shaping(label_smoothing, focal_gamma)
    q, k, s, b, be = _setup("image_features", image_features, "text_features", text_features,
                            "logit_scale", logit_scale, "logit_bias", logit_bias, mode=mode,
                            reduction=reduction, group=group, check_sizes=check_sizes, backend=backend,
                            paired=True)
    W, r = _world(group)
    n = q.shape[0]
    norm = 1.0 / (2 * W * n) if reduction == "mean" else 1.0
    if mode == "gather":
        from .losses import info_nce as _info_nce
        all_q, all_k = all_gather_with_grad(q, group), all_gather_with_grad(k, group)
        pos = torch.arange(n, device=q.device) + r * n
        shaping = dict(label_smoothing=eps, focal_gamma=gamma)
        rows = _info_nce(q, all_k, positives=pos, scale=s, bias=b, reduction="sum", backend=be,
                         exact=exact, **shaping)
        cols = _info_nce(k, all_q, positives=pos, scale=s, bias=b, reduction="sum", backend=be,
                         exact=exact, **shaping)
        contribution = (rows + cols) * norm
    else:
        rows, cols, _ = _ring(q, k, s, b, None, kind="softmax", symmetric=True, exact=exact,
                              backend=be, group=group)
        rows = _shaped(rows, q, k, None, s, eps, gamma, group)
        cols = _shaped(cols, k, q, None, s, eps, gamma, group)
        contribution = (rows.sum() + cols.sum()) * norm
    return _global_value(contribution, group)


def _shaped(rows: Tensor, q: Tensor, k: Tensor, positives: Optional[Tensor], s: Tensor,
            eps: float, gamma: float, group, extra_sum: Optional[Tensor] = None,
            extra_count: int = 0) -> Tensor:
    """The ring's rows (n,) (global LSEs) with label smoothing or focal weighting: the smoothing
    term ``S_{i,p(i)} - mean_j S_ij`` over every rank's keys, s <q_i, k_p(i) - k_mean>, the mean
    from the ranks' key sums (all-gathered with their gradient); ``extra_sum`` (n, D) /
    ``extra_count``: each row's private negatives in its mean too."""
    if eps:
        sums = all_gather_with_grad(k.sum(0, dtype=_stat_dtype(q))[None], group)
        rows = rows + eps * _smoothing_term(q, k, positives, s, extra_sum, extra_count,
                                            totals=(sums.sum(0), sums.shape[0] * k.shape[0]))
    if gamma:
        rows = _focal(rows, gamma)
    return rows


def info_nce(queries: Tensor, keys: Tensor, *, positives: Optional[Tensor] = None,
             scale=1.0 / 0.07, bias=None, mode: str = "ring", group=None, reduction: str = "mean",
             backend: str = "auto", exact: bool = False, check_sizes: bool = True,
             label_smoothing: float = 0.0, focal_gamma: float = 0.0,
             hard_negatives: Optional[Tensor] = None) -> Tensor:
    """One-way InfoNCE of the global batch: every local query against the keys of every rank.

    Args:
        queries: (n, D) local queries; keys: (m, D) local keys (e.g. n positives then hard
            negatives), the same n and m on every rank.
        positives: (n,) index of each query's positive in its own rank's key block; default
            ``arange(n)`` (needs m >= n). Keys of other ranks are negatives.
        scale, bias, label_smoothing, focal_gamma: as :func:`fastcl.info_nce` (the smoothing's
            uniform part over every rank's keys); mode, group, reduction, check_sizes: as
            :func:`clip_loss`. "mean" divides the global sum by N = W * n.
        hard_negatives: optional (n, h, D) private negatives of each local query, merged into
            its global LSE (the ring: from the rows' statistics over every rank's keys,
            :func:`_ring_sweep`, on the engines with separate gradients of the statistics).
    """
    eps, gamma = _shaping(label_smoothing, focal_gamma)
    q, k, s, b, be = _setup("queries", queries, "keys", keys, "scale", scale, "bias", bias,
                            mode=mode, reduction=reduction, group=group, check_sizes=check_sizes,
                            backend=backend)
    if hard_negatives is not None:
        _check_hard_negatives(hard_negatives, queries)
    W, r = _world(group)
    n, m = q.shape[0], k.shape[0]
    if positives is None:
        if m < n:
            raise ValueError(f"keys must have at least as many rows as queries on each rank when "
                             f"positives is None, got n={n} queries and m={m} keys")
    else:
        positives = _check_index("positives", positives, n, m, "indices into this rank's keys", q.device)
    norm = 1.0 / (W * n) if reduction == "mean" else 1.0
    if mode == "gather":
        from .losses import info_nce as _info_nce
        all_k = all_gather_with_grad(k, group)
        local = positives if positives is not None else torch.arange(n, device=q.device)
        rows = _info_nce(q, all_k, positives=local + r * m, scale=s, bias=b, reduction="sum",
                         backend=be, exact=exact, label_smoothing=eps, focal_gamma=gamma,
                         hard_negatives=hard_negatives)
        contribution = rows * norm
    else:
        extra = None
        if hard_negatives is None:
            rows, _, _ = _ring(q, k, s, b, positives, kind="softmax", symmetric=False,
                               exact=exact, backend=be, group=group)
        else:  # the rows' global statistics, differentiable, then their private negatives
            local = positives if positives is not None else torch.arange(n, device=q.device)
            st = _ring_sweep(group)(q, k, s, b, Targets(positives=local + r * m),
                                    LossSpec(kind="softmax", exact=exact, offset=r * m), be)
            rows, extra = _with_hard_negatives(st, q, hard_negatives, s, b)
        rows = _shaped(rows, q, k, positives, s, eps, gamma, group, extra,
                       0 if hard_negatives is None else hard_negatives.shape[1])
        contribution = rows.sum() * norm
    return _global_value(contribution, group)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, *,
                labels: Optional[Tensor] = None, mode: str = "ring", group=None,
                reduction: str = "mean", backend: str = "auto", exact: bool = False,
                check_sizes: bool = True) -> Tensor:
    """SigLIP pairwise sigmoid loss of the global batch ``-(1/N) sum_ij log sigmoid(z_ij S_ij)``
    (z = +1 on the global diagonal, or with ``labels`` wherever the classes match, on any rank).
    No statistics to merge: each rank sums its images' rows over every text block. ``labels``:
    (n,) class ids of this rank's pairs (gathered in gather mode, travelling with the text blocks
    in the ring); other arguments as :func:`clip_loss`; "mean" divides by N = W * n.

    With gradients asked for and an engine that takes a step for the closure (Triton; the C++
    kernels on CPU tensors), the forward forms the gradients too (:class:`_RingStep` in the
    ring: one sweep per text block and one ring, each block's dK travelling home with it; in
    gather mode :class:`fastcl.autograd.EngineRowTotal`'s step), and the backward only scales
    them."""
    q, k, s, b, be = _setup("image_features", image_features, "text_features", text_features,
                            "logit_scale", logit_scale, "logit_bias", logit_bias, mode=mode,
                            reduction=reduction, group=group, check_sizes=check_sizes, backend=backend,
                            paired=True)
    if labels is not None:
        labels = _check_labels("labels", labels, q.shape[0], q.device)
    W, _ = _world(group)
    norm = 1.0 / (W * q.shape[0]) if reduction == "mean" else 1.0
    return _global_value(_siglip_total(q, k, s, b, mode=mode, exact=exact, backend=be,
                                       group=group, weight=norm, labels=labels), group)


def _siglip_total(q: Tensor, k: Tensor, s: Tensor, b: Optional[Tensor], *, mode: str, exact: bool,
                  backend: str, group, weight: float, labels: Optional[Tensor] = None) -> Tensor:
    """``weight * sum_i L_i`` (0-d) of this rank's images (n, D) against every rank's texts
    (paired: the positive on the global diagonal, or the texts of the image's class with
    ``labels`` (n,)) in ``mode``; gradients as :class:`_RingLoss`'s. With gradients asked for, a
    step where the engine takes one (:class:`_RingStep`; in gather mode
    :class:`fastcl.autograd.EngineRowTotal`'s)."""
    spec = LossSpec(kind="sigmoid", exact=exact)
    if mode == "gather":
        all_k = all_gather_with_grad(k, group)
        if labels is not None:
            targets = Targets(row_labels=labels, col_labels=_gather_plain(labels, group))
        else:
            targets = Targets(positives=torch.arange(q.shape[0], device=q.device)
                              + _world(group)[1] * q.shape[0])
        return engine_row_total(q, all_k, s, b, targets, spec, backend, weight=weight)[0]
    block = Targets() if labels is None else Targets(row_labels=labels, col_labels=labels)
    eng, backend = _engine(backend, spec, block)
    if grads_asked(q, k, s, b) and step_of(eng, q, spec, block) is not None:
        return _RingStep.apply(q, k, s, b, (spec, backend, group, weight, labels))
    rows, _, _ = _ring(q, k, s, b, None, kind="sigmoid", symmetric=False, exact=exact,
                       backend=backend, group=group, labels=labels)
    return rows.sum() * weight


def _gather_plain(x: Tensor, group) -> Tensor:
    """All-gather of a tensor without a gradient (labels): (n, ...) -> (W * n, ...), rank order."""
    parts = [torch.empty_like(x) for _ in range(_world(group)[0])]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def _self_similarity_rows(rows: Tensor, labels: Optional[Tensor], positives: Optional[Tensor],
                          temperature, variant: str, group, reduction: str, backend: str,
                          exact: bool, mode: str) -> Tensor:
    """The global SupCon loss of every rank's ``rows`` (R, D) (normalised, the kernels' dtype):
    this rank's rows against the rows of all ranks, each row's own copy left out, averaged over
    the rows with a positive on any rank. Positives: the rows of the same class (``labels`` (R,))
    on any rank, or the local row ``positives`` (R,) (NT-Xent's other view).

    Gather: the rows and labels of all ranks gathered in rank order (``self_offset``). Ring:
    :class:`_RingLoss` with ``rows`` as both queries and keys, the labels travelling with the
    blocks, the own entry left out on the diagonal block."""
    r = _world(group)[1]
    be = _backend.resolve(backend, rows.device, rows.dtype)
    if mode == "ring":
        s = _sync_scalar(_temperature_scale(temperature, rows), group)
        per, _, npos = _ring(rows, rows, s, None, positives,
                             labels=None if positives is not None else labels, exact=exact,
                             backend=be, group=group, exclude_self=True, variant_in=variant == "in",
                             mirror=positives is not None and variant == "out")
        valid = npos > 0
    else:
        from .losses import supcon as _supcon
        if isinstance(temperature, Tensor):
            temperature = _sync_scalar(temperature, group)
        keys = all_gather_with_grad(rows, group)
        key_labels = _gather_plain(labels, group)
        per, valid = _supcon(rows, labels, temperature, variant=variant, keys=keys,
                             key_labels=key_labels, self_offset=r * rows.shape[0], normalize=False,
                             reduction="none", backend=be, exact=exact, return_valid=True)
    contribution = per.sum()
    if reduction == "mean":
        count = valid.sum().to(contribution.dtype)
        dist.all_reduce(count, group=group)  # (on the device: no host synchronisation)
        contribution = contribution / count.clamp(min=1)
    return _global_value(contribution, group)


def nt_xent(z1: Tensor, z2: Tensor, temperature=0.5, *, normalize: bool = True,
            mode: str = "gather", group=None, reduction: str = "mean", backend: str = "auto",
            exact: bool = False, check_sizes: bool = True) -> Tensor:
    """SimCLR NT-Xent of the global batch: :func:`fastcl.nt_xent` of every rank's views
    concatenated in rank order (N = W * n pairs, 2N rows), from each rank's local pairs.

    Each rank's 2n rows ``[z1; z2]`` (normalised first when ``normalize``) are taken against the
    2N rows of all ranks, their own left out, the other view the positive. Gather mode: the rows
    are all-gathered with their gradient (SupCon L_out with instance labels, one fused sweep).
    Ring mode: the row blocks travel round the ring as :func:`clip_loss`'s key blocks do (the
    positive lies in the own block), so no rank holds more than two blocks: O(n D) per rank.
    The ring uses the Gram matrix's symmetry: each tile of two ranks' blocks is swept once,
    symmetric, by one of them (W // 2 + 1 tiles per rank instead of W, forward and backward).

    Args:
        z1, z2: (n, D) the local pairs' two views (the same n on every rank).
        temperature: float or one-element tensor (its gradient is the single-process one on
            every rank).
        mode: "gather" | "ring".
        reduction: "mean" over the 2N rows | "sum"; group, backend, exact, check_sizes: as
            :func:`clip_loss`.
    Returns:
        the global loss (same value on every rank); gradients follow the averaging convention of
        this module's docstring. Without an initialised process group, :func:`fastcl.nt_xent`.
    """
    _check_mode(mode, reduction)
    if _world(group)[0] == 1:
        from .losses import nt_xent as _nt_xent
        return _nt_xent(z1, z2, temperature, normalize=normalize, reduction=reduction,
                        backend=backend, exact=exact)
    rows, positives, _ = _two_views(z1, z2, normalize, backend)
    n = z1.shape[0]
    if check_sizes:
        _check_sizes("z1", n, group, z1.device)
    if mode == "ring":
        labels = None
    else:  # (instance ids: the other view's row is the one of the same id, on this rank)
        labels, positives = torch.arange(n, device=rows.device).repeat(2) + _world(group)[1] * n, None
    return _self_similarity_rows(rows, labels, positives, temperature, "out", group, reduction,
                                 backend, exact, mode)


def supcon(features: Tensor, labels: Tensor, temperature=0.1, *, variant: str = "out",
           normalize: bool = True, mode: str = "gather", group=None, reduction: str = "mean",
           backend: str = "auto", exact: bool = False, check_sizes: bool = True) -> Tensor:
    """Supervised contrastive loss of the global batch: :func:`fastcl.supcon` of every rank's
    samples concatenated in rank order, from each rank's local samples.

    Each rank's rows (its V views, view-major, normalised first when ``normalize``) are taken
    against the rows of every rank, their own left out; positives are the rows of the same class
    on any rank. Gather mode: the rows (with their gradient) and labels are all-gathered (one
    fused sweep). Ring mode: the row blocks travel round the ring with their labels, O(n V D)
    per rank; with float32 features and IEEE products (``exact``, or the torch and CPU backends)
    the blocks go round once more in the backward, to correct the rows whose positives dominate
    their softmax (:func:`fastcl.ops.correct_line_totals`) once each line's sums are known.

    Args:
        features: (n, D) or (n, V, D), the same n and V on every rank; labels: (n,) class ids,
            global (the same class has the same id on every rank).
        variant: "out" | "in", as :func:`fastcl.supcon`.
        reduction: "mean" over the rows of every rank that have a positive (their number summed
            on the device, no host synchronisation) | "sum". Other arguments as :func:`nt_xent`.
    Returns:
        the global loss (same value on every rank). Without an initialised process group,
        :func:`fastcl.supcon`.
    """
    _check_mode(mode, reduction)
    if variant not in ("out", "in"):
        raise ValueError(f"variant must be 'out' or 'in', got {variant!r}")
    if _world(group)[0] == 1:
        from .losses import supcon as _supcon
        return _supcon(features, labels, temperature, variant=variant, normalize=normalize,
                       reduction=reduction, backend=backend, exact=exact)
    views, row_labels = _views_flat("features", features, labels, "labels")
    if check_sizes:  # (samples times views: the rows each rank gathers)
        _check_sizes("features", row_labels.shape[0], group, row_labels.device)
    rows = _stack_rows(views, normalize, _cast_dtype(views[0]))
    return _self_similarity_rows(rows, row_labels, None, temperature, variant, group, reduction,
                                 backend, exact, mode)


def _gatherer(group):
    """A sweep of the family's row formulas (``sweep`` of :func:`fastcl.losses._hcl_rows`):
    :func:`fastcl.autograd.engine_statistics` of the rows against every rank's keys,
    all-gathered in rank order with their gradient, each keys tensor once per loss."""
    gathered = []  # (keys, every rank's keys)

    def sweep(queries, keys, *args):
        found = [g for k, g in gathered if k is keys]
        if not found:
            found = [all_gather_with_grad(keys, group)]
            gathered.append((keys, found[0]))
        return engine_statistics(queries, found[0], *args)
    return sweep


def _sweeper(mode: str, group):
    """The family's sweep of every rank's keys in ``mode``: :func:`_gatherer` or
    :func:`_ring_sweep`."""
    return _gatherer(group) if mode == "gather" else _ring_sweep(group)


def _global_reduce(per: Tensor, count: int, reduction: str, group) -> Tensor:
    """The global loss from this rank's per-row losses: their sum over every rank ("sum") or
    divided by the global number of rows ``count`` ("mean"), by :func:`_global_value`."""
    contribution = per.sum() / count if reduction == "mean" else per.sum()
    return _global_value(contribution, group)


def _rank_slice(x: Tensor, group) -> Tensor:
    """This rank's slice of a tensor gathered in rank order."""
    W, r = _world(group)
    n = x.shape[0] // W
    return x[r * n:(r + 1) * n]


def dcl(z1: Tensor, z2: Tensor, temperature=0.1, *, weight_sigma: Optional[float] = None,
        normalize: bool = True, mode: str = "gather", group=None, reduction: str = "mean",
        backend: str = "auto", exact: bool = False, check_sizes: bool = True) -> Tensor:
    """Decoupled contrastive loss of the global batch: :func:`fastcl.dcl` of every rank's views
    concatenated in rank order (N = W * n pairs, 2N rows), from each rank's local pairs.

    Each rank's 2n rows are taken against the 2N rows of all ranks, their own and their other
    view (the positive) left out of the LSE: each view's rows against every rank's rows of
    either view, four sweeps that each leave out only the band of the rows' own index, so
    their interior tiles take the lean path (gather: each view's rows all-gathered once with
    their gradient; ring: each view's row blocks travel, O(n D) per rank). DCLW
    (``weight_sigma``): the weights' softmax runs over the N pairs of every rank (their cosines
    all-gathered, (N,)). Arguments as :func:`nt_xent`; "mean" divides by 2N.
    """
    _check_mode(mode, reduction)
    if _world(group)[0] == 1:
        from .losses import dcl as _dcl
        return _dcl(z1, z2, temperature, weight_sigma=weight_sigma, normalize=normalize,
                    reduction=reduction, backend=backend, exact=exact)
    if weight_sigma is not None:
        weight_sigma = _real("weight_sigma", weight_sigma, "a float or None", low=0.0)
    rows, _, be = _two_views(z1, z2, normalize, backend)
    n, R = z1.shape[0], rows.shape[0]
    W, r = _world(group)
    if check_sizes:
        _check_sizes("z1", n, group, z1.device)
    s = _sync_scalar(_temperature_scale(temperature, rows), group)
    weights = None
    if weight_sigma is not None:  # the softmax over every rank's pairs
        cos = all_gather_with_grad(_row_dots(rows[:n], rows[n:]), group)
        w = _rank_slice(_dclw_weights(cos, weight_sigma), group)
        weights = torch.cat([w, w])
    per = _dcl_rows(rows, s, weights, be, exact, sweep=_sweeper(mode, group), offset=r * n)
    return _global_reduce(per, W * R, reduction, group)


def hcl(z1: Tensor, z2: Tensor, temperature: float = 0.5, *, beta: float = 1.0,
        tau_plus: float = 0.1, normalize: bool = True, mode: str = "gather", group=None,
        reduction: str = "mean", backend: str = "auto", exact: bool = False,
        check_sizes: bool = True) -> Tensor:
    """Hard-negative contrastive loss of the global batch: :func:`fastcl.hcl` of every rank's
    views concatenated in rank order (N = W * n pairs, 2N rows; each row's 2N - 2 negatives on
    every rank), from each rank's local pairs: each rank's rows against the all-gathered rows
    (with their gradient), or the row blocks travelling round the ring (:func:`_ring_sweep`),
    both LSEs from one fused sweep. Other arguments as :func:`fastcl.hcl` and :func:`nt_xent`;
    "mean" divides by 2N.
    """
    _check_mode(mode, reduction)
    if _world(group)[0] == 1:
        from .losses import hcl as _hcl
        return _hcl(z1, z2, temperature, beta=beta, tau_plus=tau_plus, normalize=normalize,
                    reduction=reduction, backend=backend, exact=exact)
    temperature, beta, tau_plus = _hcl_params(temperature, beta, tau_plus)
    rows, positives, be = _two_views(z1, z2, normalize, backend)
    n, R = z1.shape[0], rows.shape[0]
    W, r = _world(group)
    if check_sizes:
        _check_sizes("z1", n, group, z1.device)
    per = _hcl_rows(rows, positives, temperature, beta, tau_plus, W * R - 2, be, exact,
                    sweep=_sweeper(mode, group), offset=r * R)
    return _global_reduce(per, W * R, reduction, group)


def mv_infonce(features: Tensor, temperature=0.1, *, normalize: bool = True,
               mode: str = "gather", group=None, reduction: str = "mean", backend: str = "auto",
               exact: bool = False, check_sizes: bool = True) -> Tensor:
    """MV-InfoNCE of the global batch: :func:`fastcl.mv_infonce` of every rank's instances
    concatenated in rank order (B = W * b instances of V views), from each rank's local
    instances (b, V, D). Gather: each view's local rows against each view's all-gathered rows
    (with their gradient), each sweep leaving out the rows' own instance, as
    :func:`fastcl.mv_infonce` does in one process (V > 2 views; two views: the V*b rows against
    all, one sweep). Ring: the row blocks travel round the ring, one fused sweep of the V*b rows
    (the instances as labels), so that a block goes round once. "mean" divides by B. Other
    arguments as :func:`fastcl.mv_infonce` and :func:`nt_xent`.
    """
    _check_mode(mode, reduction)
    if _world(group)[0] == 1:
        from .losses import mv_infonce as _mv_infonce
        return _mv_infonce(features, temperature, normalize=normalize, reduction=reduction,
                           backend=backend, exact=exact)
    b, V = _check_multi_view(features)
    views = torch.unbind(features, dim=1)
    W, r = _world(group)
    if check_sizes:
        _check_sizes("features", b, group, features.device)
    rows = _stack_rows(views, normalize, _cast_dtype(features))
    be = _backend.resolve(backend, rows.device, rows.dtype)
    s = _sync_scalar(_temperature_scale(temperature, rows), group)
    key_ids = view_offset = None
    if V > 2 and mode == "gather":  # each view gathered once, swept against each view's rows
        view_offset = r * b
    elif V > 2:  # rank k's rows: its instances k b .. k b + b - 1, view-major
        key_ids = (torch.arange(b, device=rows.device).repeat(W * V)
                   + (torch.arange(W, device=rows.device) * b).repeat_interleave(V * b))
    per = _mv_infonce_rows(rows, b, V, s, be, exact, sweep=_sweeper(mode, group),
                           offset=r * V * b, key_ids=key_ids, view_offset=view_offset)
    return _global_reduce(per, W * b, reduction, group)


def mv_dhel(features: Tensor, temperature=0.1, *, normalize: bool = True, mode: str = "gather",
            group=None, reduction: str = "mean", backend: str = "auto", exact: bool = False,
            check_sizes: bool = True) -> Tensor:
    """MV-DHEL of the global batch: :func:`fastcl.mv_dhel` of every rank's instances
    concatenated in rank order (B = W * b instances of V views), from each rank's local
    instances (b, V, D): each view's local rows against that view's all-gathered rows (with
    their gradient), one fused sweep per view; each instance's alignment term stays on its rank.
    In ring mode each view's blocks travel. "mean" divides by B. Other arguments as
    :func:`mv_infonce`.
    """
    _check_mode(mode, reduction)
    if _world(group)[0] == 1:
        from .losses import mv_dhel as _mv_dhel
        return _mv_dhel(features, temperature, normalize=normalize, reduction=reduction,
                        backend=backend, exact=exact)
    b, V = _check_multi_view(features)
    W, r = _world(group)
    if check_sizes:
        _check_sizes("features", b, group, features.device)
    if W * b < 2:
        raise ValueError(f"mv_dhel needs at least 2 instances over all ranks, got {W * b}")
    dt = _cast_dtype(features)
    views = [_stack_rows([v], normalize, dt) for v in torch.unbind(features, dim=1)]
    be = _backend.resolve(backend, views[0].device, views[0].dtype)
    s = _sync_scalar(_temperature_scale(temperature, views[0]), group)
    per = _mv_dhel_rows(views, s, be, exact, sweep=_sweeper(mode, group), offset=r * b)
    return _global_reduce(per, W * b, reduction, group)


def uniformity_loss(x: Tensor, t: float = 2.0, *, normalize: bool = True, mode: str = "gather",
                    group=None, backend: str = "auto", exact: bool = False,
                    check_sizes: bool = True) -> Tensor:
    """Uniformity of the global batch: :func:`fastcl.uniformity_loss` of every rank's rows
    concatenated (N = W * n), from each rank's local rows x (n, D): each rank's rows against the
    all-gathered rows (with their gradient) give their LSEs, and the global LSE of all N runs
    over them all-gathered ((N,) values); in ring mode the row blocks travel instead of being
    gathered. Returns the global value on every rank, its gradient under the averaging
    convention of this module's docstring.
    """
    _check_mode(mode, "mean")
    if _world(group)[0] == 1:
        from .losses import uniformity_loss as _uniformity
        return _uniformity(x, t, normalize=normalize, backend=backend, exact=exact)
    _check_features("x", x)
    t = _real("t", t, "a float (uniformity takes no tensor t)", low=0.0)
    W, r = _world(group)
    n = x.shape[0]
    if check_sizes:
        _check_sizes("x", n, group, x.device)
    N = W * n
    if N < 2:
        raise ValueError(f"uniformity needs at least 2 rows over all ranks, got {N}")
    x = _stack_rows([x], normalize, _cast_dtype(x))
    be = _backend.resolve(backend, x.device, x.dtype)
    terms = _uniformity_terms(x, t, normalize, be, exact, sweep=_sweeper(mode, group),
                              offset=r * n)
    # every rank forms the global value; the gathered terms' gradient, summed over the ranks,
    # is W times the single-process one (the averaging convention)
    return torch.logsumexp(all_gather_with_grad(terms, group), 0) - math.log(N * (N - 1))
