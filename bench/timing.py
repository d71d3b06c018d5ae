"""Timing and memory of one case.

Modes (what the timed region holds):

* ``fwd``: the loss under ``torch.no_grad()``.
* ``bwd``: ``loss.backward()`` only; the forward of each repeat runs just before, untimed.
* ``fwdbwd``: the loss and its backward.

Gradients are set to None before every repeat, outside the timed region (so the timed backward
allocates them, as a training step does). Inputs are rotated among several copies whose total
size exceeds the last-level cache, so no repeat finds its inputs in cache.

On CUDA each repeat is bracketed by CUDA events (device time, no host sync inside the loop);
on CPU by ``time.perf_counter``. Results are the median and the 20th / 80th percentiles in ms.
On CUDA also the host's time to issue one step (``host_ms``: the Python, dispatch and launch
work, timed on an idle device with nothing waited for): a step whose ``host_ms`` nears its
``ms`` keeps the device waiting on the host, and its time is the host's, not the kernels'.

Memory (CUDA only): the peak bytes allocated above the inputs during one step of the mode
(forward for ``fwd``, forward + backward for ``bwd`` and ``fwdbwd``), gradients included.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

MODES = ("fwd", "bwd", "fwdbwd")
H100_L2_BYTES = 50 * 2**20
CPU_CACHE_BYTES = 64 * 2**20  # a generous last-level cache for server CPUs

# FLOPs per similarity entry: the forward is one N x M x D product (2 NMD: every row and column
# statistic comes from the same tile); the backward recomputes it and forms dQ and dK (6 NMD).
FLOP_FACTORS = {"fwd": 2, "bwd": 6, "fwdbwd": 8}
FLOP_CONVENTION = ("TFLOP/s counted at 2*N*M*D (fwd), 6*N*M*D (bwd), 8*N*M*D (fwd+bwd) for an "
                   "N x M similarity matrix (nt_xent, dcl: 2N x 2N for N pairs), whatever the "
                   "implementation actually executes")


def flops(mode: str, N: int, M: int, D: int) -> int:
    """Nominal FLOPs of one step: 2 NMD (fwd), 6 NMD (bwd), 8 NMD (fwd+bwd)."""
    if mode not in FLOP_FACTORS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return FLOP_FACTORS[mode] * N * M * D


def tflops(mode: str, N: int, M: int, D: int, ms: float) -> float:
    """TFLOP/s of a step of ``ms`` milliseconds (see :data:`FLOP_CONVENTION`)."""
    if not ms > 0:
        raise ValueError(f"ms must be > 0, got {ms}")
    return flops(mode, N, M, D) / (ms * 1e-3) / 1e12


def is_oom(exc: BaseException) -> bool:
    """CUDA out-of-memory, or a host allocation failure."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(exc, oom_types):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "can't allocate memory" in msg or isinstance(exc, MemoryError))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of a non-empty sequence."""
    if not xs:
        raise ValueError("percentile of an empty sequence")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def copies_for(nbytes: int, cache_bytes: int, max_copies: int = 32) -> int:
    """How many copies of an input set of ``nbytes`` exceed ``cache_bytes`` together (>= 2)."""
    if nbytes <= 0:
        return 2
    return int(min(max_copies, max(2, math.ceil(2 * cache_bytes / nbytes))))


@dataclass
class Timing:
    ms: float
    p20: float
    p80: float
    repeats: int
    times_ms: List[float] = field(repr=False, default_factory=list)
    host_ms: Optional[float] = None  # CUDA: median host time to issue one step


