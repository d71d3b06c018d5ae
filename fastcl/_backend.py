"""Which backends exist here and which one runs a call. Nothing here touches the GPU at import."""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch", "cuda", "cpu")
# what "auto" resolves to for CPU tensors when the extension is built: its C++ kernels for the
# closures they implement, the torch engine for those that need the engine's extensions
# (:func:`concrete` picks per call)
AUTO_CPU = "auto-cpu"


def _constant_under_compile(fn):
    """Probes below import modules; under torch.compile their answer is a constant."""
    mark = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
    return mark(fn) if mark is not None else fn
_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_loaded: dict = {}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@_constant_under_compile
def has_triton() -> bool:
    if "has_triton" not in _loaded:
        try:
            import triton  # noqa: F401

            _loaded["has_triton"] = True
        except Exception:  # pragma: no cover - triton is a dependency, but may be broken
            _loaded["has_triton"] = False
    return _loaded["has_triton"]


@_constant_under_compile
def has_extension() -> bool:
    """True when the compiled ``fastcl._C`` extension is importable."""
    if "has_ext" not in _loaded:
        try:
            importlib.import_module("fastcl._C")
            _loaded["has_ext"] = True
        except Exception:
            _loaded["has_ext"] = False
    return _loaded["has_ext"]


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn the user's ``backend`` argument into the backend for these tensors (a name this
    returned is taken again: :data:`AUTO_CPU` resolves as "auto")."""
    if backend == AUTO_CPU:
        backend = "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and dtype in _FAST_DTYPES and has_triton():
            return "triton"
        if device.type == "cpu" and dtype in _FAST_DTYPES and has_extension():
            return AUTO_CPU
        return "torch"
    if backend == "triton":
        if not has_triton():
            raise RuntimeError("backend='triton' needs the triton package, which failed to import")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                             f"tensors); got tensors on {device}")
        if dtype not in _FAST_DTYPES:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 inputs, got {dtype}")
    if backend in ("cuda", "cpu"):
        if not has_extension():
            raise RuntimeError(f"backend={backend!r} needs the compiled extension fastcl._C, which is "
                               "not built here (reinstall with a C++ compiler; CUDA_HOME for 'cuda')")
        if device.type != backend:
            raise ValueError(f"backend={backend!r} needs {backend.upper()} tensors, got tensors on {device}")
        if dtype not in _FAST_DTYPES:
            raise TypeError(f"backend={backend!r} supports float16, bfloat16 and float32 inputs, got {dtype}")
    return backend


def concrete(name: str, extended: bool) -> str:
    """The backend that runs a call: :data:`AUTO_CPU` becomes "cpu" for the closures the C++
    kernels implement and "torch" where the call needs the engine's extensions (``extended``:
    decoupled, target-LSE, false-negative or teacher closures, separate gradients of the
    statistics, ranks and mining); any other name stays as it is."""
    if name == AUTO_CPU:
        return "torch" if extended else "cpu"
    return name


def engine(name: str) -> ModuleType:
    """The module implementing the engine contract (``forward``/``backward``) for a concrete
    backend (not :data:`AUTO_CPU`: :func:`concrete` first)."""
    if name == "triton":
        from .ops.triton import engine as mod
    elif name == "torch":
        from .ops import torch_engine as mod
    elif name in ("cuda", "cpu"):
        from .ops import cpp as mod
    else:  # pragma: no cover - resolve() guards this
        raise ValueError(name)
    return mod
