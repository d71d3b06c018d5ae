"""Gather and ring modes over gloo on CPU (2 and 4 processes) against the float64 single-process
reference: loss values and the gradients of features, scale and bias, under the documented
averaging convention (features: W x their slice of the reference gradient; scale/bias: exact)."""
import importlib.util
import itertools
import os

import pytest
import torch
import torch.distributed as dist

from fastcl import distributed as fdist
from fastcl import reference

from ._gloo import run_gloo

TOL = 1e-10


def _feats(gen, n, d, requires_grad=True):
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    return x.requires_grad_(requires_grad)


def _close(name, got, want, tol=TOL):
    err = (got.detach() - want.detach()).abs().max().item()
    size = max(want.detach().abs().max().item(), 1.0)
    if not err <= tol * size:
        raise AssertionError(f"{name}: max |got - want| = {err:.3e} (scale {size:.3e})")


def _grads(loss, inputs, g):
    want = [x for x in inputs if x is not None and x.requires_grad]
    got = iter(torch.autograd.grad(loss, want, torch.tensor(g, dtype=loss.dtype)))
    return [next(got) if x is not None and x.requires_grad else None for x in inputs]


def _check(tag, W, r, loss, ref_loss, local, ref_global, grad_out, sizes, zero_ok=(), tol=TOL):
    """local: [local features..., scale, bias]; ref_global: the same for the whole batch."""
    _close(f"{tag} loss", loss, ref_loss, tol)
    got = _grads(loss, local, grad_out)
    want = _grads(ref_loss, ref_global, grad_out)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            if a is not None:
                raise AssertionError(f"{tag} input {i}: unexpected gradient")
            continue
        if i < len(sizes):  # features: W x this rank's slice
            n = sizes[i]
            b = W * b[r * n:(r + 1) * n]
        if i in zero_ok:
            if a.abs().max() > 1e-9:
                raise AssertionError(f"{tag} input {i}: gradient {a} should vanish")
            continue
        if b.abs().max() == 0:
            raise AssertionError(f"{tag} input {i}: zero reference gradient (vacuous check)")
        _close(f"{tag} grad {i}", a, b, tol)


def _slices(r, W, *xs):
    out = []
    for x in xs:
        n = x.shape[0] // W
        out.append(x.detach()[r * n:(r + 1) * n].clone().requires_grad_(x.requires_grad))
    return out


def _leaf(v):
    return torch.tensor(v, dtype=torch.float64, requires_grad=True)


