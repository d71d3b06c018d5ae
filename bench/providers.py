"""The losses and implementations ("providers") the suite measures.

A case is (loss, provider, N, M, D, dtype, device). :func:`make_inputs` builds the inputs of a loss
(L2-normalised random features with ``requires_grad``, plus labels where the loss has them);
:func:`build` returns a callable ``fn(inputs) -> scalar loss`` for one (loss, provider) pair, or
raises :class:`Unavailable` saying why that pair cannot run here.

Losses (fixed hyper-parameters, the usual initialisations):

========  ==========================================  ===========================
clip      symmetric CLIP InfoNCE, scale 1/0.07         queries (N, D), keys (N, D)
info_nce  one-way InfoNCE, scale 1/0.07, p(i) = i      queries (N, D), keys (M, D)
siglip    pairwise sigmoid, scale 10, bias -10         queries (N, D), keys (M, D)
supcon    SupCon L_out, temperature 0.1, N/8 classes   features (N, D), labels (N,)
supcon_in SupCon L_in, the same                        features (N, D), labels (N,)
gist      info_nce with guided false negatives         queries (N, D), keys (M, D), guide
          (GISTEmbed, margin 0), scale 1/0.07          (N, Dg), (M, Dg), Dg = max(16, D/2)
========  ==========================================  ===========================

Providers:

* ``naive``: the materialised losses of :mod:`fastcl.reference`: the logits in the input dtype,
  cast to float32 for the loss (as the common implementation and the committed peer anchors do).
* ``compiled``: ``torch.compile(naive, dynamic=False)``, compiled afresh for each shape.
* ``infcl`` / ``infcl-ring``: Inf-CL's ``cal_flash_loss`` / ``cal_inf_loss`` (CUDA, clip and
  info_nce only; optional ``inf_cl`` package).
* ``fastcl-triton`` / ``fastcl-cuda`` / ``fastcl-cpu`` / ``fastcl-torch``: the public fastcl
  functions with that ``backend=``.
* ``fastcl-triton@NAME``: the Triton backend with an engine configuration of its own (block sizes
  per pass, the backward path, the interior-tile path), registered by :func:`add_triton_variant`
  (``--triton-config NAME=JSON``) and active only while its cases run.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from typing import Callable, Dict, Optional

import torch

LOSSES = ("clip", "info_nce", "siglip", "supcon", "supcon_in", "gist", "nt_xent", "dcl")
PROVIDERS = ("naive", "compiled", "infcl", "infcl-ring", "fastcl-triton", "fastcl-cuda",
             "fastcl-cpu", "fastcl-torch")
FASTCL_BACKENDS = {"fastcl-triton": "triton", "fastcl-cuda": "cuda", "fastcl-cpu": "cpu",
                   "fastcl-torch": "torch"}

CLIP_SCALE = 1.0 / 0.07
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
SUPCON_TEMPERATURE = 0.1
NT_XENT_TEMPERATURE, DCL_TEMPERATURE = 0.5, 0.1

# the reference / public function behind each loss
_REFERENCE_NAMES = {"clip": "clip_loss", "info_nce": "info_nce", "siglip": "siglip_loss",
                    "supcon": "supcon", "supcon_in": "supcon", "gist": "info_nce",
                    "nt_xent": "nt_xent", "dcl": "dcl"}
_PUBLIC_NAMES = _REFERENCE_NAMES

Inputs = Dict[str, torch.Tensor]
LossFn = Callable[[Inputs], torch.Tensor]


class Unavailable(Exception):
    """This (loss, provider) pair cannot run here; ``str(exc)`` says why."""


# "fastcl-triton@NAME" -> the engine's config_override while that provider runs
TRITON_VARIANTS: Dict[str, dict] = {}


def add_triton_variant(spec: str) -> str:
    """Register ``NAME=JSON`` (e.g. ``w4={"fwd_plain.num_warps": 4}``, ``dense={"DENSE": true}``)
    as provider ``fastcl-triton@NAME``; returns the provider name. ValueError on a bad spec."""
    from fastcl.ops.triton import engine as E

    name, sep, text = spec.partition("=")
    name = name.strip()
    if not sep or not name or any(c in name for c in " ,@="):
        raise ValueError(f"--triton-config expects NAME=JSON with a plain NAME, got {spec!r}")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--triton-config {name}: not JSON ({e.msg}): {text!r}")
    if not isinstance(cfg, dict):
        raise ValueError(f"--triton-config {name}: expected a JSON object, got {text!r}")
    for key, value in cfg.items():
        pass_, dot, param = key.rpartition(".")
        if key in E.POLICY_KEYS or (param == "RESIDENT" and pass_ in (
                "", "fwd_plain", "bwd", "bwd_rows_plain", "bwd_cols_plain", "bwd_gram")) or (
                param in ("TMA", "COLSUM_MMA") and pass_ in ("", "fwd", "fwd_plain")):
            if not isinstance(value, bool):
                raise ValueError(f"--triton-config {name}: {key} must be true or false, got {value!r}")
        elif param not in E.CONFIG_KEYS or (dot and pass_ not in E.PASSES):
            raise ValueError(f"--triton-config {name}: unknown key {key!r} (keys: "
                             f"{', '.join(E.POLICY_KEYS)}, [PASS.]{'|'.join(E.CONFIG_KEYS)} "
                             f"with PASS in {E.PASSES})")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--triton-config {name}: {key} must be a positive integer, got {value!r}")
    provider = f"fastcl-triton@{name}"
    TRITON_VARIANTS[provider] = cfg
    return provider


@contextlib.contextmanager
def engine_config(provider: str):
    """The provider's engine configuration in force within the block (nothing for the others)."""
    if provider not in TRITON_VARIANTS:
        yield
        return
    from fastcl.ops.triton import engine as E

    saved = E.config_override
    E.config_override = dict(TRITON_VARIANTS[provider])
    try:
        yield
    finally:
        E.config_override = saved


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def square_only(loss: str) -> bool:
    """Losses whose keys are the queries' partners (M must equal N)."""
    return loss in ("clip", "supcon", "supcon_in", "nt_xent", "dcl")