def _zero_grads(inputs) -> None:
    for t in inputs.values():
        if t.requires_grad:
            t.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One repeat of a mode, split into an untimed ``prepare`` and the timed ``run``."""

    def __init__(self, fn: Callable, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.fn, self.mode = fn, mode
        self._loss = None

    def prepare(self, inputs) -> None:
        _zero_grads(inputs)
        self._loss = None
        if self.mode == "bwd":
            self._loss = self.fn(inputs)

    def run(self, inputs) -> None:
        if self.mode == "fwd":
            with torch.no_grad():
                self.fn(inputs)
        elif self.mode == "bwd":
            loss, self._loss = self._loss, None
            loss.backward()
        else:
            self.fn(inputs).backward()


def time_step(fn: Callable, input_sets: Sequence, mode: str, device: torch.device, *,
              warmup: int = 10, repeats: int = 50, min_repeats: int = 5,
              max_seconds: Optional[float] = None, host_repeats: int = 3) -> Timing:
    """Median / p20 / p80 (ms) of ``repeats`` steps of ``mode``, rotating over ``input_sets``.

    ``max_seconds`` caps the timed repeats by the time the warm-up steps took (never fewer than
    ``min_repeats``). On CUDA, ``host_repeats`` more steps, each issued to an idle device, give
    ``host_ms``. Exceptions (OOM included) propagate to the caller.
    """
    if not input_sets:
        raise ValueError("input_sets must hold at least one input set")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    step = Step(fn, mode)
    n_sets = len(input_sets)
    # the first step compiles, autotunes and allocates; it is never counted
    step.prepare(input_sets[0])
    step.run(input_sets[0])
    _sync(device)
    t0 = time.perf_counter()
    done = 0
    for i in range(1, warmup):
        x = input_sets[i % n_sets]
        step.prepare(x)
        step.run(x)
        done += 1
        if max_seconds is not None and done % 2 == 0:
            _sync(device)
            if time.perf_counter() - t0 > max_seconds / 2:
                break
    if done == 0:  # estimate the step time from one more step
        step.prepare(input_sets[1 % n_sets])
        step.run(input_sets[1 % n_sets])
        done = 1
    _sync(device)
    per_step = (time.perf_counter() - t0) / done
    if max_seconds is not None and per_step > 0:
        repeats = max(min(repeats, min_repeats), min(repeats, int(max_seconds / per_step)))

    times: List[float] = []
    host_ms = None
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            x = input_sets[i % n_sets]
            step.prepare(x)
            starts[i].record()
            step.run(x)
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        host = []
        for i in range(host_repeats):  # each step issued to an idle device
            x = input_sets[i % n_sets]
            step.prepare(x)
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            step.run(x)
            host.append((time.perf_counter() - t) * 1e3)
            torch.cuda.synchronize(device)
        host_ms = percentile(host, 50) if host else None
    else:
        for i in range(repeats):
            x = input_sets[i % n_sets]
            step.prepare(x)
            t = time.perf_counter()
            step.run(x)
            times.append((time.perf_counter() - t) * 1e3)
    for x in input_sets:
        _zero_grads(x)
    return Timing(ms=percentile(times, 50), p20=percentile(times, 20), p80=percentile(times, 80),
                  repeats=repeats, times_ms=times, host_ms=host_ms)


def matmul_tflops(dtype: torch.dtype, device: torch.device, n: int = 8192, repeats: int = 10,
                  warmup: int = 3) -> float:
    """The measured matrix-product ceiling: TFLOP/s of an n x n x n ``torch.mm`` on random
    ``dtype`` operands (float32 at the TF32 setting in force), median of ``repeats`` CUDA-event
    timings after ``warmup`` products. CUDA only."""
    if device.type != "cuda":
        raise ValueError(f"matmul_tflops needs a CUDA device, got {device}")
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record()
        torch.mm(a, b, out=out)
        e.record()
    torch.cuda.synchronize(device)
    ms = percentile([s.elapsed_time(e) for s, e in zip(starts, ends)], 50)
    del a, b, out
    free_memory(device)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def peak_extra_bytes(fn: Callable, inputs, mode: str, device: torch.device) -> Optional[int]:
    """Peak bytes allocated above the current allocation during one step of ``mode`` (CUDA);
    None on other devices."""
    if device.type != "cuda":
        return None
    _zero_grads(inputs)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    if mode == "fwd":
        with torch.no_grad():
            fn(inputs)
    else:
        fn(inputs).backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    _zero_grads(inputs)
    return int(peak)


def loss_value(fn: Callable, inputs, no_grad: bool = True) -> float:
    """The loss of ``inputs`` as a float (a host sync: call it outside timed regions). With
    ``no_grad=False`` the forward runs with autograd on (the graph a compiled provider already has)."""
    if no_grad:
        with torch.no_grad():
            return float(fn(inputs))
    out = fn(inputs)
    v = float(out.detach())
    _zero_grads(inputs)
    return v
