"""Shared helpers: fresh random inputs and error checks against the float64 reference; the
catalogue of public losses (every closure) on one set of inputs."""
import json
import os
import subprocess
import sys

import torch

import fastcl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_report(module: str, *args: str) -> dict:
    """The JSON that ``python -m module args`` prints, run from the source tree in a process
    without TRITON_INTERPRET (its kernels compiled for GPU targets, or traced as JIT kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def features(n, d, dtype, device, *, normalize=True, requires_grad=True, gen=None):
    """Fresh random (n, d) features (L2-normalised by default), never zeros."""
    x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def as64(x):
    """A float64 leaf copy (keeps requires_grad) of a floating tensor; other values unchanged."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(torch.float64).requires_grad_(x.requires_grad)
    return x


def lowp(x, dtype):
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0:
        return x.detach().to(dtype).requires_grad_(x.requires_grad)
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().requires_grad_(x.requires_grad)
    return x


def err(a, ref):
    return (a.detach().double().cpu() - ref.detach().double().cpu()).norm().item()


def rel(a, ref):
    return err(a, ref) / max(ref.detach().double().norm().item(), 1e-30)


def assert_close(name, ours, ref64, base=None, *, factor=2.0, rtol=1e-5, scale=None):
    """ours must be within ``factor`` x the error of ``base`` (the same computation done by PyTorch
    in the same low precision) plus a small float32-level floor, all measured against float64."""
    e = err(ours, ref64)
    size = scale if scale is not None else max(ref64.detach().double().norm().item(), 1e-12)
    bound = rtol * max(size, 1.0)
    if base is not None:
        bound += factor * err(base, ref64)
    assert e <= bound, (f"{name}: |out-ref| = {e:.3e} (rel {e / size:.3e}) exceeds {bound:.3e}"
                        + (f" (PyTorch low-precision error {err(base, ref64):.3e})" if base is not None else ""))


def grads(out, inputs, grad_out):
    """Gradients of ``out`` w.r.t. the inputs that require grad (None for the others)."""
    want = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    got = iter(torch.autograd.grad(out, want, grad_out.to(out.dtype)))
    return [next(got) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs]


def compiled_step(backend, device, dtype, fullgraph, *, n, d_in, d, seed):
    """(eager, compiled) results (loss, d_w, d_scale), as float32, of a step that projects two
    fresh random (n, d_in) batches by one (d_in, d) weight, normalises them and ends in the fused
    CLIP loss; the compiled one through torch.compile (inductor)."""
    import fastcl

    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d_in, device=device, generator=gen).to(dtype)
    y = torch.randn(n, d_in, device=device, generator=gen).to(dtype)
    w0 = (torch.randn(d_in, d, device=device, generator=gen) / d_in ** 0.5).to(dtype)

    def step(w, s):
        img = torch.nn.functional.normalize(x @ w, dim=1)
        txt = torch.nn.functional.normalize(y @ w, dim=1)
        return fastcl.clip_loss(img, txt, s, backend=backend)

    def run(fn):
        w = w0.clone().requires_grad_()
        s = torch.tensor(14.0, device=device, requires_grad=True)
        loss = fn(w, s)
        return [t.float() for t in (loss, *torch.autograd.grad(loss * 0.7, (w, s)))]

    eager = run(step)
    torch._dynamo.reset()
    return eager, run(torch.compile(step, fullgraph=fullgraph))


