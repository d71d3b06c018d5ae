"""What a call of the Triton backend launches on a GPU, worked out without running it: the call
runs forward and backward on FakeTensorMode CUDA tensors (shapes, dtypes and devices, no data),
every Triton launch recorded instead of run, the compute capability the launchers read given
(or the GPU's own). It shows, on a machine with or without a GPU: which kernels a call launches
at a real shape with which grids, arguments and configuration, the torch operators around them,
the bytes it allocates (peak over the call, beside its inputs), and whether it reads a value on
the host (a fake tensor has none: ``.item()``, ``bool(t)``, ``nonzero`` raise) or copies between
host and device (recorded).

The bench uses it to time each distinct launch sequence once: an engine configuration whose
plan at a shape is another's (``--triton-config`` variants that only touch other D ranges or
the other pass) is reported as the same, not timed again. tests/test_gpu_plan.py checks the
engine with it."""
from __future__ import annotations

import contextlib
from typing import Callable, List, NamedTuple, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class Launch(NamedTuple):
    kernel: str
    grid: tuple
    constants: dict  # the launch's non-tensor keyword arguments (constexprs, num_warps, ...)
    args: tuple  # positional arguments: tensors as (shape, stride, dtype), the rest as given


class Plan(NamedTuple):
    launches: List[Launch]
    forward_launches: int  # how many of them the forward made
    peak_bytes: int  # most bytes held at once by tensors the call created (inputs not counted)
    forward_peak_bytes: int
    transfers: List[str]  # copies between host and device (each a synchronisation)
    ops: List[tuple]  # every torch operator: (name, output shapes), in order
    forward_ops: int

    def kernels(self, part: str = "all") -> List[str]:
        return [x.kernel for x in self.part(part)]

    def part(self, part: str = "all") -> List[Launch]:
        f = self.forward_launches
        return {"all": self.launches, "forward": self.launches[:f], "backward": self.launches[f:]}[part]

    def signature(self, part: str = "all") -> tuple:
        """Everything the GPU would be asked to do in ``part``: the launches with their grids,
        arguments and configurations, and the torch operators with their shapes."""
        f = self.forward_ops
        ops = {"all": self.ops, "forward": self.ops[:f], "backward": self.ops[f:]}[part]
        launches = tuple((x.kernel, x.grid, tuple(sorted(x.constants.items())), x.args)
                         for x in self.part(part))
        return launches, tuple(ops)


_aten = torch.ops.aten
_COPIES = (_aten._to_copy.default, _aten.copy_.default, _aten.copy.default, _aten._copy_from.default,
           _aten._copy_from_and_resize.default)


def _shapes(x) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tree_leaves(x) if isinstance(t, torch.Tensor))


