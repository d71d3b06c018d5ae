"""lightly drop-ins: ``NTXentLoss`` (SimCLR; MoCo with a memory bank), ``DirectCLRLoss``,
``DCLLoss``, ``DCLWLoss``, ``MACLLoss`` and ``HypersphereLoss``, with lightly's constructors,
``forward(out0, out1)`` and numbers, on the fused engine. lightly itself is not imported.

* ``NTXentLoss(temperature, memory_bank_size=0, gather_distributed=False)``: without a memory bank,
  each of the 2n local rows (both views, L2-normalised) against the 2m columns of both views
  (m = n, or every rank's n with ``gather_distributed``), its own column left out, its other view
  the target: one process, :func:`fastcl.nt_xent`; gathered, two fused sweeps over one key
  tensor. With a memory bank ((size, dim)), each row of ``out0`` against its ``out1`` row and the
  bank's entries (one sweep over the bank); the bank is a first-in first-out queue of past
  ``out1`` rows (every rank's with ``gather_distributed``), as lightly's ``MemoryBankModule``,
  updated when ``out0`` requires a gradient. Its write position is kept on the host (no device
  synchronisation).
* ``DCLLoss(temperature, weight_fn=None, gather_distributed=False)``: decoupled contrastive
  learning, ``(1/2)(L(out0, out1) + L(out1, out0))`` with L's negatives both views' columns except
  the row's own and its positive, the positive term weighted by ``weight_fn(out0, out1)``
  (normalised views) when given. One process: :func:`fastcl.dcl`'s three lean sweeps (each
  view against itself, the views against each other) give both directions' negatives;
  ``gather_distributed``: one fused sweep per view against every rank's rows.
* ``DCLWLoss(temperature, sigma, gather_distributed=False)``: ``DCLLoss`` with lightly's negative
  von Mises-Fisher weights ``2 - n softmax(<out0_i, out1_i> / sigma)``, constants as lightly
  builds them (:func:`fastcl.dcl` with ``weight_sigma`` keeps them differentiable instead).
* ``DirectCLRLoss(loss_dim, temperature, memory_bank_size, gather_distributed)``: ``NTXentLoss``
  on the first ``loss_dim`` values of each flattened encoding.
* ``MACLLoss(temperature, alpha, A_0)``: model-aware contrastive learning, NT-Xent at the
  temperature ``temperature (1 + alpha (A - A_0))`` (A the batch's mean positive cosine, no
  gradient), each row's loss weighted by the constant ``1 / (1 - P_i + 1e-8)``, P_i its positive's
  probability: one fused sweep (:func:`fastcl.nt_xent`).
* ``HypersphereLoss(t, lam, alpha)``: alignment ``mean |x_i - y_i|^alpha`` plus ``lam`` times the
  mean of the two views' uniformities ``log mean_{i<j} exp(-t |x_i - x_j|^2)``, each one fused
  sweep (:func:`fastcl.uniformity_loss`) instead of ``torch.pdist``'s n(n-1)/2 distances.

``exact``: float32 features' products in IEEE arithmetic; by default as torch's float32 matmul
precision allows (:func:`fastcl.integrations._common.exact_products`), as lightly's own einsums.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as fdist
from ..losses import alignment_loss, nt_xent, uniformity_loss
from ..losses import _dcl_negatives, _prepare
from ._common import _scale, exact_products, positive_against, row_gap, statistics

Tensor = torch.Tensor

__all__ = ["NTXentLoss", "DirectCLRLoss", "DCLLoss", "DCLWLoss", "MACLLoss", "HypersphereLoss",
           "MemoryBank"]


def _check_views(out0: Tensor, out1: Tensor) -> None:
    for name, x in (("out0", out0), ("out1", out1)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a (batch_size, dim) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if out0.shape != out1.shape:
        raise ValueError(f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and "
                         f"{tuple(out1.shape)}")
    if out0.shape[0] == 0:
        raise ValueError("out0 and out1 hold no rows")


def _gathered(out0: Tensor, out1: Tensor, gather: bool) -> Tuple[Tensor, Tensor, int]:
    """(every rank's out0, every rank's out1, this rank's row offset), differentiable."""
    W, r = fdist._world(None)
    if not gather or W == 1:
        return out0, out1, 0
    return fdist.all_gather_with_grad(out0), fdist.all_gather_with_grad(out1), r * out0.shape[0]


def _concat_all_gather(x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class MemoryBank(nn.Module):
    """lightly's ``MemoryBankModule`` (features last): a (size, dim) queue of past rows,
    initialised with random unit rows; ``forward(output, update)`` returns ``(output, a detached
    copy of the bank before this update)``, or ``(output, None)`` for size 0."""

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False):
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if any(x < 0 for x in size_tuple):
            raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
        if isinstance(size, int) and size > 0:
            raise ValueError(f"Memory bank size 'size={size}' does not specify the feature dimension. "
                             f"Set it with 'size=({size}, dim)', or pass 'size=0' to disable the "
                             "memory bank.")
        if size_tuple != (0,) and len(size_tuple) != 2:
            raise ValueError(f"Illegal memory bank size {size}, expected a (num_features, dim) tuple, "
                             "or 'size=0' to disable the memory bank.")
        self.size, self.gather_distributed = size_tuple, gather_distributed
        bank = torch.empty(size_tuple, dtype=torch.float)
        if len(size_tuple) > 1:
            bank = nn.functional.normalize(torch.randn(size_tuple), dim=-1)
        self.register_buffer("bank", bank, persistent=False)
        self.ptr = 0  # the next row to overwrite (on the host)

    def forward(self, output: Tensor, update: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if self.size[0] == 0:
            return output, None
        bank = self.bank.clone().detach()
        if update:
            self._enqueue(output)
        return output, bank

    @torch.compiler.disable  # (host-side state: a compiled caller runs it eagerly, no recompiles)
    @torch.no_grad()
    def _enqueue(self, batch: Tensor) -> None:
        if self.gather_distributed and fdist._world(None)[0] > 1:
            batch = _concat_all_gather(batch)
        size, n, ptr = self.size[0], batch.shape[0], self.ptr
        if ptr + n >= size:
            self.bank[ptr:] = batch[:size - ptr].detach()
            self.ptr = 0
        else:
            self.bank[ptr:ptr + n] = batch.detach()
            self.ptr = ptr + n


class NTXentLoss(nn.Module):
    """lightly ``NTXentLoss``: ``forward(out0, out1)``, projections (batch_size, dim) of two views."""

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, backend: str = "auto",
                 exact: Optional[bool] = None):
        super().__init__()
        if not math.isfinite(temperature) or abs(temperature) < 1e-8:
            raise ValueError("Illegal temperature: abs({}) < 1e-8".format(temperature))
        if temperature < 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.memory_bank = MemoryBank(memory_bank_size, gather_distributed)
        self.temperature, self.gather_distributed = temperature, gather_distributed
        self.backend, self.exact = backend, exact

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        _check_views(out0, out1)
        out0 = nn.functional.normalize(out0, dim=1)
        out1 = nn.functional.normalize(out1, dim=1)
        out1, negatives = self.memory_bank(out1, update=out0.requires_grad)
        ex = exact_products(self.exact)
        scale = 1.0 / self.temperature
        if negatives is not None:  # the positive and the bank's entries
            return positive_against(out0, out1, negatives, scale, backend=self.backend,
                                    exact=ex).mean()
        z0, z1, offset = _gathered(out0, out1, self.gather_distributed)
        if z0 is out0:  # one process: the two views' self-similarity, one symmetric sweep
            return nt_xent(out0, out1, self.temperature, normalize=False, backend=self.backend,
                           exact=ex)
        n, m = out0.shape[0], z0.shape[0]
        keys = torch.cat([z0, z1])  # both views' columns
        own = torch.arange(n, device=out0.device) + offset
        rows0 = row_gap(out0, keys, scale, own + m, exclude_offset=offset, backend=self.backend,
                        exact=ex)
        rows1 = row_gap(out1, keys, scale, own, exclude_offset=m + offset, backend=self.backend,
                        exact=ex)
        return torch.cat([rows0, rows1]).mean()


class DirectCLRLoss(NTXentLoss):
    """lightly ``DirectCLRLoss``: :class:`NTXentLoss` on the first ``loss_dim`` values of each
    flattened encoding."""

    def __init__(self, loss_dim: int = 64, temperature: float = 0.5,
                 memory_bank_size: Union[int, Sequence[int]] = 0, gather_distributed: bool = False,
                 *, backend: str = "auto", exact: Optional[bool] = None):
        super().__init__(temperature, memory_bank_size, gather_distributed, backend=backend,
                         exact=exact)
        if not isinstance(loss_dim, int) or loss_dim < 1:
            raise ValueError(f"loss_dim must be a positive int, got {loss_dim!r}")
        self.loss_dim = loss_dim

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return super().forward(out0.flatten(start_dim=1)[:, :self.loss_dim],
                               out1.flatten(start_dim=1)[:, :self.loss_dim])


class MACLLoss(nn.Module):
    """lightly ``MACLLoss``: ``forward(z0, z1)``, model-aware contrastive learning (Huang et al.
    2023)."""

    def __init__(self, temperature: float = 0.1, alpha: float = 0.5, A_0: float = 0.0, *,
                 backend: str = "auto", exact: Optional[bool] = None):
        super().__init__()
        if not math.isfinite(temperature) or temperature < 1e-8:
            raise ValueError(f"Illegal initial temperature: abs({temperature}) < 1e-8")
        if not 0 <= alpha <= 1:
            raise ValueError("Alpha must be in the range [0, 1].")
        if not 0 <= A_0 <= 1:
            raise ValueError("A_0 must be in the range [0, 1].")
        self.temperature, self.alpha, self.A_0 = temperature, alpha, A_0
        self.backend, self.exact = backend, exact

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        _check_views(z0, z1)
        z0, z1 = nn.functional.normalize(z0, dim=-1), nn.functional.normalize(z1, dim=-1)
        with torch.no_grad():  # the alignment A sets the temperature, without a gradient
            dt = torch.float64 if z0.dtype == torch.float64 else torch.float32
            A = (z0.to(dt) * z1.to(dt)).sum(1).mean()
            t = self.temperature * (1 + self.alpha * (A - self.A_0))
        rows = nt_xent(z0, z1, t, normalize=False, reduction="none", backend=self.backend,
                       exact=exact_products(self.exact))
        weight = 1.0 / (-torch.expm1(-rows.detach()) + 1e-8)  # 1 / (1 - P + eps)
        return (weight * rows).mean()


class HypersphereLoss(nn.Module):
    """lightly ``HypersphereLoss``: ``forward(z_a, z_b)``, alignment and uniformity on the unit
    sphere (Wang & Isola 2020)."""

    def __init__(self, t: float = 1.0, lam: float = 1.0, alpha: float = 2.0, *,
                 backend: str = "auto", exact: Optional[bool] = None):
        super().__init__()
        self.t, self.lam, self.alpha = t, lam, alpha
        self.backend, self.exact = backend, exact

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        _check_views(z_a, z_b)
        ex = exact_products(self.exact)
        unif = [uniformity_loss(z, self.t, backend=self.backend, exact=ex) for z in (z_a, z_b)]
        return alignment_loss(z_a, z_b, self.alpha) + self.lam * (unif[0] + unif[1]) / 2.0


class DCLLoss(nn.Module):
    """lightly ``DCLLoss``: ``forward(out0, out1)``, projections (batch_size, dim) of two views."""

    def __init__(self, temperature: float = 0.1,
                 weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False, *, backend: str = "auto",
                 exact: Optional[bool] = None):
        super().__init__()
        if not math.isfinite(temperature) or temperature == 0:
            raise ValueError(f"temperature must be a finite non-zero number, got {temperature}")
        self.temperature, self.weight_fn = temperature, weight_fn
        self.gather_distributed = gather_distributed
        self.backend, self.exact = backend, exact

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        _check_views(out0, out1)
        out0 = nn.functional.normalize(out0, dim=1)
        out1 = nn.functional.normalize(out1, dim=1)
        z0, z1, offset = _gathered(out0, out1, self.gather_distributed)
        if z0 is out0:  # one process: both directions' negatives from fastcl.dcl's lean sweeps
            q, k, be = _prepare(out0, out1, self.backend)
            neg, lo = _dcl_negatives(q, k, _scale(out0, 1.0 / self.temperature), be,
                                     exact_products(self.exact))
            n = out0.shape[0]
            return 0.5 * (self._mean(out0, out1, neg[:n] + lo[:n])
                          + self._mean(out1, out0, neg[n:] + lo[n:]))
        return 0.5 * (self._loss(out0, out1, z0, z1, offset) + self._loss(out1, out0, z1, z0, offset))

    def _loss(self, a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor, offset: int) -> Tensor:
        """mean_i [-<a_i, b_i> w_i / t + LSE over a_all and b_all but a_i and b_i]."""
        n, m = a.shape[0], a_all.shape[0]
        scale = 1.0 / self.temperature
        ex = exact_products(self.exact)
        own = torch.arange(n, device=a.device) + offset
        # the LSE over both views' columns but the row's own (i + offset) and its positive
        neg = statistics(a, torch.cat([a_all, b_all]), scale, own + m, backend=self.backend, exact=ex,
                         exclude_self=True, offset=offset, exclude_targets=True).row_lse
        return self._mean(a, b, neg)

    def _mean(self, a: Tensor, b: Tensor, neg: Tensor) -> Tensor:
        """mean_i [-<a_i, b_i> w_i / t + neg_i] for the rows' LSEs over their negatives neg."""
        positive = -(1.0 / self.temperature) * (a.to(neg.dtype) * b.to(neg.dtype)).sum(1)
        if self.weight_fn is not None:
            positive = positive * self.weight_fn(a, b)
        return (positive + neg).mean()


def _von_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float) -> Tensor:
    """lightly's negative von Mises-Fisher weights ``2 - n softmax(<out0_i, out1_i> / sigma)``,
    without a gradient (lightly copies them into a new tensor)."""
    with torch.no_grad():
        similarity = (out0 * out1).sum(1) / sigma
        return 2 - out0.shape[0] * nn.functional.softmax(similarity, dim=0)


class DCLWLoss(DCLLoss):
    """lightly ``DCLWLoss``: ``DCLLoss`` with the negative von Mises-Fisher weights."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False,
                 *, backend: str = "auto", exact: Optional[bool] = None):
        if not math.isfinite(sigma) or sigma == 0:
            raise ValueError(f"sigma must be a finite non-zero number, got {sigma}")
        super().__init__(temperature, lambda a, b: _von_mises_fisher_weights(a, b, sigma),
                         gather_distributed, backend=backend, exact=exact)
        self.sigma = sigma