def two_views(loss: str) -> bool:
    """The self-similarities of two views: queries and keys (N, D) are the views of N pairs, and
    the similarity matrix is that of their 2N rows (2N x 2N)."""
    return loss in ("nt_xent", "dcl")


def similarity_shape(loss: str, N: int, M: int):
    """The (rows, columns) of the loss's similarity matrix, which the FLOP counts use."""
    return (2 * N, 2 * M) if two_views(loss) else (N, M)


def supcon_classes(n: int) -> int:
    return max(2, n // 8)


def make_inputs(loss: str, N: int, M: int, D: int, dtype: torch.dtype, device,
                generator: Optional[torch.Generator] = None) -> Inputs:
    """Fresh L2-normalised features (leaves with ``requires_grad``) for one loss.

    Returns {"queries": (N, D), "keys": (M, D)} (nt_xent, dcl: the two views of N pairs), for
    gist also {"guide_queries": (N, Dg),
    "guide_keys": (M, Dg)} (Dg = max(16, D / 2), no gradient), or, for supcon / supcon_in,
    {"features": (N, D), "labels": (N,)}. The tensors are drawn in float32 on ``device`` and cast
    to ``dtype``.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if square_only(loss) and M != N:
        raise ValueError(f"{loss} needs M == N, got N={N}, M={M}")
    if loss in ("info_nce", "gist") and M < N:
        raise ValueError(f"{loss} needs M >= N (key i is query i's positive), got N={N}, M={M}")

    def feats(n, d=D, grad=True):
        x = torch.randn(n, d, device=device, dtype=torch.float32, generator=generator)
        x = torch.nn.functional.normalize(x, dim=1)
        return x.to(dtype).requires_grad_(grad)

    if loss in ("supcon", "supcon_in"):
        labels = torch.randint(0, supcon_classes(N), (N,), device=device, generator=generator)
        return {"features": feats(N), "labels": labels}
    if loss == "gist":
        dg = max(16, D // 2)
        return {"queries": feats(N), "keys": feats(M), "guide_queries": feats(N, dg, False),
                "guide_keys": feats(M, dg, False)}
    return {"queries": feats(N), "keys": feats(M)}


def leaves(inputs: Inputs):
    """The tensors of ``inputs`` that receive gradients."""
    return [t for t in inputs.values() if t.requires_grad]


def input_bytes(inputs: Inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values())


# ----------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------


def _reference_fn(loss: str):
    try:
        ref = importlib.import_module("fastcl.reference")
    except Exception as e:  # pragma: no cover - the package is importable wherever this runs
        raise Unavailable(f"fastcl.reference does not import ({type(e).__name__}: {e})")
    fn = getattr(ref, _REFERENCE_NAMES[loss], None)
    if fn is None:
        raise Unavailable(f"fastcl.reference.{_REFERENCE_NAMES[loss]} does not exist in this version")
    return fn


def _public_fn(loss: str):
    try:
        pkg = importlib.import_module("fastcl")
    except Exception as e:  # pragma: no cover
        raise Unavailable(f"fastcl does not import ({type(e).__name__}: {e})")
    fn = getattr(pkg, _PUBLIC_NAMES[loss], None)
    if fn is None:
        raise Unavailable(f"fastcl.{_PUBLIC_NAMES[loss]} does not exist in this version")
    return fn


def infcl_available() -> bool:
    try:
        importlib.import_module("inf_cl")
        return True
    except Exception:
        return False


def extension_available() -> bool:
    try:
        from fastcl import _backend

        return bool(_backend.has_extension())
    except Exception:
        return False


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise :class:`Unavailable` unless fastcl's ``backend`` runs (device, dtype) here."""
    if backend == "triton" and device.type != "cuda":
        raise Unavailable("fastcl-triton is measured on CUDA only (the CPU interpreter is a "
                          "correctness mode, not a kernel)")
    try:
        from fastcl import _backend

        _backend.resolve(backend, device, dtype)
    except (RuntimeError, ValueError, TypeError) as e:
        raise Unavailable(str(e))
    except ImportError as e:  # pragma: no cover
        raise Unavailable(f"fastcl._backend does not import ({e})")


# ----------------------------------------------------------------------------------------------
# the loss callables
# ----------------------------------------------------------------------------------------------


def _scalar_out(x):
    return x[0] if isinstance(x, tuple) else x


def naive_fn(loss: str) -> LossFn:
    """The materialised reference of ``loss`` as ``fn(inputs) -> scalar``."""
    ref = _reference_fn(loss)
    f32 = torch.float32
    if loss == "clip":
        return lambda x: ref(x["queries"], x["keys"], CLIP_SCALE, logits_dtype=f32)
    if loss == "info_nce":
        return lambda x: ref(x["queries"], x["keys"], scale=CLIP_SCALE, logits_dtype=f32)
    if loss == "gist":
        return lambda x: ref(x["queries"], x["keys"], scale=CLIP_SCALE, logits_dtype=f32,
                             guide=(x["guide_queries"], x["guide_keys"]))
    if loss == "siglip":
        return lambda x: ref(x["queries"], x["keys"], SIGLIP_SCALE, SIGLIP_BIAS, logits_dtype=f32)
    if two_views(loss):
        t = NT_XENT_TEMPERATURE if loss == "nt_xent" else DCL_TEMPERATURE
        return lambda x: ref(x["queries"], x["keys"], t, normalize=False, logits_dtype=f32)
    # reference.supcon returns (loss, valid rows)
    variant = "in" if loss == "supcon_in" else "out"
    return lambda x: _scalar_out(ref(x["features"], x["labels"], SUPCON_TEMPERATURE, variant=variant,
                                     normalize=False, logits_dtype=f32))


def fastcl_fn(loss: str, backend: str) -> LossFn:
    fn = _public_fn(loss)
    if loss == "clip":
        return lambda x: fn(x["queries"], x["keys"], CLIP_SCALE, backend=backend)
    if loss == "info_nce":
        return lambda x: fn(x["queries"], x["keys"], scale=CLIP_SCALE, backend=backend)
    if loss == "gist":
        if backend in ("cuda", "cpu"):
            raise Unavailable("the compiled extension has no guided false-negative closure")
        return lambda x: fn(x["queries"], x["keys"], scale=CLIP_SCALE, backend=backend,
                            guide=(x["guide_queries"], x["guide_keys"]))
    if loss == "siglip":
        return lambda x: fn(x["queries"], x["keys"], SIGLIP_SCALE, SIGLIP_BIAS, backend=backend)
    if two_views(loss):
        if loss == "dcl" and backend in ("cuda", "cpu"):
            raise Unavailable("the compiled extension has no decoupled closure (DCL)")
        t = NT_XENT_TEMPERATURE if loss == "nt_xent" else DCL_TEMPERATURE
        return lambda x: fn(x["queries"], x["keys"], t, normalize=False, backend=backend)
    if loss == "supcon_in" and backend in ("cuda", "cpu"):
        raise Unavailable("the compiled extension has no target-LSE closure (SupCon L_in)")
    variant = "in" if loss == "supcon_in" else "out"
    return lambda x: _scalar_out(fn(x["features"], x["labels"], SUPCON_TEMPERATURE, variant=variant,
                                    normalize=False, backend=backend))


def _ensure_process_group() -> None:
    """cal_inf_loss reduces over a process group; a one-rank group on this device suffices."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


def infcl_fn(loss: str, ring: bool) -> LossFn:
    if loss not in ("clip", "info_nce"):
        raise Unavailable("Inf-CL implements the softmax InfoNCE only (clip, info_nce)")
    try:
        inf_cl = importlib.import_module("inf_cl")
    except Exception as e:
        raise Unavailable(f"the inf_cl package is not importable ({type(e).__name__})")
    if ring:
        _ensure_process_group()
        one_way = lambda q, k: inf_cl.cal_inf_loss(q, k, scale=CLIP_SCALE).mean()  # noqa: E731
    else:
        def one_way(q, k):
            y = torch.arange(q.shape[0], device=q.device)
            return inf_cl.cal_flash_loss(q, k, y, CLIP_SCALE).mean()
    if loss == "clip":
        return lambda x: (one_way(x["queries"], x["keys"]) + one_way(x["keys"], x["queries"])) / 2
    return lambda x: one_way(x["queries"], x["keys"])


def configure_dynamo() -> None:
    """Let torch.compile recompile for every shape of a sweep: a hit recompile limit makes dynamo
    fall back to eager silently, which would be measured as 'compiled'."""
    import torch._dynamo as dynamo

    cfg = dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))
    if hasattr(cfg, "suppress_errors"):
        cfg.suppress_errors = False  # a failed compile is an error row, never eager timings


def reset_compiled() -> None:
    """Forget every compiled graph (called when the shape, dtype or loss changes)."""
    try:
        import torch._dynamo as dynamo

        dynamo.reset()
    except Exception:  # pragma: no cover
        pass


def build(loss: str, provider: str, device: torch.device, dtype: torch.dtype) -> LossFn:
    """``fn(inputs) -> scalar loss`` for (loss, provider) on (device, dtype), or :class:`Unavailable`."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if provider not in PROVIDERS and provider not in TRITON_VARIANTS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider == "naive":
        return naive_fn(loss)
    if provider == "compiled":
        configure_dynamo()
        return torch.compile(naive_fn(loss), dynamic=False)
    if provider in ("infcl", "infcl-ring"):
        if device.type != "cuda":
            raise Unavailable("Inf-CL runs on CUDA only")
        return infcl_fn(loss, ring=provider == "infcl-ring")
    backend = FASTCL_BACKENDS.get(provider, "triton")
    fn = fastcl_fn(loss, backend)
    check_backend(backend, device, dtype)
    return fn


def default_providers(device: torch.device):
    """The providers of a sweep with no --provider: those that can run here."""
    if device.type == "cuda":
        out = ["naive", "compiled"]
        if infcl_available():
            out.append("infcl")
        out.append("fastcl-triton")
        if extension_available():
            out.append("fastcl-cuda")
        return out
    out = ["naive", "compiled", "fastcl-torch"]
    if extension_available():
        out.append("fastcl-cpu")
    return out
