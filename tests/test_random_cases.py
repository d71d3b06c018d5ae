"""Every loss on random configurations, its options drawn together (positives, bias, tensor
scales, label smoothing or focal weighting, hard negatives, false-negative rules and guides,
labels, views, separate keys, soft and teacher targets, reductions, which inputs need a gradient,
a random grad_output), each backend against the float64 reference: the torch backend in float64
to 1e-9, the C++ CPU and Triton backends in float32 with IEEE products (``exact=True``: the
TF32 mode's false-negative rule keeps keys within TF32 rounding of the threshold, which the
reference does not) within 4x PyTorch's own float32 error or a float32 floor. Loss value and every
gradient, relative to the reference's norm (a result that is zero: absolute, ~8 ulps of the loss)."""
import math
import os
import random
import zlib

import pytest
import torch

import fastcl
from fastcl import _backend
from fastcl import reference as R

from .conftest import DEVICE

F64 = torch.float64
LOSSES = ("info_nce", "clip", "siglip", "nt_xent", "supcon", "dcl", "hcl", "soft_info_nce",
          "distill", "cwcl", "softclip", "mv_infonce", "mv_dhel", "uniformity")
# configurations per loss: more where more options combine
CASES = [(loss, seed) for loss in LOSSES
         for seed in range({"info_nce": 16, "clip": 6, "supcon": 8, "siglip": 6}.get(loss, 4))]


class _Draw:
    """Random sizes and options from one seed, and the case's float64 inputs (requires_grad
    drawn for each unless given)."""

    def __init__(self, loss: str, seed: int):
        self.rng = random.Random(seed * 1009 + zlib.crc32(loss.encode()))
        self.gen = torch.Generator().manual_seed(seed)
        self.inputs = {}

    def pick(self, *choices):
        return self.rng.choice(choices)

    def int(self, lo, hi):
        return self.rng.randint(lo, hi)

    def chance(self, p):
        return self.rng.random() < p

    def tensor(self, name, *shape, grad=None, unit=False):
        x = torch.randn(*shape, generator=self.gen, dtype=F64)
        if unit:
            x = torch.nn.functional.normalize(x, dim=-1)
        self.inputs[name] = x.requires_grad_(self.chance(0.8) if grad is None else grad)
        return name

    def scalar(self, name, *values):
        """A float, or (half the time) a one-element tensor that takes a gradient."""
        v = self.pick(*values)
        if self.chance(0.5):
            self.inputs[name] = torch.tensor(v, dtype=F64, requires_grad=True)
            return name
        return v

    def index(self, name, high, *shape):
        self.inputs[name] = torch.randint(0, high, shape, generator=self.gen)
        return name


