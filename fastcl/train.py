"""Chunked contrastive training step: batches far larger than the encoders' activations allow.

The contrastive loss couples every sample of the batch with every other one, so the batch cannot
simply be split into independently back-propagated pieces. :func:`chunked_contrastive_step` splits
the work in three phases instead (the representation-caching scheme of Gao et al., "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup"):

1. encode the batch chunk by chunk **without** autograd, keeping only the embeddings (B, D);
2. compute the loss on the concatenated embeddings (the fused loss never materialises B x B) and
   its gradient with respect to the embeddings;
3. re-encode every chunk **with** autograd and back-propagate its slice of the embedding gradient.

The parameter gradients equal those of an unchunked step (up to float summation order): the RNG
state is captured before each chunk in phase 1 and restored for its re-encoding in phase 3, so
dropout draws the same masks twice. Peak activation memory is that of one chunk. The encoders run
twice, so the step costs about one extra forward pass.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["chunked_contrastive_step", "chunked_loss", "RngState"]


# ----------------------------------------------------------------------------------------------
# batch slicing
# ----------------------------------------------------------------------------------------------


def _batch_size(name: str, x: Any) -> int:
    """Leading dimension shared by every tensor of a batch (tensor, mapping or sequence of them)."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError(f"{name} must have a leading batch dimension, got a 0-d tensor")
        return x.shape[0]
    if isinstance(x, Mapping):
        sizes = {k: _batch_size(f"{name}[{k!r}]", v) for k, v in x.items() if _has_tensor(v)}
    elif isinstance(x, (list, tuple)):
        sizes = {i: _batch_size(f"{name}[{i}]", v) for i, v in enumerate(x) if _has_tensor(v)}
    else:
        raise TypeError(f"{name} must be a tensor, or a mapping / list / tuple of tensors, "
                        f"got {type(x).__name__}")
    if not sizes:
        raise ValueError(f"{name} holds no tensor to split into chunks")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every tensor of {name} must have the same batch size (leading "
                         f"dimension), got {sizes}")
    return next(iter(sizes.values()))


