"""The Triton engine on a GPU that is not there: public losses run forward and backward on
FakeTensorMode CUDA tensors (shapes, dtypes and devices, no data), with every Triton launch
recorded instead of run and the compute capability the launchers read set by hand. What that
shows without a GPU: which kernels a call launches at a real shape and with which grid and
configuration, the bytes it allocates (peak over the call, beside its inputs), and that it never
reads a tensor's values on the host (a fake tensor has none: ``.item()``, ``bool(t)``,
``nonzero`` raise)."""
from typing import Callable, List, NamedTuple, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastcl.ops.triton import engine as E



class Launch(NamedTuple):
    kernel: str
    grid: tuple
    constants: dict  # the launch's non-tensor keyword arguments (constexprs, num_warps, ...)


class Plan(NamedTuple):
    launches: List[Launch]
    forward_launches: int  # how many of them the forward made
    peak_bytes: int  # most bytes held at once by tensors the call created (inputs not counted)
    forward_peak_bytes: int
    transfers: List[str]  # copies between host and device (each a synchronisation)

    def kernels(self, part: str = "all") -> List[str]:
        f = self.forward_launches
        sel = {"all": self.launches, "forward": self.launches[:f], "backward": self.launches[f:]}[part]
        return [x.kernel for x in sel]


_aten = torch.ops.aten
_COPIES = (_aten._to_copy.default, _aten.copy_.default, _aten.copy.default, _aten._copy_from.default,
           _aten._copy_from_and_resize.default)


class _Bytes(TorchDispatchMode):
    """Bytes of the storages that ops create (views and in-place results are not new storage),
    held until the storage is freed; the peak of their sum. And every copy between the host and
    the device: a device-to-host copy waits for the device; so does a host-to-device copy from
    pageable memory, such as a tensor built from Python numbers."""

    def __init__(self):
        super().__init__()
        self.live = {}
        self.peak = 0
        self.transfers = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
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
        if type(node).__name__ in ("EngineLossBackward", "EngineStatisticsBackward"):
            nodes.append(node)
        stack.extend(f for f, _ in node.next_functions)
    return nodes


def _node_grads(node, device) -> tuple:
    """Gradients for each output of an engine node (the autograd engine itself needs a real CUDA
    device, so the nodes' backward is called directly)."""
    q, k = node.saved_tensors[:2]
    N, M = q.shape[0], k.shape[0]
    sym = node.spec.symmetric
    rows = torch.full((N,), 0.5 / N, device=device)
    cols = torch.full((M,), 0.5 / M, device=device) if sym else None
    if type(node).__name__ == "EngineLossBackward":
        return rows, cols, None
    lse2 = rows if node.spec.lse2_ratio is not None else None
    return rows, -rows, None, cols, (-cols if sym else None), None, lse2, None, None, None


class FakeGPU:
    """``plan(fn, *args)`` runs ``fn(*args)`` (fake CUDA tensors from :meth:`tensor`) as on a GPU
    of compute capability ``arch`` (10 * major + minor) and returns its :class:`Plan`;
    ``monkeypatch`` undoes the patches (the kernels' launch method unless not
    ``record_launches``, E._arch, the engine's cached GEMM check)."""

    def __init__(self, monkeypatch, arch: int = 90, record_launches: bool = True):
        self.launches: List[Launch] = []
        self.mode = FakeTensorMode()
        kinds = {type(E._forward_kernel)}  # JITFunction, or InterpretedFunction under the interpreter
        record = self.launches

        def run(kernel, *args, grid, warmup=False, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            record.append(Launch(kernel.fn.__name__, tuple(g) + (1,) * (3 - len(g)),
                                 {n: v for n, v in kwargs.items() if not isinstance(v, torch.Tensor)}))

        for kind in kinds if record_launches else ():
            monkeypatch.setattr(kind, "run", run)
        monkeypatch.setattr(E, "_arch", lambda device: arch if device.type == "cuda" else 0)
        # (its answer on fake tensors is the fake kernels'; not to be kept for real ones)
        monkeypatch.setattr(E, "_fp32_acc_gemm_ok", None)

    def tensor(self, *shape, dtype=torch.float32, grad: bool = True, integer_high: Optional[int] = None,
               value: Optional[float] = None):
        """A fake CUDA tensor (the factory of tests/_utils.loss_inputs)."""
        with self.mode:
            if integer_high is not None:
                return torch.randint(0, integer_high, shape, device="cuda")
            x = torch.empty(shape, device="cuda", dtype=dtype)
            return x.requires_grad_() if grad else x

    def plan(self, fn: Callable, *args, backward: bool = True) -> Plan:
        self.launches.clear()
        with self.mode:
            nbytes = _Bytes()
            with nbytes:
                out = fn(*args)
                n_fwd, peak_fwd = len(self.launches), nbytes.peak
                if backward:
                    for node in _engine_nodes(out):
                        grads = _node_grads(node, out.device)
                        node.apply(*grads)
                        del grads
                del out
        return Plan(list(self.launches), n_fwd, nbytes.peak, peak_fwd, nbytes.transfers)
