"""Public API: modules, backend resolution, autocast, import hygiene."""
import functools
import os
import subprocess
import sys

import pytest
import torch

import fastcl
from fastcl import _backend
from fastcl import reference as R

from ._utils import LOSSES, compiled_step, loss_inputs
from .conftest import DEVICE

# float32 values here are held to float32 bounds: on a GPU with IEEE products too
pytestmark = pytest.mark.usefixtures("ieee_default_products")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(n=12, d=8, dtype=torch.float32):
    return (torch.nn.functional.normalize(torch.randn(n, d, device=DEVICE), dim=1).to(dtype),
            torch.nn.functional.normalize(torch.randn(n, d, device=DEVICE), dim=1).to(dtype))


def test_import_touches_no_gpu():
    code = ("import sys, torch, fastcl; assert not torch.cuda.is_initialized(); "
            "assert 'fastcl.ops.triton.engine' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


_GLOBALS_CHECK = r"""
import builtins, importlib, pkgutil, symtable, sys
import fastcl
missing = []
for info in pkgutil.walk_packages(fastcl.__path__, "fastcl."):
    if info.name.startswith("fastcl._C"):
        continue
    mod = importlib.import_module(info.name)
    src = open(mod.__file__).read()
    stack = [symtable.symtable(src, mod.__file__, "exec")]
    while stack:
        table = stack.pop()
        stack.extend(table.get_children())
        if table.get_type() == "module":
            continue
        for sym in table.get_symbols():
            name = sym.get_name()
            if (sym.is_global() and sym.is_referenced() and name not in vars(mod)
                    and not hasattr(builtins, name)):
                missing.append(f"{info.name}: {table.get_name()} uses {name}")
print("\n".join(missing) if missing else "ok")
"""


def test_no_undefined_module_names():
    """Every global name a function of the package reads exists in its module after a plain
    import. (The Triton interpreter adds names such as ``math`` to the globals of the modules
    whose kernels it runs, so a host-side function that forgot an import passes every CPU test and
    fails only on a GPU.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _GLOBALS_CHECK], cwd=ROOT, capture_output=True,
                         text=True, env={**env, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_public_names():
    for name in ["info_nce", "clip_loss", "siglip_loss", "nt_xent", "supcon", "InfoNCELoss",
                 "ClipLoss", "SigLipLoss", "NTXentLoss", "SupConLoss", "MVDHELLoss"]:
        assert name in fastcl.__all__ and hasattr(fastcl, name)
    assert isinstance(fastcl.__version__, str)


def test_clip_module_matches_open_clip_signature():
    i, t = _pair()
    scale = torch.tensor(14.0, device=DEVICE, requires_grad=True)
    loss_fn = fastcl.ClipLoss()
    out = loss_fn(i, t, scale, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], fastcl.clip_loss(i, t, scale))
    ref = R.clip_loss(i.double(), t.double(), 14.0)
    assert abs(out["contrastive_loss"].item() - ref.item()) < 1e-5
    out["contrastive_loss"].backward()
    assert scale.grad is not None and scale.grad.shape == scale.shape


def test_reduction_none_layout():
    i, t = _pair()
    per = fastcl.clip_loss(i, t, 10.0, reduction="none")
    assert per.shape == (2, 12)
    torch.testing.assert_close(per.mean(), fastcl.clip_loss(i, t, 10.0))
    torch.testing.assert_close(per.sum(), fastcl.clip_loss(i, t, 10.0, reduction="sum"))
    assert fastcl.info_nce(i, t, reduction="none").shape == (12,)


def test_other_modules():
    i, t = _pair()
    torch.testing.assert_close(fastcl.InfoNCELoss(scale=20.0)(i, t), fastcl.info_nce(i, t, scale=20.0))
    torch.testing.assert_close(fastcl.SigLipLoss()(i, t, 10.0, -10.0), fastcl.siglip_loss(i, t, 10.0, -10.0))
    torch.testing.assert_close(fastcl.NTXentLoss(0.3)(i, t), fastcl.nt_xent(i, t, 0.3))
    y = torch.arange(12, device=DEVICE) % 3
    torch.testing.assert_close(fastcl.SupConLoss(0.2)(i, y), fastcl.supcon(i, y, 0.2))


def test_every_loss_has_a_module():
    """Each public loss function has a module of the same loss; each module gives its function's
    value and gradients with the constructor's arguments, and a tensor temperature or scale
    given to the constructor (an ``nn.Parameter``) is registered and learnt."""
    gen = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    q, k, u, v = r(12, 8), r(12, 8), r(12, 5), r(12, 5)
    views = r(6, 3, 8)
    idx = torch.stack([torch.arange(12), torch.randperm(12, generator=gen)], 1).to(DEVICE)
    w = torch.rand(12, 2, generator=gen).to(DEVICE)
    cases = {  # function: (module, module call's inputs, function of the same inputs)
        "info_nce": (fastcl.InfoNCELoss(scale=20.0, bias=-1.0), (q, k),
                     lambda a, b: fastcl.info_nce(a, b, scale=20.0, bias=-1.0)),
        "clip_loss": (fastcl.ClipLoss(reduction="sum"), (q, k, 14.0),
                      lambda a, b, s: fastcl.clip_loss(a, b, s, reduction="sum")),
        "siglip_loss": (fastcl.SigLipLoss(), (q, k, 10.0, -10.0), fastcl.siglip_loss),
        "nt_xent": (fastcl.NTXentLoss(0.3, normalize=False), (q, k),
                    lambda a, b: fastcl.nt_xent(a, b, 0.3, normalize=False)),
        "supcon": (fastcl.SupConLoss(0.2, variant="in"), (views, idx[:6, 1] % 2),
                   lambda a, y: fastcl.supcon(a, y, 0.2, variant="in")),
        "dcl": (fastcl.DCLLoss(0.2, weight_sigma=0.5), (q, k),
                lambda a, b: fastcl.dcl(a, b, 0.2, weight_sigma=0.5)),
        "soft_info_nce": (fastcl.SoftInfoNCELoss(scale=5.0), (q, k, (idx, w)),
                          lambda a, b, t: fastcl.soft_info_nce(a, b, t, scale=5.0)),
        "distill": (fastcl.DistillLoss(directions="col", objective="cross_entropy"),
                    (q, k, u, v, 10.0, 7.0),
                    lambda *a: fastcl.distill(*a, directions="col", objective="cross_entropy")),
        "softclip": (fastcl.SoftClipLoss(target_scale=4.0, alpha=0.3), (q, k, 10.0, u),
                     lambda a, b, s, t: fastcl.softclip(a, b, s, t, 4.0, alpha=0.3)),
        "cwcl": (fastcl.CWCLLoss(scale=9.0), (q, k, u, v),
                 lambda *a: fastcl.cwcl(*a, scale=9.0)),
        "hcl": (fastcl.HCLLoss(0.4, beta=0.5, tau_plus=0.05, reduction="none"), (q, k),
                lambda a, b: fastcl.hcl(a, b, 0.4, beta=0.5, tau_plus=0.05, reduction="none")),
        "mv_infonce": (fastcl.MVInfoNCELoss(0.3), (views,), lambda a: fastcl.mv_infonce(a, 0.3)),
        "mv_dhel": (fastcl.MVDHELLoss(0.3, normalize=False), (views,),
                    lambda a: fastcl.mv_dhel(a, 0.3, normalize=False)),
        "uniformity_loss": (fastcl.UniformityLoss(t=1.5), (q,),
                            lambda a: fastcl.uniformity_loss(a, 1.5)),
        "alignment_loss": (fastcl.AlignmentLoss(alpha=1.0, normalize=False), (q, k),
                           lambda a, b: fastcl.alignment_loss(a, b, 1.0, normalize=False)),
    }
    functions = {n for n in fastcl.__all__ if callable(getattr(fastcl, n)) and n[0].islower()}
    assert functions == set(cases)
    modules = {n for n in fastcl.__all__ if isinstance(getattr(fastcl, n), type)}
    assert modules == {type(m).__name__ for m, _, _ in cases.values()}
    for name, (module, inputs, fn) in cases.items():
        a = inputs[0].clone().requires_grad_()
        got = module(a, *inputs[1:])
        want_a = inputs[0].clone().requires_grad_()
        want = fn(want_a, *inputs[1:])
        torch.testing.assert_close(got, want, msg=name)
        (g,) = torch.autograd.grad(got.sum(), a)
        (gw,) = torch.autograd.grad(want.sum(), want_a)
        torch.testing.assert_close(g, gw, msg=name)
    for module in (fastcl.NTXentLoss(torch.nn.Parameter(torch.tensor(0.3, device=DEVICE))),
                   fastcl.MVDHELLoss(torch.nn.Parameter(torch.tensor(0.3, device=DEVICE))),
                   fastcl.SoftInfoNCELoss(scale=torch.nn.Parameter(torch.tensor(5.0, device=DEVICE)))):
        (p,) = module.parameters()
        inputs = {fastcl.NTXentLoss: (q, k), fastcl.MVDHELLoss: (views,),
                  fastcl.SoftInfoNCELoss: (q, k, (idx, w))}[type(module)]
        (gp,) = torch.autograd.grad(module(*inputs), p)
        assert torch.isfinite(gp) and gp != 0


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    auto_cpu = _backend.AUTO_CPU if _backend.has_extension() else "torch"
    assert _backend.resolve("auto", cpu, torch.float32) == auto_cpu
    assert _backend.resolve(auto_cpu, cpu, torch.bfloat16) == auto_cpu  # taken again as is
    assert _backend.resolve("auto", cpu, torch.float64) == "torch"
    assert _backend.concrete(auto_cpu, extended=False) == ("cpu" if _backend.has_extension() else "torch")
    assert _backend.concrete(auto_cpu, extended=True) == "torch"
    assert _backend.concrete("triton", extended=True) == "triton"
    assert _backend.resolve("torch", cpu, torch.bfloat16) == "torch"
    if _backend.has_triton():
        assert _backend.resolve("auto", torch.device("cuda"), torch.bfloat16) == "triton"
        assert _backend.resolve("auto", torch.device("cuda"), torch.float64) == "torch"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            _backend.resolve("triton", cpu, torch.float32)


def test_extension_backends_explain_themselves():
    if _backend.has_extension():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            _backend.resolve("cuda", torch.device("cpu"), torch.float32)
    else:
        with pytest.raises(RuntimeError, match="compiled extension"):
            _backend.resolve("cpu", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_casts_features_like_a_matmul(backend):
    """Under autocast, float32 features are cast to the autocast dtype (as the similarity matmul
    would be); statistics and the loss stay float32 and gradients reach the float32 inputs."""
    i, t = _pair(16, 16)
    i.requires_grad_()
    dev = DEVICE.type
    with torch.autocast(dev, dtype=torch.bfloat16):
        loss = fastcl.clip_loss(i, t, 10.0, backend=backend)
    assert loss.dtype == torch.float32
    expect = fastcl.clip_loss(i.detach().to(torch.bfloat16), t.to(torch.bfloat16), 10.0, backend=backend)
    torch.testing.assert_close(loss.detach(), expect)
    loss.backward()
    assert i.grad is not None and i.grad.dtype == torch.float32 and torch.isfinite(i.grad).all()


_SELF_SIM = {  # loss(z (B, V, D), normalize)
    "nt_xent": (lambda z, n=True: fastcl.nt_xent(z[:, 0], z[:, 1], 0.5, normalize=n)),
    "supcon_views": (lambda z, n=True: fastcl.supcon(z, torch.arange(z.shape[0], device=z.device) % 3,
                                                      0.5, normalize=n)),
    "mv_infonce": (lambda z, n=True: fastcl.mv_infonce(z, 0.5, normalize=n)),
    "uniformity": (lambda z, n=True: fastcl.uniformity_loss(z[:, 0], normalize=n)),
}


@pytest.mark.parametrize("loss", sorted(_SELF_SIM))
def test_autocast_self_similarities(loss):
    """The self-similarity losses under autocast: float32 views (B, V, D), not unit length, give
    the loss of their unit rows rounded to bfloat16 (with normalize=False); the gradients reach
    the float32 inputs, in float32, within bfloat16's error of the float64 loss's."""
    fn = _SELF_SIM[loss]
    gen = torch.Generator().manual_seed(11)
    z = (2.0 * torch.randn(24, 3, 16, generator=gen)).to(DEVICE).requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = fn(z)
    (g,) = torch.autograd.grad(got, z)
    unit = torch.nn.functional.normalize(z.detach(), dim=-1).to(torch.bfloat16)
    # (uniformity's unnormalised form carries |x|^2 in an extra feature: a different rounding)
    torch.testing.assert_close(got.detach(), fn(unit, False).float(), rtol=1e-4, atol=1e-6)
    z64 = z.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(fn(z64), z64)
    assert g.dtype == torch.float32
    assert ((g.double() - want).norm() / want.norm()).item() < 2e-2


def test_mixed_dtypes_allowed_under_autocast():
    i, t = _pair(8, 8)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = fastcl.info_nce(i, t.to(torch.bfloat16), backend="torch")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_training_step_cpu(backend):
    """A compiled step (torch.compile, inductor, one graph) that projects, normalises and ends in
    the fused CLIP loss gives the eager loss and gradients on the CPU: the torch backend traced
    through, the C++ extension through its fake kernels. (Dynamo cannot trace Triton's CPU
    interpreter; tests/test_gpu.py checks the Triton backend compiled on a GPU.)"""
    if backend == "cpu":
        pytest.importorskip("fastcl._C", reason="the C++ extension fastcl._C is not built")
    eager, compiled = compiled_step(backend, torch.device("cpu"), torch.float32, True, n=70,
                                    d_in=24, d=40, seed=12)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)


def _cpu_inputs(seed: int, n: int = 64) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def make(*shape, dtype=torch.float32, grad=True, integer_high=None, value=None):
        if integer_high is not None:
            return torch.randint(0, integer_high, shape, generator=gen)
        if value is not None:
            x = torch.full(shape, value, dtype=dtype)
        else:
            x = torch.nn.functional.normalize(torch.randn(shape, generator=gen), dim=-1).to(dtype)
        return x.requires_grad_(grad)

    return loss_inputs(make, n, 24, torch.float32)


@functools.lru_cache(maxsize=None)
def _dynamo_logs_symbolic_sizes() -> bool:
    """Whether this torch's dynamo traces math.log of a symbolic size (torch 2.14 does, 2.4.1
    does not: there dynamic=True breaks the graph at the losses' log counts)."""
    import math
    torch._dynamo.reset()
    try:
        torch.compile(lambda x: x * math.log(x.shape[0]), fullgraph=True, dynamic=True,
                      backend="aot_eager")(torch.ones(3))
        return True
    except Exception:
        return False
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_torch_compile_one_graph_cpu(loss, dynamic):
    """Every loss of the catalogue (each closure) compiles as one graph (``fullgraph=True``,
    inductor: dynamo and AOTAutograd through the autograd Functions, value checks as assertions
    in the graph) and gives the eager loss and gradients, with the default backend on CPU tensors
    (the C++ ops' fake kernels, the torch engine); with ``dynamic=True`` (symbolic sizes and
    floats) at two batch sizes, traced (dynamo and AOTAutograd) and run without inductor's code
    generation. tests/test_gpu_plan.py traces the Triton backend."""
    if dynamic and not _dynamo_logs_symbolic_sizes():
        pytest.skip("this torch's dynamo takes no math.log of a symbolic size")
    torch._dynamo.reset()
    compiled_step = torch.compile(lambda x: LOSSES[loss](x), fullgraph=True, dynamic=dynamic,
                                  backend="aot_eager" if dynamic else "inductor")
    for n in (64, 40) if dynamic else (64,):
        x = _cpu_inputs(5 + n, n)
        leaves = [t for t in x.values() if t.requires_grad]
        eager = LOSSES[loss](x)
        g_eager = torch.autograd.grad(eager, leaves, allow_unused=True)
        compiled = compiled_step(x)
        g_compiled = torch.autograd.grad(compiled, leaves, allow_unused=True)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        for name, c, e in zip([k for k, t in x.items() if t.requires_grad], g_compiled, g_eager):
            assert (c is None) == (e is None), name
            if e is not None:
                torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("vector", [False, True])
def test_row_dots(monkeypatch, dtype, vector):
    """fastcl.autograd.row_dots: <a_i, b_i> (or <a_i, b>) in float32 (float64 for float64) and
    its gradients, one row chunk at a time (here chunks of 2 rows and a remainder), against
    float64 on the same rounded inputs; either operand may go without a gradient."""
    from fastcl import autograd as A
    monkeypatch.setattr(A, "_DOT_CHUNK_BYTES", 2 * 4 * 7)
    a = torch.randn(9, 7, device=DEVICE).to(dtype)
    b = torch.randn(7 if vector else (9, 7), device=DEVICE).to(dtype)
    g = torch.randn(9, device=DEVICE, dtype=torch.float64)
    for need_a, need_b in ((True, True), (True, False), (False, True)):
        x, y = a.clone().requires_grad_(need_a), b.clone().requires_grad_(need_b)
        out = A.row_dots(x, y)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        x64, y64 = x.detach().double().requires_grad_(need_a), y.detach().double().requires_grad_(need_b)
        ref = (x64 * y64).sum(-1)
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
        got = torch.autograd.grad(out, [t for t in (x, y) if t.requires_grad], g.to(out.dtype))
        want = torch.autograd.grad(ref, [t for t in (x64, y64) if t.requires_grad], g)
        for gg, ww, t in zip(got, want, [t for t in (x, y) if t.requires_grad]):
            assert gg.dtype == t.dtype and gg.shape == t.shape
            tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
            torch.testing.assert_close(gg.double(), ww, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_row_bilinear(monkeypatch, dtype):
    """fastcl.autograd.row_bilinear: a_i^T W u_i in float32 (float64 for float64 a) and its
    gradients for a, W and u (each in its own dtype), one row chunk at a time (chunks of 2 rows
    and a remainder here), against float64 on the same rounded inputs; any of them may go
    without a gradient."""
    from fastcl import autograd as A
    monkeypatch.setattr(A, "_DOT_CHUNK_BYTES", 2 * 4 * 7)
    gen = torch.Generator().manual_seed(3)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    a = torch.randn(9, 7, generator=gen).to(DEVICE, dtype)
    w = torch.randn(7, 5, generator=gen).to(DEVICE, wide)
    u = torch.randn(9, 5, generator=gen).to(DEVICE, wide)
    g = torch.randn(9, generator=gen, dtype=torch.float64).to(DEVICE)
    for needs in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        x, m, y = (t.clone().requires_grad_(n) for t, n in zip((a, w, u), needs))
        out = A.row_bilinear(x, m, y)
        assert out.dtype == wide
        x64, m64, y64 = (t.detach().double().requires_grad_(n) for t, n in zip((x, m, y), needs))
        ref = ((x64 @ m64) * y64).sum(-1)
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
        got = torch.autograd.grad(out, [t for t in (x, m, y) if t.requires_grad], g.to(out.dtype))
        want = torch.autograd.grad(ref, [t for t in (x64, m64, y64) if t.requires_grad], g)
        for gg, ww, t in zip(got, want, [t for t in (x, m, y) if t.requires_grad]):
            assert gg.dtype == t.dtype and gg.shape == t.shape
            tol = 1e-6 if gg.dtype in (torch.float32, torch.float64) else 1e-2
            torch.testing.assert_close(gg.double(), ww, rtol=tol, atol=tol)


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                             (torch.float32, None), (torch.float64, None),
                                             (torch.float32, torch.bfloat16)])