def _has_tensor(x: Any) -> bool:
    if isinstance(x, Tensor):
        return True
    if isinstance(x, Mapping):
        return any(_has_tensor(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_tensor(v) for v in x)
    return False


def _slice(x: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of every tensor in ``x``; non-tensor leaves are passed through."""
    if isinstance(x, Tensor):
        return x[start:stop]
    if isinstance(x, Mapping):
        out = {k: _slice(v, start, stop) for k, v in x.items()}
        try:  # keep the mapping type (e.g. a tokenizer's BatchEncoding) when it allows it
            return type(x)(out)
        except Exception:
            return out
    if isinstance(x, list):
        return [_slice(v, start, stop) for v in x]
    if isinstance(x, tuple):
        parts = [_slice(v, start, stop) for v in x]
        return type(x)(*parts) if hasattr(x, "_fields") else tuple(parts)
    return x


def _device_of(x: Any) -> Optional[torch.device]:
    if isinstance(x, Tensor):
        return x.device
    vals = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else ()
    for v in vals:
        d = _device_of(v)
        if d is not None:
            return d
    return None


# ----------------------------------------------------------------------------------------------
# RNG capture / replay
# ----------------------------------------------------------------------------------------------


class RngState:
    """The CPU RNG state and the CUDA RNG state of ``devices``, captured at construction;
    ``replay()`` is a context manager that runs its body from that state and then restores the
    RNG to what it was when the body started (so the re-encoding consumes no randomness)."""

    def __init__(self, devices: Sequence[torch.device] = ()):
        self.cuda_devices = sorted({d.index if d.index is not None else torch.cuda.current_device()
                                    for d in devices if d.type == "cuda"})
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(i) for i in self.cuda_devices]

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=self.cuda_devices, enabled=True):
            torch.set_rng_state(self.cpu_state)
            for i, state in zip(self.cuda_devices, self.cuda_states):
                torch.cuda.set_rng_state(state, i)
            yield


# ----------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------


def _autocast_ctx(autocast, device: torch.device):
    if autocast is None or autocast is False:
        return contextlib.nullcontext
    if isinstance(autocast, torch.dtype):
        return lambda: torch.autocast(device.type, dtype=autocast)
    if autocast is True:
        return lambda: torch.autocast(device.type)
    if callable(autocast):
        return autocast
    raise TypeError("autocast must be None, a torch.dtype (e.g. torch.bfloat16), True, or a "
                    f"callable returning a context manager, got {type(autocast).__name__}")


def _embedding(name: str, out: Any) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() < 1:
        raise TypeError(f"{name} must return a tensor of shape (chunk, ...) of embeddings, got "
                        f"{type(out).__name__ if not isinstance(out, Tensor) else tuple(out.shape)}")
    return out


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except Exception:  # tqdm is optional
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _modules(enc) -> List[nn.Module]:
    return [enc] if isinstance(enc, nn.Module) else []


def _chunk_ranges(ranges, sizes: List[int]) -> List[List[tuple]]:
    """Validated per-input chunk ranges: (start, stop) pairs of ints that cover [0, B_t) in order."""
    if not isinstance(ranges, (list, tuple)) or len(ranges) != len(sizes):
        raise ValueError(f"ranges must hold one list of (start, stop) chunks per input ({len(sizes)}), "
                         f"got {type(ranges).__name__}"
                         + (f" of {len(ranges)}" if isinstance(ranges, (list, tuple)) else ""))
    out = []
    for t, (rs, n) in enumerate(zip(ranges, sizes)):
        rs = [tuple(r) for r in rs]
        ends = [0] + [e for _, e in rs]
        ok = (all(len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                  for r in rs)
              and all(s == prev and s < e for (s, e), prev in zip(rs, ends)) and ends[-1] == n)
        if not ok:
            raise ValueError(f"ranges[{t}] must be (start, stop) chunks covering rows [0, {n}) in "
                             f"order, each non-empty, got {rs}")
        out.append(rs)
    return out


def _plan(encoders, inputs, loss_fn, chunk_size, autocast, ranges=None):
    """Validate the arguments; returns (towers, devices, autocast factory, jobs)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise TypeError("inputs must be a non-empty list or tuple with one batch per tower, got "
                        f"{type(inputs).__name__}")
    if isinstance(encoders, (list, tuple)):
        if len(encoders) != len(inputs):
            raise ValueError(f"encoders has {len(encoders)} entries but inputs has {len(inputs)}; "
                             "pass one encoder per input, or a single shared encoder")
        towers = list(encoders)
    else:
        towers = [encoders] * len(inputs)
    for i, enc in enumerate(towers):
        if not callable(enc):
            raise TypeError(f"encoders[{i}] must be callable, got {type(enc).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    sizes = [_batch_size(f"inputs[{t}]", x) for t, x in enumerate(inputs)]
    devices = [d for d in (_device_of(x) for x in inputs) if d is not None]
    for enc in towers:
        for m in _modules(enc):
            p = next(m.parameters(), None)
            if p is not None:
                devices.append(p.device)
    device = devices[0] if devices else torch.device("cpu")
    if ranges is None:
        jobs = [(t, s, min(s + chunk_size, n)) for t, n in enumerate(sizes)
                for s in range(0, n, chunk_size)]
    else:
        jobs = [(t, s, e) for t, rs in enumerate(_chunk_ranges(ranges, sizes)) for s, e in rs]
    return towers, devices, _autocast_ctx(autocast, device), jobs


def _chunk_counts(towers, jobs, replayed) -> dict:
    """How many chunks each module re-encodes (id -> count) over the inputs in ``replayed``: a
    DDP module synchronises on its last one (:class:`_Replayer`)."""
    counts: dict = {}
    for t, _, _ in jobs:
        if t in replayed:
            for m in _modules(towers[t]):
                counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


class _Replayer:
    """Phase 3 for one tower: a hook on the cached embeddings (B_t, D) that, when their gradient
    arrives, re-encodes each chunk with autograd and back-propagates its slice."""

    def __init__(self, tower, t, inputs, chunks, ac, remaining, bar):
        self.tower, self.t, self.inputs, self.chunks = tower, t, inputs, chunks
        self.ac, self.remaining, self.bar = ac, remaining, bar

    def __call__(self, grad: Tensor) -> None:
        mods = _modules(self.tower)
        for s, e, state in self.chunks:
            with contextlib.ExitStack() as stack:
                for m in mods:  # DDP: synchronise only on the module's very last chunk
                    self.remaining[id(m)] -= 1
                    if hasattr(m, "no_sync") and self.remaining[id(m)] > 0:
                        stack.enter_context(m.no_sync())
                with state.replay(), torch.enable_grad():  # hooks run with grad mode off
                    with self.ac():
                        out = _embedding(f"encoders[{self.t}]", self.tower(_slice(self.inputs, s, e)))
                    if out.requires_grad:  # a frozen tower has nothing to back-propagate
                        torch.autograd.backward(out, grad[s:e].to(out.dtype))
            if self.bar is not None:
                self.bar.update(1)
        self.chunks = []  # one backward per forward
        if self.bar is not None and all(v <= 0 for v in self.remaining.values()):
            self.bar.close()


def chunked_loss(
        encoders: Union[Callable, Sequence[Callable]],
        inputs: Sequence[Any],
        loss_fn: Callable[..., Tensor],
        chunk_size: int,
        *,
        autocast: Any = None,
        progress: bool = False,
        loss_backward: bool = False,
        ranges: Optional[Sequence[Sequence[tuple]]] = None,
) -> Tensor:
    """The loss of a big batch encoded ``chunk_size`` samples at a time, as a differentiable scalar.

    Encodes every chunk without autograd (phase 1) and evaluates ``loss_fn`` on the cached
    embeddings (phase 2). The returned scalar's backward (``loss.backward()``,
    ``scaler.scale(loss).backward()``, a trainer's backward) first back-propagates through the loss
    (learnable loss parameters get their gradients), then re-encodes each chunk with autograd under
    its phase-1 RNG state and back-propagates the chunk's slice of the embedding gradient
    (phase 3). Arguments as :func:`chunked_contrastive_step`. The graph is used once: call
    backward at most once.

    ``loss_backward``: ``loss_fn`` gets, for each input, the list of its chunks' embeddings (leaf
    tensors that require grad) and back-propagates its loss to them itself, returning the loss
    value: the protocol of sentence-transformers' gradient-cached losses (``calculate_loss(reps,
    ..., with_backward=True)``), through which wrappers such as its ``MatryoshkaLoss`` add terms of
    their own. Their gradients are kept, and the returned scalar (detached from ``loss_fn``'s
    graph) re-encodes the chunks at its backward with those gradients times its own. Inputs whose
    chunks got no gradient are not re-encoded. Learnable parameters of ``loss_fn`` itself get
    their gradients from its own backward, unscaled by the returned scalar's.

    ``ranges``: the chunks of each input as (start, stop) row ranges covering it in order (e.g.
    packed to a token budget), instead of ``chunk_size`` rows each.
    """
    towers, devices, ac, jobs = _plan(encoders, inputs, loss_fn, chunk_size, autocast, ranges)
    bar = _progress(2 * len(jobs), progress, "chunks")
    pieces: List[List[Tensor]] = [[] for _ in inputs]
    chunks: List[list] = [[] for _ in inputs]
    with torch.no_grad():  # phase 1
        for t, s, e in jobs:
            state = RngState(devices)
            with ac():
                out = _embedding(f"encoders[{t}]", towers[t](_slice(inputs[t], s, e)))
            pieces[t].append(out.detach())
            chunks[t].append((s, e, state))
            if bar is not None:
                bar.update(1)
    if loss_backward:
        return _loss_with_backward(towers, inputs, loss_fn, pieces, chunks, ac, jobs, bar)
    remaining = _chunk_counts(towers, jobs, range(len(inputs)))
    embeddings = []
    for t, p in enumerate(pieces):
        emb = torch.cat(p).requires_grad_(True)
        emb.register_hook(_Replayer(towers[t], t, inputs[t], chunks[t], ac, remaining, bar))
        embeddings.append(emb)
    with torch.enable_grad(), ac():  # phase 2
        loss = loss_fn(*embeddings)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError("loss_fn must return a one-element tensor (a reduced loss), got "
                        f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}")
    return loss


def _loss_with_backward(towers, inputs, loss_fn, pieces, chunks, ac, jobs, bar) -> Tensor:
    """Phases 2 and 3 of :func:`chunked_loss` with ``loss_backward``: ``loss_fn`` back-propagates
    to the chunks' embeddings itself; a hook on the returned scalar replays the encoders."""
    reps = [[p.requires_grad_(True) for p in tower_pieces] for tower_pieces in pieces]
    with torch.enable_grad(), ac():
        value = loss_fn(*reps)
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise TypeError("loss_fn must return a one-element tensor (a reduced loss), got "
                        f"{type(value).__name__ if not isinstance(value, Tensor) else tuple(value.shape)}")
    used = [t for t, rs in enumerate(reps) if any(r.grad is not None for r in rs)]
    grads = {t: torch.cat([r.grad if r.grad is not None else torch.zeros_like(r) for r in reps[t]])
             for t in used}
    remaining = _chunk_counts(towers, jobs, grads)
    replayers = {t: _Replayer(towers[t], t, inputs[t], chunks[t], ac, remaining, bar) for t in used}
    out = value.detach().clone().requires_grad_(True)

    def replay(grad: Tensor) -> None:
        for t, replayer in replayers.items():
            replayer(grads[t] * grad.to(grads[t].dtype))

    out.register_hook(replay)
    return out


def chunked_contrastive_step(
        encoders: Union[Callable, Sequence[Callable]],
        inputs: Sequence[Any],
        loss_fn: Callable[..., Tensor],
        chunk_size: int,
        *,
        scaler: Optional[Any] = None,
        autocast: Any = None,
        progress: bool = False,
) -> Tensor:
    """One contrastive training step over a big batch, encoded ``chunk_size`` samples at a time.

    Runs the forward and backward passes and accumulates parameter gradients (``.grad``); the
    caller zeroes gradients before and steps the optimiser (``scaler.step``/``scaler.update``)
    after, exactly as around ``loss.backward()``.

    Args:
        encoders: one callable per entry of ``inputs`` (a dual encoder: ``(image_tower,
            text_tower)``), or a single callable shared by all of them (a siamese / SimCLR
            encoder). Each maps a chunk of its input to embeddings ``(chunk, D)``.
        inputs: one batch per tower: a tensor ``(B_t, ...)``, or a mapping / list / tuple of
            tensors sharing the leading dimension ``B_t`` (e.g. tokenizer output); non-tensor
            entries are passed to every chunk unchanged. Towers may have different B_t.
        loss_fn: ``loss_fn(emb_0, emb_1, ...) -> scalar`` on the full embeddings ``(B_t, D)``, e.g.
            ``lambda i, t: fastcl.clip_loss(i, t, model.logit_scale.exp())``. Learnable loss
            parameters (logit scale and bias) get their gradients directly.
        chunk_size: samples per encoder call; bounds the activation memory.
        scaler: optional ``torch.amp.GradScaler`` (or ``torch.cuda.amp.GradScaler``): the loss is
            scaled by it before the backward, so every parameter gradient is scaled as with
            ``scaler.scale(loss).backward()``.
        autocast: None, a dtype (``torch.bfloat16``/``torch.float16``), True (the device's default
            autocast dtype) or a callable returning a context manager; wraps the encoders and the
            loss in both passes.
        progress: show a progress bar over the chunks (when tqdm is installed).

    Returns:
        the loss value, detached (a 0-d tensor; reading it is the caller's host sync, not ours).

    Notes:
        Chunks are encoded tower by tower in order (all chunks of input 0, then input 1, ...);
        an unchunked step that encodes the same chunks in the same order draws the same dropout
        masks. Layers whose forward has side effects (BatchNorm running statistics) see every
        chunk twice. A ``DistributedDataParallel`` encoder synchronises gradients only on its
        last re-encoding backward (``no_sync`` for the others).
    """
    loss = chunked_loss(encoders, inputs, loss_fn, chunk_size, autocast=autocast, progress=progress)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach()