def _worker(r, W):
    gen = torch.Generator().manual_seed(1234 + W)
    n, d, h = 5, 8, 2
    N = W * n

    # --- symmetric CLIP, learnable scale and bias, both modes, mean and sum ---
    I, T = _feats(gen, N, d), _feats(gen, N, d)
    for mode in ("ring", "gather"):
        for reduction, g in (("mean", 0.6), ("sum", -1.3)):
            s, b = _leaf(7.5), _leaf(-0.4)
            ref = reference.clip_loss(I, T, s, b, reduction=reduction)
            i, t = _slices(r, W, I, T)
            sl, bl = _leaf(7.5), _leaf(-0.4)
            loss = fdist.clip_loss(i, t, sl, bl, mode=mode, reduction=reduction, backend="torch")
            # the bias cannot change a softmax: its gradient is ~0 and is checked apart
            _check(f"clip/{mode}/{reduction}", W, r, loss, ref, [i, t, sl, bl], [I, T, s, b], g,
                   [n, n], zero_ok=(3,))

    # label smoothing and focal weighting over the global batch (the smoothing's uniform part
    # over every rank's columns), learnable scale, frozen texts for one of them
    for mode, (kw, frozen) in itertools.product(
            ("ring", "gather"), (({"label_smoothing": 0.2}, False), ({"focal_gamma": 2.0}, False),
                                 ({"label_smoothing": 0.1}, True))):
        Tt = T.detach() if frozen else T
        s = _leaf(6.0)
        ref = reference.clip_loss(I, Tt, s, **kw)
        i, t = _slices(r, W, I, Tt)
        sl = _leaf(6.0)
        loss = fdist.clip_loss(i, t, sl, mode=mode, backend="torch", **kw)
        _check(f"clip-{kw}/{mode}" + ("/frozen" if frozen else ""), W, r, loss, ref, [i, t, sl],
               [I, Tt, s], 0.9, [n, n])

    # texts frozen (partial requires_grad), float scale
    It, Tt = I.detach().requires_grad_(True), T.detach()
    for mode in ("ring", "gather"):
        ref = reference.clip_loss(It, Tt, 10.0)
        i, t = _slices(r, W, It, Tt)
        loss = fdist.clip_loss(i, t, 10.0, mode=mode, backend="torch")
        _check(f"clip-frozen/{mode}", W, r, loss, ref, [i, t], [It, Tt], 0.8, [n, n])

    # --- one-way InfoNCE: per-rank keys = n positives + h hard negatives, custom positives ---
    Q = _feats(gen, N, d)
    K = _feats(gen, W * (n + h), d)
    local_pos = torch.randperm(n + h, generator=gen)[:n]  # same on every rank
    glob_pos = torch.cat([local_pos + q * (n + h) for q in range(W)])
    for mode in ("ring", "gather"):
        s = _leaf(12.0)
        ref = reference.info_nce(Q, K, glob_pos, scale=s)
        q, k = _slices(r, W, Q, K)
        sl = _leaf(12.0)
        loss = fdist.info_nce(q, k, positives=local_pos.clone(), scale=sl, mode=mode, backend="torch")
        _check(f"infonce/{mode}", W, r, loss, ref, [q, k, sl], [Q, K, s], 1.7, [n, n + h])
        for kw in ({"label_smoothing": 0.15}, {"focal_gamma": 1.5}):
            s = _leaf(12.0)
            ref = reference.info_nce(Q, K, glob_pos, scale=s, **kw)
            q, k = _slices(r, W, Q, K)
            sl = _leaf(12.0)
            loss = fdist.info_nce(q, k, positives=local_pos.clone(), scale=sl, mode=mode,
                                  backend="torch", **kw)
            _check(f"infonce-{kw}/{mode}", W, r, loss, ref, [q, k, sl], [Q, K, s], -0.8, [n, n + h])
        # private hard negatives of each query (learnable), alone and in the smoothing's mean
        HN = torch.nn.functional.normalize(torch.randn(N, 3, d, generator=gen, dtype=torch.float64),
                                           dim=2).requires_grad_()
        for kw in ({}, {"label_smoothing": 0.15}, {"focal_gamma": 1.5}):
            s = _leaf(12.0)
            ref = reference.info_nce(Q, K, glob_pos, scale=s, hard_negatives=HN, **kw)
            q, k, hn = _slices(r, W, Q, K, HN)
            sl = _leaf(12.0)
            loss = fdist.info_nce(q, k, positives=local_pos.clone(), scale=sl, mode=mode,
                                  backend="torch", hard_negatives=hn, **kw)
            _check(f"infonce-hard-negatives{kw}/{mode}", W, r, loss, ref, [q, k, hn, sl],
                   [Q, K, HN, s], 1.1, [n, n + h, n])
        # default positives, bias, no-grad keys (a queue / teacher), reduction sum; a bias shared
        # by every logit of a row cancels in its softmax: its gradient vanishes
        Kd = K.detach()
        b = _leaf(0.3)
        ref = reference.info_nce(Q, Kd, torch.cat([torch.arange(n) + q_ * (n + h) for q_ in range(W)]),
                                 scale=20.0, bias=b, reduction="sum")
        q, k = _slices(r, W, Q, Kd)
        bl = _leaf(0.3)
        loss = fdist.info_nce(q, k, scale=20.0, bias=bl, mode=mode, reduction="sum", backend="torch")
        _check(f"infonce-nograd/{mode}", W, r, loss, ref, [q, k, bl], [Q, Kd, b], 0.5, [n, n + h],
               zero_ok=(2,))

    # --- SigLIP: learnable scale and bias ---
    for mode in ("ring", "gather"):
        s, b = _leaf(10.0), _leaf(-10.0)
        ref = reference.siglip_loss(I, T, s, b)
        i, t = _slices(r, W, I, T)
        sl, bl = _leaf(10.0), _leaf(-10.0)
        loss = fdist.siglip_loss(i, t, sl, bl, mode=mode, backend="torch")
        _check(f"siglip/{mode}", W, r, loss, ref, [i, t, sl, bl], [I, T, s, b], 2.0, [n, n])
        # class labels: positives wherever the classes match, on any rank (sum)
        Y = torch.randint(0, 4, (N,), generator=gen)
        s, b = _leaf(10.0), _leaf(-10.0)
        ref = reference.siglip_loss(I, T, s, b, Y, "sum")
        i, t = _slices(r, W, I, T)
        sl, bl = _leaf(10.0), _leaf(-10.0)
        loss = fdist.siglip_loss(i, t, sl, bl, labels=Y[r * n:(r + 1) * n], mode=mode,
                                 reduction="sum", backend="torch")
        _check(f"siglip-labels/{mode}", W, r, loss, ref, [i, t, sl, bl], [I, T, s, b], -0.7, [n, n])

    # --- float32 through the Triton engine (interpreted on CPU) and the C++ CPU kernels: the
    # offset trick on a real kernel, merged statistics within float32 error of the float64
    # reference, and the scale sums' per-block totals (each backend adds them, the ring takes
    # them out of the off-diagonal blocks) ---
    engines = ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    if importlib.util.find_spec("fastcl._C") is not None:
        engines.append("cpu")
    for be in engines:
        for mode in ("ring", "gather"):
            s = _leaf(9.0)
            ref = reference.clip_loss(I, T, s, 0.1)
            i, t = (x.float().requires_grad_(True) for x in _slices(r, W, I, T))
            sl = torch.tensor(9.0, requires_grad=True)
            loss = fdist.clip_loss(i, t, sl, 0.1, mode=mode, backend=be, exact=True)
            got = torch.autograd.grad(loss, [i, t, sl])
            want = torch.autograd.grad(ref, [I, T, s])
            _close(f"{be}/{mode} loss", loss.double(), ref, tol=1e-5)
            for k, (a, b) in enumerate(zip(got, want)):
                if k < 2:
                    b = W * b[r * n:(r + 1) * n]
                _close(f"{be}/{mode} grad {k}", a.double(), b, tol=1e-5)

    # --- DDP-style averaging of a parameter gradient gives the single-process gradient ---
    lin = torch.nn.Linear(d, d, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=gen,
                                                                             dtype=torch.float64))
        lin.bias.zero_()
    X = torch.randn(N, d, generator=gen, dtype=torch.float64)
    ref = reference.clip_loss(lin(X), T.detach(), 5.0)
    (w_ref,) = torch.autograd.grad(ref, [lin.weight])
    x, t = _slices(r, W, X, T.detach())
    loss = fdist.clip_loss(lin(x), t, 5.0, mode="ring", backend="torch")
    (w,) = torch.autograd.grad(loss, [lin.weight])
    dist.all_reduce(w)
    _close("ddp-average weight grad", w / W, w_ref)

    # --- uneven batch sizes are rejected on every rank ---
    m = n - 1 if r == 0 else n
    try:
        fdist.clip_loss(I[:m].detach(), T[:m].detach(), 10.0, backend="torch")
    except ValueError as e:
        if "same number of rows on every rank" not in str(e):
            raise
    else:
        raise AssertionError("uneven batch sizes were accepted")