def _draw(loss: str, seed: int):
    """(call(fn, x), ref(x), inputs, public): ``public`` the loss's fastcl function, ``call``
    runs ``fn`` (``public`` with a backend bound) on the inputs ``x`` (a dict of tensors by
    name, as ``inputs``), ``ref`` the reference on them."""
    d = _Draw(loss, seed)
    N, D = d.int(2, 28), d.int(2, 16)
    red = d.pick("mean", "sum", "none")
    unit = d.chance(0.5)
    opt = lambda x, v: x[v] if isinstance(v, str) else v  # noqa: E731  (a name or a float)

    if loss == "info_nce":
        pos = d.chance(0.5)
        M = d.int(2, 60) if pos else d.int(N, N + 25)
        q, k = d.tensor("q", N, D, unit=unit), d.tensor("k", M, D, unit=unit)
        kw = {}
        if pos:
            kw["positives"] = d.index("positives", M, N)
        s = d.scalar("s", 1.0, 5.0, 14.3, 50.0)
        b = d.scalar("b", -2.5, 1.5) if d.chance(0.4) else None
        rule = d.pick(None, None, "margin", "ratio", "ids", "guide", "guide_ratio")
        if rule in ("guide", "guide_ratio"):
            dg = d.int(1, 8)
            d.tensor("gu", N, dg, grad=False), d.tensor("gv", M, dg, grad=False)
            kw["guide"] = ("gu", "gv")
        elif d.chance(0.3):
            kw["hard_negatives"] = d.tensor("hn", N, d.int(1, 4), D)
        if rule == "margin" or (rule == "guide" and d.chance(0.5)):
            kw["fn_margin"] = d.rng.uniform(0.0, 1.5)
        if rule in ("ratio", "guide_ratio"):
            kw["fn_ratio"] = d.rng.uniform(0.5, 1.0)
        if rule == "ids":
            kw["key_ids"] = d.index("key_ids", max(1, M // 2), M)
        if rule is None and d.chance(0.5):
            if d.chance(0.5):
                kw["label_smoothing"] = d.pick(0.05, 0.3)
            else:
                kw["focal_gamma"] = d.pick(0.5, 2.5)

        def args(x):
            out = {n: (tuple(x[t] for t in v) if isinstance(v, tuple) else
                       x[v] if isinstance(v, str) else v) for n, v in kw.items()}
            return dict(out, scale=opt(x, s), bias=None if b is None else opt(x, b), reduction=red)
        return ((lambda fn, x: fn(x[q], x[k], **args(x))),
                (lambda x: R.info_nce(x[q], x[k], **args(x))), d.inputs, fastcl.info_nce)

    if loss == "clip":
        q, k = d.tensor("q", N, D, unit=unit), d.tensor("k", N, D, unit=unit)
        s, b = d.scalar("s", 1.0, 10.0, 50.0), (d.scalar("b", -2.0, 0.5) if d.chance(0.4) else None)
        kw = {}
        if d.chance(0.5):
            kw["label_smoothing" if d.chance(0.5) else "focal_gamma"] = d.pick(0.1, 0.25)

        def ref(x):
            if not kw:
                return R.clip_loss(x[q], x[k], opt(x, s), None if b is None else opt(x, b), red)
            both = [R.info_nce(a, c, None, opt(x, s), None if b is None else opt(x, b),
                               reduction="none", **kw) for a, c in ((x[q], x[k]), (x[k], x[q]))]
            per = torch.stack(both)
            return per if red == "none" else (per.mean() if red == "mean" else per.sum())
        return ((lambda fn, x: fn(x[q], x[k], opt(x, s), None if b is None else opt(x, b),
                                  reduction=red, **kw)), ref, d.inputs, fastcl.clip_loss)

    if loss == "siglip":
        M = N if d.chance(0.5) else d.int(1, 28)
        q, k = d.tensor("q", N, D, unit=unit), d.tensor("k", M, D, unit=unit)
        s, b = d.scalar("s", 1.0, 10.0), d.scalar("b", -10.0, 0.0, 2.0)
        lab = d.index("labels", d.int(1, 4), N) if M == N and d.chance(0.5) else None

        def kw(x):
            return dict(labels=None if lab is None else x[lab], reduction=red)
        return ((lambda fn, x: fn(x[q], x[k], opt(x, s), opt(x, b), **kw(x))),
                (lambda x: R.siglip_loss(x[q], x[k], opt(x, s), opt(x, b), **kw(x))), d.inputs,
                fastcl.siglip_loss)

    if loss in ("nt_xent", "dcl", "hcl"):
        z1, z2 = d.tensor("z1", N, D), d.tensor("z2", N, D)
        if loss == "nt_xent":
            t = d.scalar("t", 0.1, 0.5, 1.0)
            return ((lambda fn, x: fn(x[z1], x[z2], opt(x, t), normalize=unit, reduction=red)),
                    (lambda x: R.nt_xent(x[z1], x[z2], opt(x, t), unit, red)), d.inputs,
                    fastcl.nt_xent)
        if loss == "dcl":
            t, ws = d.scalar("t", 0.1, 0.5), d.pick(None, 0.5)
            return ((lambda fn, x: fn(x[z1], x[z2], opt(x, t), weight_sigma=ws, normalize=unit,
                                      reduction=red)),
                    (lambda x: R.dcl(x[z1], x[z2], opt(x, t), ws, unit, red)), d.inputs, fastcl.dcl)
        t, beta, tp = d.pick(0.2, 0.5), d.pick(0.0, 0.5, 1.0), d.pick(0.0, 0.1)
        return ((lambda fn, x: fn(x[z1], x[z2], t, beta=beta, tau_plus=tp, normalize=unit,
                                  reduction=red)),
                (lambda x: R.hcl(x[z1], x[z2], t, beta, tp, unit, red)), d.inputs, fastcl.hcl)

    if loss == "supcon":
        V = d.int(1, 3)
        f = d.tensor("f", N, V, D) if V > 1 or d.chance(0.5) else d.tensor("f", N, D)
        n_cls = d.int(1, 6)
        lab = d.index("labels", n_cls, N)
        t, variant = d.scalar("t", 0.07, 0.1, 0.5), d.pick("out", "in")
        keys = None
        if d.chance(0.3):
            mk = d.int(1, 28)
            keys = (d.tensor("keys", mk, D), d.index("key_labels", n_cls, mk))

        def kw(x):
            return {} if keys is None else dict(keys=x[keys[0]], key_labels=x[keys[1]])

        def ref(x):
            per, valid = R.supcon(x[f], x[lab], opt(x, t), variant, unit, "none", **kw(x))
            if red == "none":
                return per
            return per.sum() / valid.sum().clamp_min(1) if red == "mean" else per.sum()
        return ((lambda fn, x: fn(x[f], x[lab], opt(x, t), variant=variant, normalize=unit,
                                  reduction=red, **kw(x))), ref, d.inputs, fastcl.supcon)

    if loss == "soft_info_nce":
        M = d.int(N, N + 10)
        q, k = d.tensor("q", N, D, unit=unit), d.tensor("k", M, D, unit=unit)
        s, b = d.scalar("s", 5.0, 14.0), (d.scalar("b", 1.0) if d.chance(0.3) else None)
        K = d.int(1, 3)
        idx = torch.randint(0, M, (N, K), generator=d.gen)
        w = torch.rand(N, K, generator=d.gen, dtype=F64)
        dense = torch.zeros(N, M, dtype=F64).index_put_(
            (torch.arange(N)[:, None].expand(N, K), idx), w, accumulate=True)
        d.inputs.update(idx=idx, w=w.requires_grad_(False), dense=dense.requires_grad_(False))
        use_dense = d.chance(0.3)

        def targets(x):
            return x["dense"] if use_dense else (x["idx"], x["w"])
        return ((lambda fn, x: fn(x[q], x[k], targets(x), scale=opt(x, s),
                                  bias=None if b is None else opt(x, b), reduction=red)),
                (lambda x: R.soft_info_nce(x[q], x[k], x["dense"], opt(x, s),
                                           None if b is None else opt(x, b), red)), d.inputs,
                fastcl.soft_info_nce)

    if loss in ("distill", "cwcl", "softclip"):
        M = N if loss != "cwcl" else d.int(2, 28)
        q, k = d.tensor("q", N, D, unit=unit), d.tensor("k", M, D, unit=unit)
        s = d.scalar("s", 5.0, 14.0)
        dt_ = d.int(1, 8)
        u = d.tensor("u", N, dt_, grad=False, unit=True)
        if loss == "distill":
            v = d.tensor("v", M, dt_, grad=False, unit=True)
            ts, obj = d.pick(5.0, 20.0), d.pick("kl", "cross_entropy")
            dirs = d.pick("both", "row", "col")

            def ref(x):
                rows = R.distill(x[q], x[k], x[u], x[v], opt(x, s), ts, "none", obj)
                cols = R.distill(x[k], x[q], x[v], x[u], opt(x, s), ts, "none", obj)
                per = {"row": rows, "col": cols, "both": torch.stack([rows, cols])}[dirs]
                return per if red == "none" else (per.mean() if red == "mean" else per.sum())
            return ((lambda fn, x: fn(x[q], x[k], x[u], x[v], opt(x, s), ts, directions=dirs,
                                      objective=obj, reduction=red)), ref, d.inputs, fastcl.distill)
        if loss == "cwcl":
            v = d.tensor("v", M, dt_, grad=False, unit=True)
            return ((lambda fn, x: fn(x[q], x[k], x[u], x[v], scale=opt(x, s), reduction=red)),
                    (lambda x: R.cwcl(x[q], x[k], x[u], x[v], opt(x, s), red)), d.inputs,
                    fastcl.cwcl)
        ts, alpha = d.pick(5.0, 10.0), d.pick(0.0, 0.3, 1.0)
        return ((lambda fn, x: fn(x[q], x[k], opt(x, s), x[u], ts, alpha=alpha, reduction=red)),
                (lambda x: R.softclip(x[q], x[k], opt(x, s), x[u], ts, alpha, red)), d.inputs,
                fastcl.softclip)

    if loss in ("mv_infonce", "mv_dhel"):
        f = d.tensor("f", d.int(2, 12), d.int(2, 4), D)
        t = d.scalar("t", 0.1, 0.5)
        ref_fn = getattr(R, loss)
        return ((lambda fn, x: fn(x[f], opt(x, t), normalize=unit, reduction=red)),
                (lambda x: ref_fn(x[f], opt(x, t), unit, red)), d.inputs, getattr(fastcl, loss))

    assert loss == "uniformity"
    z, t = d.tensor("x", N, D), d.pick(1.0, 2.0)
    return ((lambda fn, x: fn(x[z], t, normalize=unit)),
            (lambda x: R.uniformity(x[z], t, unit)), d.inputs, fastcl.uniformity_loss)


def _cast(inputs, dtype, device):
    return {n: (t.detach().to(device=device, dtype=dtype).requires_grad_(t.requires_grad)
                if t.is_floating_point() else t.to(device)) for n, t in inputs.items()}


def _run(fn, x, seed):
    """(value, gradients of the inputs that need one), in float64 on the CPU; the backward of a
    random grad_output (drawn in float64, then cast)."""
    out = fn(x)
    gen = torch.Generator().manual_seed(seed + 7)
    go = torch.randn(out.shape, generator=gen, dtype=F64) if out.dim() else \
        torch.tensor(0.7, dtype=F64)
    leaves = [t for t in x.values() if t.requires_grad]
    grads = torch.autograd.grad(out, leaves, go.to(out), allow_unused=True) if leaves else []
    return [out.detach().double().cpu()] + [None if g is None else g.double().cpu() for g in grads]


def _floor(ref):
    return 1e-6 * max(ref[0].norm().item(), 1.0)


def _errors(got, ref):
    """Relative error of each result; a result whose reference is (near) zero, such as a bias's
    gradient under a softmax, is measured against the size of the loss instead (:func:`_floor`)."""
    floor = _floor(ref)
    out = []
    for a, b in zip(got, ref):
        if a is None or b is None:
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
        out.append((a - b).norm().item() / max(b.norm().item(), floor))
    return out


def _zero_results(ref):
    """Whether each reference result is (near) zero: float32 gets it only as the rounding left of
    terms that cancel, so PyTorch's own error there is chance, and such a result may be off by up
    to the floor itself (~8 ulps of the loss)."""
    return [b is None or b.norm().item() < _floor(ref) for b in ref]


@pytest.mark.parametrize("loss,seed", CASES)
def test_torch_backend_float64(loss, seed):
    call, ref, inputs, public = _draw(loss, seed)
    want = _run(ref, inputs, seed)
    got = _run(lambda x: call(lambda *a, **k: public(*a, **k, backend="torch"), x), inputs, seed)
    errs = _errors(got, want)
    assert max(errs) < 1e-9, (loss, seed, errs)


def _backends():
    out = []
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if _backend.has_triton() and (DEVICE.type == "cuda" or interpreted):
        out.append("triton")
    if _backend.has_extension():
        out.append("cpu")
    return out


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("loss,seed", CASES)
def test_kernels_float32(loss, seed, backend):
    if backend not in _backends():
        pytest.skip(f"backend {backend!r} is not available here")
    call, ref, inputs, public = _draw(loss, seed)
    device = DEVICE if backend == "triton" else torch.device("cpu")
    want = _run(ref, inputs, seed)
    base = _errors(_run(ref, _cast(inputs, torch.float32, "cpu"), seed), want)
    x32 = _cast(inputs, torch.float32, device)
    try:
        got = _run(lambda x: call(lambda *a, **k: public(*a, **k, backend=backend, exact=True), x),
                   x32, seed)
    except ValueError as e:  # (the C++ kernels leave some closures to the other backends)
        if backend == "cpu" and "does not implement" in str(e):
            pytest.skip(str(e))
        raise
    errs = _errors(got, want)
    # (PyTorch's float32 result may itself be NaN: then the floor alone)
    tol = [max(2e-5, 4 * b if math.isfinite(b) else 0.0, 1.0 if zero else 0.0)
           for b, zero in zip(base, _zero_results(want))]
    assert all(e <= t for e, t in zip(errs, tol)), (loss, seed, errs, base)