def test_unit_rows(monkeypatch, dtype, out_dtype):
    """fastcl.autograd.unit_rows(x_1, x_2, dtype=...): F.normalize(torch.cat(xs).to(dtype)) and
    its gradient for each part (in the part's dtype), one row chunk at a time (chunks of 3 rows
    and remainders here), against float64; either part may go without a gradient. Rounded to 16
    bits, the values and gradients are within 1.2x the error of PyTorch's own F.normalize in that
    dtype. A zero row and a row shorter than eps take F.normalize's x / eps (gradient g / eps),
    except in float16, whose range holds neither 1 / eps nor F.normalize's eps."""
    from fastcl import autograd as A
    monkeypatch.setattr(A, "_DOT_CHUNK_BYTES", 3 * 4 * 7)
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(10, 7, generator=gen).to(DEVICE)
    b = 3.0 * torch.randn(8, 7, generator=gen).to(DEVICE)
    short = torch.zeros(18, dtype=torch.bool, device=DEVICE)
    out_dt = out_dtype or dtype
    if torch.float16 not in (dtype, out_dt):
        a[2] = 0.0
        b[5] = 1e-14 * b[5]  # |b_5| < eps
        short[[2, 15]] = True
    a, b = a.to(dtype), b.to(dtype)
    g = torch.randn(18, 7, generator=gen).to(DEVICE)
    exact = out_dt in (torch.float32, torch.float64)
    for need_a, need_b in ((True, True), (True, False), (False, True)):
        x, y = a.clone().requires_grad_(need_a), b.clone().requires_grad_(need_b)
        out = A.unit_rows(x, y, dtype=out_dtype)
        assert out.dtype == out_dt and out.shape == (18, 7)
        x64, y64 = x.detach().double().requires_grad_(need_a), y.detach().double().requires_grad_(need_b)
        ref = torch.nn.functional.normalize(torch.cat([x64, y64]), dim=1)
        # PyTorch's own, in the output's dtype (the tolerance of rounded results)
        xt, yt = x.detach().to(out_dt).requires_grad_(need_a), y.detach().to(out_dt).requires_grad_(need_b)
        torch_out = torch.nn.functional.normalize(torch.cat([xt, yt]), dim=1)
        assert _rel(out, ref) <= (1e-6 if exact else 1.2 * _rel(torch_out, ref))
        got = torch.autograd.grad(out, [t for t in (x, y) if t.requires_grad], g.to(out_dt))
        want = torch.autograd.grad(ref, [t for t in (x64, y64) if t.requires_grad], g.to(out_dt).double())
        theirs = torch.autograd.grad(torch_out, [t for t in (xt, yt) if t.requires_grad], g.to(out_dt))
        parts = [(t, short[:10] if t is x else short[10:]) for t in (x, y) if t.requires_grad]
        for gg, ww, tt, (t, s) in zip(got, want, theirs, parts):
            assert gg.dtype == t.dtype and gg.shape == t.shape
            # the rows in range, and the short rows' g / eps apart (1e12 times the others)
            assert _rel(gg[~s], ww[~s]) <= (1e-6 if exact and dtype != torch.float16
                                            else 1.2 * _rel(tt[~s], ww[~s])), (_rel(gg[~s], ww[~s]),
                                                                               _rel(tt[~s], ww[~s]))
            if s.any():
                assert _rel(gg[s], ww[s]) <= (1e-6 if exact and dtype != torch.float16 else 2 ** -8)