class _Record(TorchDispatchMode):
    """Every operator with its output shapes; the bytes of the storages that ops create (views
    and in-place results are not new storage), held until the storage is freed, and the peak of
    their sum; every copy between the host and the device: a device-to-host copy waits for the
    device, and so does a host-to-device copy from pageable memory, such as a tensor built from
    Python numbers."""

    def __init__(self):
        super().__init__()
        self.live = {}
        self.peak = 0
        self.transfers = []
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((str(func), _shapes(out)))
        if func in _COPIES:
            src = {a.device.type for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
            dst = {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
            if len(src | dst) > 1:
                self.transfers.append(f"{func}: {sorted(src)} -> {sorted(dst)}")
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        seen = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st._cdata not in seen and st._cdata not in self.live:
                    self.live[st._cdata] = (StorageWeakRef(st), st.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _engine_nodes(out: torch.Tensor) -> list:
    """The autograd nodes of fastcl's engine Functions that ``out`` depends on."""
    seen, stack, nodes = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("EngineLossBackward", "EngineStatisticsBackward",
                                   "EngineRowTotalBackward"):
            nodes.append(node)
        stack.extend(f for f, _ in node.next_functions)
    return nodes


def _node_grads(node, device) -> tuple:
    """Gradients for each output of an engine node (the autograd engine itself needs a real CUDA
    device, so the nodes' backward is called directly)."""
    if type(node).__name__ == "EngineRowTotalBackward":  # (a step's: its gradients scaled)
        return torch.ones((), device=device), None
    q, k = node.saved_tensors[:2]
    N, M = q.shape[0], k.shape[0]
    sym = node.spec.symmetric
    rows = torch.full((N,), 0.5 / N, device=device)
    cols = torch.full((M,), 0.5 / M, device=device) if sym else None
    if type(node).__name__ == "EngineLossBackward":
        return rows, cols, None
    lse2 = rows if node.spec.lse2_ratio is not None else None
    return rows, -rows, None, cols, (-cols if sym else None), None, lse2, None, None, None


def _arg(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), tuple(x.stride()), x.dtype)
    return x if isinstance(x, (int, float, bool, str, type(None))) else type(x).__name__


class Patcher:
    """setattr with undo, for use outside pytest (whose monkeypatch has the same two methods)."""

    def __init__(self):
        self._undo = []

    def setattr(self, obj, name, value, raising=True):
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self):
        while self._undo:
            obj, name, value = self._undo.pop()
            setattr(obj, name, value)


class FakeGPU:
    """``plan(fn, *args)`` runs ``fn(*args)`` (fake CUDA tensors from :meth:`tensor` or
    :meth:`fake`) as on a GPU of compute capability ``arch`` (10 * major + minor; None: this
    machine's GPU) and returns its :class:`Plan`. ``patch`` (``setattr`` / ``undo``, e.g.
    pytest's monkeypatch) takes the patches: the kernels' launch method unless not
    ``record_launches``, the engine's E._arch, and its cached GEMM check."""

    def __init__(self, patch, arch: Optional[int] = 90, record_launches: bool = True):
        from fastcl.ops.triton import engine as E

        if E._autotuning():  # (its tuner would time launches that do not run, and keep the winner)
            raise RuntimeError("launch plans need the fixed configurations: FASTCL_AUTOTUNE is on")
        self.launches: List[Launch] = []
        self.mode = FakeTensorMode()
        record = self.launches

        def run(kernel, *args, grid, warmup=False, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            record.append(Launch(kernel.fn.__name__, tuple(g) + (1,) * (3 - len(g)),
                                 {n: v for n, v in kwargs.items() if not isinstance(v, torch.Tensor)},
                                 tuple(_arg(a) for a in args)))

        if record_launches:  # JITFunction, or InterpretedFunction under the interpreter
            patch.setattr(type(E._forward_kernel), "run", run)
        if arch is not None:
            patch.setattr(E, "_arch", lambda device: arch if device.type == "cuda" else 0)
        # (its answer on fake tensors is the fake kernels'; not to be kept for real ones)
        patch.setattr(E, "_fp32_acc_gemm_ok", None)

    def tensor(self, *shape, dtype=torch.float32, grad: bool = True, integer_high: Optional[int] = None,
               value: Optional[float] = None):
        """A fake CUDA tensor (the factory of tests/_utils.loss_inputs)."""
        with self.mode:
            if integer_high is not None:
                return torch.randint(0, integer_high, shape, device="cuda")
            x = torch.empty(shape, device="cuda", dtype=dtype)
            return x.requires_grad_() if grad else x

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """A fake CUDA tensor like ``x`` (any device): its shape, strides, dtype and
        requires_grad."""
        with self.mode:
            f = torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="cuda")
        return f.requires_grad_(x.requires_grad) if x.is_floating_point() else f

    def plan(self, fn: Callable, *args, backward: bool = True) -> Plan:
        self.launches.clear()
        with self.mode:
            rec = _Record()
            with rec:
                out = fn(*args)
                n_fwd, peak_fwd, ops_fwd = len(self.launches), rec.peak, len(rec.ops)
                if backward and out.requires_grad:
                    for node in _engine_nodes(out):
                        grads = _node_grads(node, out.device)
                        node.apply(*grads)
                        del grads
                del out
        return Plan(list(self.launches), n_fwd, rec.peak, peak_fwd, rec.transfers, rec.ops, ops_fwd)


@contextlib.contextmanager
def fake_gpu(arch: Optional[int] = None, record_launches: bool = True):
    """:class:`FakeGPU` with its patches undone on exit."""
    patch = Patcher()
    try:
        yield FakeGPU(patch, arch, record_launches)
    finally:
        patch.undo()


def mode_signature(fn: Callable, inputs: dict, mode: str, arch: Optional[int] = None) -> tuple:
    """The :meth:`Plan.signature` of one bench step (``fn(inputs)``, a dict of tensors) in
    ``mode``: "fwd" (the forward without autograd, as the bench times it), "bwd" (the backward
    after a forward with autograd) or "fwdbwd"."""
    with fake_gpu(arch) as gpu:
        fake = {k: gpu.fake(v) for k, v in inputs.items()}
        if mode == "fwd":
            with torch.no_grad():
                return gpu.plan(lambda: fn(fake), backward=False).signature("forward")
        plan = gpu.plan(lambda: fn(fake))
        return plan.signature("backward" if mode == "bwd" else "all")