def loss_inputs(make, N: int, D: int, dtype: torch.dtype) -> dict:
    """Inputs for every entry of LOSSES / METRICS: features (N, D) ``q``, ``k``, scale ``s``, bias
    ``b``, guide / teacher features ``u``, ``v`` (N, 48), labels, ids, positives, hard negatives
    (N, 3, D), views (N/4, 4, D) and their labels, target weights (N, 2). ``make(*shape, dtype=,
    grad=, integer_high=, value=)`` builds each: integers in [0, integer_high), ``value`` for a
    tensor whose values must make sense (scale, bias, weights), fresh random values otherwise."""
    f32 = torch.float32
    return dict(
        q=make(N, D, dtype=dtype), k=make(N, D, dtype=dtype), s=make(dtype=f32, value=12.0),
        b=make(dtype=f32, value=-1.0), u=make(N, 48, dtype=dtype, grad=False),
        v=make(N, 48, dtype=dtype, grad=False), labels=make(N, integer_high=40),
        ids=make(N, integer_high=N // 2), pos=make(N, integer_high=N), hard=make(N, 3, D, dtype=dtype),
        views=make(N // 4, 4, D, dtype=dtype), view_labels=make(N // 4, integer_high=40),
        weights=make(N, 2, dtype=f32, grad=False, value=0.5))


# every public loss (and each keyword that picks another closure), on inputs from loss_inputs
LOSSES = {
    "info_nce": lambda x: fastcl.info_nce(x["q"], x["k"], scale=x["s"]),
    "info_nce_positives_bias": lambda x: fastcl.info_nce(x["q"], x["k"], positives=x["pos"], scale=x["s"], bias=x["b"]),
    "info_nce_smoothing": lambda x: fastcl.info_nce(x["q"], x["k"], scale=x["s"], label_smoothing=0.1),
    "info_nce_focal": lambda x: fastcl.info_nce(x["q"], x["k"], scale=x["s"], focal_gamma=2.0),
    "info_nce_hard_negatives": lambda x: fastcl.info_nce(x["q"], x["k"], scale=x["s"], hard_negatives=x["hard"]),
    "info_nce_fn_margin": lambda x: fastcl.info_nce(x["q"], x["k"], scale=x["s"], fn_margin=0.1),
    "info_nce_fn_ratio": lambda x: fastcl.info_nce(x["q"], x["k"], scale=x["s"], fn_ratio=0.9),
    "info_nce_key_ids": lambda x: fastcl.info_nce(x["q"], x["k"], scale=x["s"], key_ids=x["ids"]),
    "info_nce_guide": lambda x: fastcl.info_nce(x["q"], x["k"], scale=x["s"], guide=(x["u"], x["v"]), fn_margin=0.1),
    "clip": lambda x: fastcl.clip_loss(x["q"], x["k"], x["s"], x["b"]),
    "clip_smoothing": lambda x: fastcl.clip_loss(x["q"], x["k"], x["s"], label_smoothing=0.1),
    "siglip": lambda x: fastcl.siglip_loss(x["q"], x["k"], x["s"], x["b"]),
    "siglip_labels": lambda x: fastcl.siglip_loss(x["q"], x["k"], x["s"], x["b"], labels=x["labels"]),
    "nt_xent": lambda x: fastcl.nt_xent(x["q"], x["k"], 0.5),
    "supcon_out": lambda x: fastcl.supcon(x["q"], x["labels"], 0.1),
    "supcon_in": lambda x: fastcl.supcon(x["q"], x["labels"], 0.1, variant="in"),
    "supcon_views": lambda x: fastcl.supcon(x["views"], x["view_labels"], 0.1),
    "supcon_keys": lambda x: fastcl.supcon(x["q"], x["labels"], 0.1, keys=x["k"], key_labels=x["ids"]),
    "dcl": lambda x: fastcl.dcl(x["q"], x["k"], 0.1),
    "dclw": lambda x: fastcl.dcl(x["q"], x["k"], 0.1, weight_sigma=0.5),
    "hcl": lambda x: fastcl.hcl(x["q"], x["k"], 0.5),
    "mv_infonce_2_views": lambda x: fastcl.mv_infonce(x["views"][:, :2], 0.1),
    "mv_infonce_4_views": lambda x: fastcl.mv_infonce(x["views"], 0.1),
    "mv_dhel": lambda x: fastcl.mv_dhel(x["views"], 0.1),
    "soft_info_nce": lambda x: fastcl.soft_info_nce(
        x["q"], x["k"], (torch.stack([x["pos"], x["pos"].flip(0)], 1), x["weights"]), scale=x["s"]),
    "distill": lambda x: fastcl.distill(x["q"], x["k"], x["u"], x["v"], x["s"], 10.0),
    "softclip": lambda x: fastcl.softclip(x["q"], x["k"], x["s"], x["u"]),
    "cwcl": lambda x: fastcl.cwcl(x["q"], x["k"], x["u"], x["v"], scale=x["s"]),
    "uniformity": lambda x: fastcl.uniformity_loss(x["q"]),
}
METRICS = {
    "retrieval": lambda x: fastcl.metrics.retrieval(x["q"], x["k"], x["pos"])["MRR"],
    "hard_negatives": lambda x: fastcl.metrics.hard_negatives(x["q"], x["k"], k=8)[0],
}


def shifted_siglip_rows(q, k, s, b, offset):
    """Per-row SigLIP losses sum_j softplus(-z_ij S_ij) of S = s q k^T + b with the positives
    at j = i + offset (those in range; a ring's off-diagonal blocks have none), in q's dtype."""
    logits = s * q @ k.T + b
    z = -torch.ones_like(logits)
    i = torch.arange(q.shape[0], device=q.device)
    inside = (i + offset >= 0) & (i + offset < k.shape[0])
    z[i[inside], (i + offset)[inside]] = 1.0
    return torch.nn.functional.softplus(-z * logits).sum(1)