def test_unit_rows_keeps_only_its_output(monkeypatch):
    """Two views stacked and normalised, forward and backward: unit_rows holds its output (and
    O(R) norms) and at most its output, the incoming gradient and the views' gradients (and
    float32 row chunks, 256 rows here), where F.normalize(torch.cat(...)) also keeps the
    concatenation for its backward and forms temporaries of its size there."""
    # (the allocation record of the launch plans; bench/ is not copied to the floor environment)
    _Record = pytest.importorskip("bench.launch_plan")._Record
    from fastcl import autograd as A
    chunk = 256 * 64 * 4
    monkeypatch.setattr(A, "_DOT_CHUNK_BYTES", chunk)
    z1, z2 = (torch.randn(4096, 64, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    g = torch.randn(8192, 64, dtype=torch.bfloat16)
    view = 2 * z1.numel() * z1.element_size()  # the stacked views' bytes

    def peak(fn):
        """(bytes held once the forward has returned, peak over forward and backward)"""
        with _Record() as rec:
            out = fn()
            held = sum(n for ref, n in rec.live.values() if not ref.expired())
            torch.autograd.grad(out, (z1, z2), g)
            del out
        return held, rec.peak

    ours = peak(lambda: A.unit_rows(z1, z2))
    theirs = peak(lambda: torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1))
    assert ours[0] <= 1.05 * view and theirs[0] >= 2 * view, (ours, theirs)
    assert ours[1] <= 3.05 * view + 3 * chunk < theirs[1], (ours, theirs)


def test_auto_backend_on_cpu_takes_the_extension_where_it_can(monkeypatch):
    """backend="auto" on CPU tensors: the C++ kernels (faster than the torch engine at every
    size measured, bench/results/cpu-n4096-d256) for the closures they implement, the torch
    engine for the rest and for float64; the same values as naming each backend."""
    pytest.importorskip("fastcl._C", reason="the C++ extension fastcl._C is not built")
    from fastcl.ops import cpp, torch_engine
    seen = []
    for mod, name in ((cpp, "cpu"), (torch_engine, "torch")):
        for fn in ("forward", "backward", "step")[:3 if mod is cpp else 2]:
            real = getattr(mod, fn)
            monkeypatch.setattr(mod, fn, lambda *a, _r=real, _n=name, **kw: (seen.append(_n), _r(*a, **kw))[1])
    gen = torch.Generator().manual_seed(13)
    q, k = (torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=1).requires_grad_()
            for _ in range(2))
    labels = torch.randint(0, 5, (40,), generator=gen)
    cases = [("clip", lambda be: fastcl.clip_loss(q, k, 14.0, backend=be), "cpu"),
             # (a row-only loss reduced to its total: forward and gradients in one step)
             ("siglip", lambda be: fastcl.siglip_loss(q, k, 10.0, -10.0, backend=be), "cpu", 1),
             ("supcon_out", lambda be: fastcl.supcon(q, labels, 0.1, backend=be), "cpu", 1),
             ("supcon_in", lambda be: fastcl.supcon(q, labels, 0.1, variant="in", backend=be), "torch"),
             # (three sweeps: each view against itself, the views against each other)
             ("dcl", lambda be: fastcl.dcl(q, k, 0.1, backend=be), "torch", 6),
             ("fn_margin", lambda be: fastcl.info_nce(q, k, fn_margin=0.1, backend=be), "torch"),
             ("float64", lambda be: fastcl.info_nce(q.double(), k.double(), backend=be), "torch")]
    for name, loss, want, *calls in cases:
        seen.clear()
        out = loss("auto")
        g = torch.autograd.grad(out, (q, k), allow_unused=True)
        assert seen == [want] * (calls[0] if calls else 2), (name, seen)
        named = loss(want)
        torch.testing.assert_close(out, named, rtol=0, atol=0)
        for a, b in zip(g, torch.autograd.grad(named, (q, k), allow_unused=True)):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    seen.clear()
    fastcl.metrics.retrieval(q.detach(), k.detach())  # ranks: the torch engine's count_above
    assert fastcl.metrics.hard_negatives(q.detach(), k.detach(), k=3)[0].shape == (40, 3)
