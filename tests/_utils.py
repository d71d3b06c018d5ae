"""Shared helpers: fresh random inputs and error checks against the float64 reference."""
import torch


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