@pytest.mark.parametrize("world", [2, 4])
def test_gather_and_ring_match_single_process(world):
    run_gloo(_worker, world)


def _worker_self(r, W):
    """NT-Xent and SupCon (both modes) against the single-process loss of the global batch."""
    gen = torch.Generator().manual_seed(77 + W)
    n, d = 4, 6
    N = W * n
    # un-normalised views (normalize=True), a learnable temperature, mean and sum
    Z1 = torch.randn(N, d, generator=gen, dtype=torch.float64).requires_grad_()
    Z2 = (Z1.detach() + 0.5 * torch.randn(N, d, generator=gen, dtype=torch.float64)).requires_grad_()
    for mode, (reduction, g) in itertools.product(fdist.MODES, (("mean", 0.7), ("sum", -1.1))):
        t = _leaf(0.3)
        ref = reference.nt_xent(Z1, Z2, t, reduction=reduction)
        z1, z2 = _slices(r, W, Z1, Z2)
        tl = _leaf(0.3)
        loss = fdist.nt_xent(z1, z2, tl, mode=mode, reduction=reduction, backend="torch")
        _check(f"nt_xent/{mode}/{reduction}", W, r, loss, ref, [z1, z2, tl], [Z1, Z2, t], g, [n, n])
    # SupCon, two views, classes across ranks; one view with a class of one sample (a row
    # without positives: out of the mean's count, on whichever rank it lies)
    F2 = torch.randn(N, 2, d, generator=gen, dtype=torch.float64).requires_grad_()
    F1 = torch.randn(N, d, generator=gen, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, N // 2, (N,), generator=gen)
    y[-1] = 10**6
    for mode, (feats, variant) in itertools.product(
            fdist.MODES, ((F2, "out"), (F2, "in"), (F1, "out"), (F1, "in"))):
        t = _leaf(0.2)
        ref = reference.supcon(feats, y, t, variant=variant)[0]
        (f,) = _slices(r, W, feats)
        tl = _leaf(0.2)
        loss = fdist.supcon(f, y[r * n:(r + 1) * n], tl, variant=variant, mode=mode, backend="torch")
        _check(f"supcon/{mode}/{variant}/{feats.dim()}d", W, r, loss, ref, [f, tl], [feats, t], 1.3,
               [n])
    # float32 through the Triton engine (interpreted on CPU): gather, the rectangular kernels with
    # labels and the own slot left out at this rank's offset; ring, the blocks' kernels with the
    # labels that travel with them, the own slot left out on the diagonal block
    if os.environ.get("TRITON_INTERPRET") == "1":
        cases = [("nt_xent", lambda a, b, mode, tt: fdist.nt_xent(a, b, tt, mode=mode, backend="triton",
                                                                 exact=True),
                  lambda a, b, tt: reference.nt_xent(a, b, tt))]
        for variant in ("out", "in"):
            cases.append((f"supcon/{variant}", lambda a, b, mode, tt, v=variant: fdist.supcon(
                torch.stack([a, b], 1), y[r * n:(r + 1) * n], tt, variant=v, mode=mode,
                backend="triton", exact=True),
                lambda a, b, tt, v=variant: reference.supcon(torch.stack([a, b], 1), y, tt, variant=v)[0]))
        for (name, ours, theirs), mode in itertools.product(cases, fdist.MODES):
            t = _leaf(0.25)
            ref = theirs(Z1, Z2, t)
            z1, z2 = (x.float().requires_grad_(True) for x in _slices(r, W, Z1, Z2))
            tl = torch.tensor(0.25, requires_grad=True)
            loss = ours(z1, z2, mode, tl)
            got = torch.autograd.grad(loss, [z1, z2, tl])
            want = torch.autograd.grad(ref, [Z1, Z2, t])
            _close(f"{name}/{mode}/triton loss", loss.double(), ref, tol=1e-5)
            for k, (a, b) in enumerate(zip(got, want)):
                b = W * b[r * n:(r + 1) * n] if k < 2 else b
                _close(f"{name}/{mode}/triton grad {k}", a.double(), b, tol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_self_similarities_match_single_process(world):
    run_gloo(_worker_self, world)


def _worker_family(r, W):
    """DCL / DCLW, HCL, MV-InfoNCE, MV-DHEL and uniformity, in both modes, against the
    single-process losses of the global batch."""
    gen = torch.Generator().manual_seed(91 + W)
    n, d = 3, 5
    N = W * n
    Z1 = torch.randn(N, d, generator=gen, dtype=torch.float64).requires_grad_()
    Z2 = (Z1.detach() + 0.7 * torch.randn(N, d, generator=gen, dtype=torch.float64)).requires_grad_()
    for mode, sigma, (reduction, g) in itertools.product(fdist.MODES, (None, 0.5),
                                                         (("mean", 0.7), ("sum", -1.1))):
        t = _leaf(0.3)
        ref = reference.dcl(Z1, Z2, t, weight_sigma=sigma, reduction=reduction)
        z1, z2 = _slices(r, W, Z1, Z2)
        tl = _leaf(0.3)
        loss = fdist.dcl(z1, z2, tl, weight_sigma=sigma, mode=mode, reduction=reduction,
                         backend="torch")
        _check(f"dcl/{mode}/{sigma}/{reduction}", W, r, loss, ref, [z1, z2, tl], [Z1, Z2, t], g,
               [n, n])
    # gather mode: DCL's four sweeps (each view against each view) gather each view once
    calls, real = [], fdist.all_gather_with_grad
    fdist.all_gather_with_grad = lambda x, group=None: (calls.append(x.shape), real(x, group))[1]
    try:
        z1, z2 = _slices(r, W, Z1, Z2)
        fdist.dcl(z1, z2, 0.3, backend="torch").backward()
    finally:
        fdist.all_gather_with_grad = real
    if calls != [(n, d), (n, d)]:
        raise AssertionError(f"dcl gathers {calls}")
    # and MV-InfoNCE's V^2 sweeps with three views each view once (the lean sweeps, not one
    # of the V n rows against all)
    calls = []
    fdist.all_gather_with_grad = lambda x, group=None: (calls.append(x.shape), real(x, group))[1]
    try:
        (f,) = _slices(r, W, torch.randn(N, 3, d, generator=gen, dtype=torch.float64).requires_grad_())
        fdist.mv_infonce(f, 0.3, backend="torch").backward()
    finally:
        fdist.all_gather_with_grad = real
    if calls != [(n, d)] * 3:
        raise AssertionError(f"mv_infonce gathers {calls}")
    for mode, (beta, tau_plus, reduction) in itertools.product(
            fdist.MODES, ((1.0, 0.1, "mean"), (0.0, 0.0, "sum"), (2.0, 0.05, "mean"))):
        ref = reference.hcl(Z1, Z2, 0.4, beta=beta, tau_plus=tau_plus, reduction=reduction)
        z1, z2 = _slices(r, W, Z1, Z2)
        loss = fdist.hcl(z1, z2, 0.4, beta=beta, tau_plus=tau_plus, mode=mode, reduction=reduction,
                         backend="torch")
        _check(f"hcl/{mode}/{beta}/{tau_plus}", W, r, loss, ref, [z1, z2], [Z1, Z2], 0.9, [n, n])
    for V, reduction in ((2, "mean"), (3, "sum"), (4, "mean")):
        F = torch.randn(N, V, d, generator=gen, dtype=torch.float64).requires_grad_()
        for mode in fdist.MODES:
            t = _leaf(0.25)
            ref = reference.mv_infonce(F, t, reduction=reduction)
            (f,) = _slices(r, W, F)
            tl = _leaf(0.25)
            loss = fdist.mv_infonce(f, tl, mode=mode, reduction=reduction, backend="torch")
            _check(f"mv_infonce/{mode}/{V}", W, r, loss, ref, [f, tl], [F, t], 1.2, [n])
            t = _leaf(0.35)
            ref = reference.mv_dhel(F, t, reduction=reduction)
            tl = _leaf(0.35)
            loss = fdist.mv_dhel(f, tl, mode=mode, reduction=reduction, backend="torch")
            _check(f"mv_dhel/{mode}/{V}", W, r, loss, ref, [f, tl], [F, t], -0.6, [n])
    for mode, normalize in itertools.product(fdist.MODES, (True, False)):
        X = (0.6 * torch.randn(N, d, generator=gen, dtype=torch.float64)).requires_grad_()
        ref = reference.uniformity(X, 1.5, normalize=normalize)
        (x,) = _slices(r, W, X)
        loss = fdist.uniformity_loss(x, 1.5, normalize=normalize, mode=mode, backend="torch")
        _check(f"uniformity/{mode}/{normalize}", W, r, loss, ref, [x], [X], -0.8, [n])
    # float32 through the Triton engine (interpreted on CPU): the rectangular kernels with the
    # own rows left out at this rank's offset (gather), the blocks' kernels (ring)
    if os.environ.get("TRITON_INTERPRET") == "1":
        F3 = torch.stack([Z1, Z2, Z1 + Z2], 1)
        cases = []
        for mode in fdist.MODES:
            kw = dict(mode=mode, backend="triton", exact=True)
            cases += [
                (f"dcl/{mode}", [Z1, Z2],
                 lambda a, b, kw=kw: fdist.dcl(a, b, 0.3, weight_sigma=0.5, **kw),
                 lambda a, b: reference.dcl(a, b, 0.3, weight_sigma=0.5)),
                (f"hcl/{mode}", [Z1, Z2], lambda a, b, kw=kw: fdist.hcl(a, b, 0.4, **kw),
                 lambda a, b: reference.hcl(a, b, 0.4)),
                (f"mv_infonce/{mode}", [F3], lambda f, kw=kw: fdist.mv_infonce(f, 0.3, **kw),
                 lambda f: reference.mv_infonce(f, 0.3)),
                (f"mv_infonce2/{mode}", [F3[:, :2]], lambda f, kw=kw: fdist.mv_infonce(f, 0.3, **kw),
                 lambda f: reference.mv_infonce(f, 0.3)),
                (f"mv_dhel/{mode}", [F3], lambda f, kw=kw: fdist.mv_dhel(f, 0.3, **kw),
                 lambda f: reference.mv_dhel(f, 0.3)),
                (f"uniformity/{mode}", [Z1], lambda x, kw=kw: fdist.uniformity_loss(x, **kw),
                 lambda x: reference.uniformity(x)),
                (f"uniformity_raw/{mode}", [Z1],
                 lambda x, kw=kw: fdist.uniformity_loss(x, 0.5, normalize=False, **kw),
                 lambda x: reference.uniformity(x, 0.5, normalize=False))]
        for name, inputs, ours, theirs in cases:
            full = [x.detach().requires_grad_() for x in inputs]
            ref = theirs(*full)
            local = [x.float().requires_grad_() for x in _slices(r, W, *full)]
            loss = ours(*local)
            _close(f"{name}/triton loss", loss.double(), ref, tol=1e-5)
            got = torch.autograd.grad(loss, local)
            want = torch.autograd.grad(ref, full)
            for k, (a, b) in enumerate(zip(got, want)):
                _close(f"{name}/triton grad {k}", a.double(), W * b[r * n:(r + 1) * n], tol=1e-5)


@pytest.mark.parametrize("world", [2, 3])
def test_family_matches_single_process(world):
    run_gloo(_worker_family, world)


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _worker_dominant(r, W, only=None, modes=("ring", "gather")):
    """Float32 near-duplicate rows at tau = 0.05 (1 - P ~ 1e-3 on the target): the ring's blocks
    are not whole lines, so it adds up each line's sums of dS over the ring and corrects once at
    the end (gather mode sweeps whole lines on each rank); the loss value keeps the LSEs' lo
    parts. SupCon's label targets lie in other ranks' blocks: each sample's near-duplicate, its
    only positive, is on the next rank, so the ring takes its blocks round again to correct.
    ``only``: the names of the cases to run (default: all), in ``modes``."""
    gen = torch.Generator().manual_seed(77)
    n, d, scale = 35, 24, 20.0
    N = W * n

    def near(x):
        return torch.nn.functional.normalize(x + 0.05 * torch.randn(x.shape, generator=gen,
                                                                    dtype=torch.float64), dim=1)
    Z1 = torch.nn.functional.normalize(torch.randn(N, d, generator=gen, dtype=torch.float64), dim=1)
    Z2 = near(Z1)
    local_pos = torch.randperm(n, generator=gen)  # one-way: each rank's keys permuted
    glob_pos = torch.cat([local_pos + q * n for q in range(W)])
    K2 = torch.empty_like(Z2)
    K2[glob_pos] = Z2
    # SupCon: sample i + n (the next rank's) is a near-duplicate of sample i and of its class
    F = torch.cat([Z1[:n]] + [near(Z1[:n]) for _ in range(W - 1)])
    y = torch.cat([torch.randperm(n, generator=gen) * 3] * W)
    yr = y[r * n:(r + 1) * n]
    cases = {
        "clip": (lambda a, b, be, mode: fdist.clip_loss(a, b, scale, mode=mode, backend=be,
                                                        exact=True),
                 lambda a, b: reference.clip_loss(a, b, scale), (Z1, Z2)),
        "info_nce": (lambda a, b, be, mode: fdist.info_nce(a, b, positives=local_pos.clone(),
                                                           scale=scale, mode=mode, backend=be,
                                                           exact=True),
                     lambda a, b: reference.info_nce(a, b, glob_pos, scale=scale), (Z1, K2)),
        "nt_xent": (lambda a, b, be, mode: fdist.nt_xent(a, b, 1 / scale, mode=mode, backend=be,
                                                         exact=True),
                    lambda a, b: reference.nt_xent(a, b, 1 / scale), (Z1, Z2)),
        "supcon": (lambda a, be, mode: fdist.supcon(a, yr, 1 / scale, mode=mode, backend=be,
                                                    exact=True),
                   lambda a: reference.supcon(a, y, 1 / scale)[0], (F,)),
        "dclw": (lambda a, b, be, mode: fdist.dcl(a, b, 1 / scale, weight_sigma=0.5, mode=mode,
                                                  backend=be, exact=True),
                 lambda a, b: reference.dcl(a, b, 1 / scale, weight_sigma=0.5), (Z1, Z2)),
        "mv_infonce": (lambda a, be, mode: fdist.mv_infonce(a, 1 / scale, mode=mode, backend=be,
                                                            exact=True),
                       lambda a: reference.mv_infonce(a, 1 / scale), (torch.stack([Z1, Z2], 1),)),
    }
    engines = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    if importlib.util.find_spec("fastcl._C") is not None:
        engines.append("cpu")
    for name, (ours, ref, inputs) in cases.items():
        if only is not None and name not in only:
            continue
        want, torch32 = [], []
        for dt, out in ((torch.float64, want), (torch.float32, torch32)):
            xs = [x.to(dt).requires_grad_(True) for x in inputs]
            out.extend(g[r * n:(r + 1) * n].double() * W for g in torch.autograd.grad(ref(*xs), xs))
        loss64 = ref(*inputs)
        e_torch_loss = abs(ref(*(x.float() for x in inputs)).item() - loss64.item()) / loss64.item()
        for be in engines:
            if name in ("dclw", "mv_infonce") and be == "cpu":  # (split closures: no C++ kernels)
                continue
            for mode in modes:
                xs = [x.float().requires_grad_(True) for x in _slices(r, W, *inputs)]
                loss = ours(*xs, be, mode)
                # the loss value: the blocks' LSEs merged with their lo parts (EngineStats)
                # (measured 2e-8 - 9e-7; PyTorch float32: 7e-5 - 1e-4)
                e = abs(loss.item() - loss64.item()) / loss64.item()
                if not e <= 1e-5:
                    raise AssertionError(f"{name}/{be}/{mode} loss: {e:.2e} (PyTorch float32: "
                                         f"{e_torch_loss:.2e})")
                got = torch.autograd.grad(loss, xs)
                for k, (h, p, w) in enumerate(zip(got, torch32, want)):
                    e, e_torch = _rel(h, w), _rel(p, w)
                    if not (e <= 2e-5 and e <= max(e_torch, 1e-6)):
                        raise AssertionError(f"{name}/{be}/{mode} grad {k}: {e:.2e} "
                                             f"(PyTorch float32: {e_torch:.2e})")


def test_ring_corrects_whole_lines_float32():
    run_gloo(_worker_dominant, 2)


class _CountingEngine:
    """An engine module's forward and backward, each call's spec recorded."""

    def __init__(self, eng, calls):
        self.eng, self.calls = eng, calls

    def __getattr__(self, name):
        return getattr(self.eng, name)

    def forward(self, *args):
        self.calls.append(("forward", args[5].symmetric))
        return self.eng.forward(*args)

    def backward(self, *args, **kwargs):
        self.calls.append(("backward", args[5].symmetric))
        return self.eng.backward(*args, **kwargs)

    def step(self, *args, **kwargs):
        self.calls.append(("step", args[5].symmetric))
        return self.eng.step(*args, **kwargs)


def _worker_mirror(r, W):
    """NT-Xent's ring sweeps each tile of two ranks' row blocks once: rank r the blocks of ranks
    r - t, t = 0 .. W // 2, those with 0 < t < W - t symmetric (their columns' LSEs and
    gradients sent to their owner). Float64 against the reference (odd and even W), then the
    float32 near-duplicates of :func:`_worker_dominant` through every engine."""
    from fastcl import _backend
    gen = torch.Generator().manual_seed(5 + W)
    n, d = 4, 6
    N = W * n
    Z1 = torch.randn(N, d, generator=gen, dtype=torch.float64).requires_grad_()
    Z2 = (Z1.detach() + 0.4 * torch.randn(N, d, generator=gen, dtype=torch.float64)).requires_grad_()
    calls, engine = [], _backend.engine
    _backend.engine = lambda name: _CountingEngine(engine(name), calls)
    try:
        for reduction, g in (("mean", 0.9), ("sum", -0.6)):
            t = _leaf(0.2)
            ref = reference.nt_xent(Z1, Z2, t, reduction=reduction)
            z1, z2 = _slices(r, W, Z1, Z2)
            tl = _leaf(0.2)
            calls.clear()
            loss = fdist.nt_xent(z1, z2, tl, mode="ring", reduction=reduction, backend="torch")
            _check(f"nt_xent/mirror/{reduction}", W, r, loss, ref, [z1, z2, tl], [Z1, Z2, t], g,
                   [n, n])
            steps, mirrored = W // 2 + 1, (W - 1) // 2
            for phase in ("forward", "backward"):
                got = [sym for p, sym in calls if p == phase]
                if len(got) != steps or sum(got) != mirrored:
                    raise AssertionError(f"{phase}: {len(got)} tiles, {sum(got)} symmetric; want "
                                         f"{steps} and {mirrored}")
    finally:
        _backend.engine = engine
    _worker_dominant(r, W, only=("nt_xent",), modes=("ring",))


@pytest.mark.parametrize("world", [3, 4])
def test_ring_mirrors_gram_tiles(world):
    run_gloo(_worker_mirror, world)


def _worker_siglip_step(r, W):
    """SigLIP with gradients asked for takes the engine's step (Triton, interpreted; the C++
    kernels on CPU tensors): in the ring one step per key block and no other sweep (each
    block's dK travels home in the forward), in gather mode one step over the gathered texts.
    The loss and every gradient against float64 (mean and sum, grad_output != 1, frozen texts
    with a float scale and bias), and under no_grad the forward sweeps' value."""
    from fastcl import _backend
    gen = torch.Generator().manual_seed(31 + W)
    n, d = 5, 8
    N = W * n
    I, T = _feats(gen, N, d), _feats(gen, N, d)
    engines = ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    if importlib.util.find_spec("fastcl._C") is not None:
        engines.append("cpu")
    calls, engine = [], _backend.engine
    _backend.engine = lambda name: _CountingEngine(engine(name), calls)
    try:
        Y = torch.randint(0, 3, (N,), generator=gen)  # (classes across the ranks)
        for be, mode, (reduction, g), case in itertools.product(
                engines, fdist.MODES, (("mean", 0.6), ("sum", -1.3)), ("", "frozen", "labels")):
            tag = f"siglip-step/{be}/{mode}/{reduction}/{case}"
            frozen = case == "frozen"
            Y_ = Y if case == "labels" else None
            Tt = T.detach() if frozen else T
            if frozen:
                s = b = sl = bl = None
                ref = reference.siglip_loss(I, Tt, 10.0, -10.0, reduction=reduction)
            else:
                s, b = _leaf(10.0), _leaf(-10.0)
                sl, bl = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
                ref = reference.siglip_loss(I, Tt, s, b, Y_, reduction=reduction)
            i, t = (x.float().requires_grad_(x.requires_grad) for x in _slices(r, W, I, Tt))

            def loss_fn():
                return fdist.siglip_loss(i, t, 10.0 if frozen else sl, -10.0 if frozen else bl,
                                         labels=None if Y_ is None else Y_[r * n:(r + 1) * n],
                                         mode=mode, reduction=reduction, backend=be, exact=True)
            calls.clear()
            loss = loss_fn()
            want = [("step", False)] * (W if mode == "ring" else 1)
            if calls != want:
                raise AssertionError(f"{tag}: engine calls {calls}, want {want}")
            local, glob = ([i, t], [I, Tt]) if frozen else ([i, t, sl, bl], [I, Tt, s, b])
            _check(tag, W, r, loss, ref, local, glob, g, [n, n], tol=1e-5)
            if calls != want:
                raise AssertionError(f"{tag}: the backward swept again: {calls}")
            with torch.no_grad():
                swept = loss_fn()
            if [p for p, _ in calls[len(want):]] != ["forward"] * len(want):
                raise AssertionError(f"{tag}: no_grad calls {calls[len(want):]}")
            _close(f"{tag} no_grad", swept, loss, tol=1e-6)
        # bf16: the gradients held in the features' dtype from the forward, scaled in the
        # backward; within 2x the error of PyTorch's bf16 loss of the global batch
        s, b = _leaf(10.0), _leaf(-10.0)
        ref = reference.siglip_loss(I, T, s, b)
        want = torch.autograd.grad(ref * 0.6, [I, T, s, b])
        Ib, Tb = (x.detach().bfloat16().requires_grad_() for x in (I, T))
        sb, bb = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        torch16 = torch.autograd.grad(reference.siglip_loss(Ib, Tb, sb, bb) * 0.6, [Ib, Tb, sb, bb])
        for be, mode in itertools.product(engines, fdist.MODES):
            i, t = (x.detach().bfloat16().requires_grad_() for x in _slices(r, W, I, T))
            sl, bl = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
            calls.clear()
            loss = fdist.siglip_loss(i, t, sl, bl, mode=mode, backend=be)
            got = torch.autograd.grad(loss * 0.6, [i, t, sl, bl])
            if [p for p, _ in calls] != ["step"] * (W if mode == "ring" else 1):
                raise AssertionError(f"siglip-step/bf16/{be}/{mode}: engine calls {calls}")
            for k, (a, w, base) in enumerate(zip(got, want, torch16)):
                if k < 2:
                    w, base = (W * x[r * n:(r + 1) * n] for x in (w, base))
                e, e16 = ((x.double() - w).norm().item() / w.norm().item() for x in (a, base))
                if not e <= max(2 * e16, 1e-6):
                    raise AssertionError(f"siglip-step/bf16/{be}/{mode} grad {k}: {e:.2e} "
                                         f"(PyTorch bf16: {e16:.2e})")
    finally:
        _backend.engine = engine


@pytest.mark.parametrize("world", [2, 3])
def test_siglip_takes_a_step(world):
    if os.environ.get("TRITON_INTERPRET") != "1" and importlib.util.find_spec("fastcl._C") is None:
        pytest.skip("no engine with a step on CPU tensors here (Triton interpreted, the C++ kernels)")
    run_gloo(_worker_siglip_step, world)


def test_single_process_fallback():
    """Without an initialised process group the functions are the ordinary losses."""
    gen = torch.Generator().manual_seed(0)
    I, T = _feats(gen, 6, 4), _feats(gen, 6, 4)
    s = _leaf(3.0)
    for mode in fdist.MODES:
        loss = fdist.clip_loss(I, T, s, mode=mode, backend="torch")
        ref = reference.clip_loss(I, T, s)
        _close("clip", loss, ref)
        for a, b in zip(torch.autograd.grad(loss, [I, T, s]), torch.autograd.grad(ref, [I, T, s])):
            _close("clip grad", a, b)
    # SigLIP's step over a ring of one (the C++ kernels' step on CPU tensors)
    if importlib.util.find_spec("fastcl._C") is not None:
        for mode in fdist.MODES:
            i, t = (x.detach().float().requires_grad_() for x in (I, T))
            sl, bl = torch.tensor(3.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
            s64, b64 = _leaf(3.0), _leaf(-2.0)
            loss = fdist.siglip_loss(i, t, sl, bl, mode=mode, backend="cpu")
            ref = reference.siglip_loss(I, T, s64, b64)
            _close("siglip", loss.double(), ref, tol=1e-6)
            for a, b in zip(torch.autograd.grad(loss * 1.5, [i, t, sl, bl]),
                            torch.autograd.grad(ref * 1.5, [I, T, s64, b64])):
                _close("siglip grad", a.double(), b, tol=1e-5)
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        fdist.siglip_loss(I, T, 3.0, -2.0, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fdist.siglip_loss(I, T, 3.0, -2.0, labels=torch.zeros(6))
    with pytest.raises(ValueError, match="cannot be combined"):
        fdist.clip_loss(I, T, 3.0, label_smoothing=0.1, focal_gamma=1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        fdist.info_nce(I, T, label_smoothing=1.5)
    with pytest.raises(ValueError, match="hard_negatives must have shape"):
        fdist.info_nce(I, T, hard_negatives=torch.zeros(5, 2, 4, dtype=torch.float64))
    for mode in fdist.MODES:  # (one process: the single-process losses')
        for kw in ({"label_smoothing": 0.2}, {"focal_gamma": 2.0}):
            loss, ref = fdist.clip_loss(I, T, s, mode=mode, backend="torch", **kw), reference.clip_loss(I, T, s, **kw)
            _close(f"clip {kw}", loss, ref)
    with pytest.raises(ValueError, match="mode"):
        fdist.clip_loss(I, T, 3.0, mode="allreduce")
    with pytest.raises(ValueError, match="reduction"):
        fdist.info_nce(I, T, reduction="none")
    with pytest.raises(ValueError, match="same batch size"):
        fdist.clip_loss(I, T[:4], 3.0)
    # the self-similarities: the single-process losses, in either mode
    y = torch.tensor([0, 1, 0, 2, 1, 3])
    for mode in fdist.MODES:
        t = _leaf(0.4)
        for loss, ref in ((fdist.nt_xent(I, T, t, mode=mode, backend="torch"), reference.nt_xent(I, T, t)),
                          (fdist.supcon(torch.stack([I, T], 1), y, t, variant="in", mode=mode,
                                        backend="torch"),
                           reference.supcon(torch.stack([I, T], 1), y, t, variant="in")[0])):
            _close("self-similarity", loss, ref)
            for a, b in zip(torch.autograd.grad(loss, [I, T, t]), torch.autograd.grad(ref, [I, T, t])):
                _close("self-similarity grad", a, b)
    with pytest.raises(ValueError, match="reduction"):
        fdist.nt_xent(I, T, reduction="none")
    with pytest.raises(ValueError, match="mode must be one of"):
        fdist.nt_xent(I, T, mode="allgather")
    with pytest.raises(ValueError, match="variant"):
        fdist.supcon(I, torch.zeros(6, dtype=torch.long), variant="all")
    # the rest of the family: the single-process losses, in either mode
    F3 = torch.stack([I, T, I - T], 1)
    pairs = [(lambda mode: fdist.dcl(I, T, 0.3, weight_sigma=0.5, mode=mode, backend="torch"),
              lambda: reference.dcl(I, T, 0.3, weight_sigma=0.5), [I, T]),
             (lambda mode: fdist.hcl(I, T, 0.4, mode=mode, backend="torch"),
              lambda: reference.hcl(I, T, 0.4), [I, T]),
             (lambda mode: fdist.mv_infonce(F3, 0.3, mode=mode, backend="torch"),
              lambda: reference.mv_infonce(F3, 0.3), [I, T]),
             (lambda mode: fdist.mv_dhel(F3, 0.3, mode=mode, backend="torch"),
              lambda: reference.mv_dhel(F3, 0.3), [I, T]),
             (lambda mode: fdist.uniformity_loss(I, 1.5, mode=mode, backend="torch"),
              lambda: reference.uniformity(I, 1.5), [I])]
    for ours, theirs, inputs in pairs:
        for mode in fdist.MODES:
            loss, ref = ours(mode), theirs()
            _close("family", loss, ref)
            for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
                _close("family grad", a, b)
        with pytest.raises(ValueError, match="mode must be one of"):
            ours("allgather")
    with pytest.raises(ValueError, match="weight_sigma"):
        fdist.dcl(I, T, weight_sigma=-1.0)
    with pytest.raises(ValueError, match="tau_plus"):
        fdist.hcl(I, T, tau_plus=1.0)
    with pytest.raises(ValueError, match="reduction"):
        fdist.mv_infonce(F3, reduction="none")
