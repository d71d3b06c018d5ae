"""The InfoNCE family on the engine: each loss, through the Triton engine (interpreter on CPU) and
the torch backend, against its float64 reference -- loss and every gradient."""
import pytest
import torch

import fastcl
from fastcl import reference as R

from ._utils import features
from .conftest import DEVICE
from .test_triton import _check, _scalar

# float32 checks here hold the default mode to float32 bounds: on a GPU with IEEE products too
pytestmark = pytest.mark.usefixtures("ieee_default_products")

F32 = torch.float32
BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True, params=["fused", "dense"])
def backward_path(request, monkeypatch):
    """Every family test runs through both Triton backward paths: the fused kernels and the
    wide-feature path (dS row chunks + GEMMs)."""
    from fastcl.ops.triton import engine as E

    monkeypatch.setattr(E, "config_override", {"DENSE": request.param == "dense"})
    return request.param


def _feat(n, d, **kw):
    return features(n, d, F32, DEVICE, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", [dict(label_smoothing=0.1), dict(focal_gamma=2.0),
                                    dict(hard_negatives=3), dict(hard_negatives=2, label_smoothing=0.2)])
def test_info_nce_options(backend, option):
    N, M, D = 29, 41, 19
    q, k = _feat(N, D), _feat(M, D)
    s, b = _scalar(11.0), _scalar(0.3)
    kw = dict(option)
    if "hard_negatives" in kw:
        kw["hard_negatives"] = torch.nn.functional.normalize(
            torch.randn(N, kw["hard_negatives"], D, device=DEVICE), dim=-1).requires_grad_()
    hn = kw.pop("hard_negatives", None)
    inputs = [q, k, s, b] + ([hn] if hn is not None else [])

    def fn(q, k, s, b, hn=None):
        return fastcl.info_nce(q, k, scale=s, bias=b, reduction="none", hard_negatives=hn,
                               backend=backend, exact=True, **kw)

    def ref(q, k, s, b, hn=None):
        return R.info_nce(q, k, None, s, b, "none", hard_negatives=hn, **kw)

    _check(f"info_nce{option}", fn, ref, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", [dict(label_smoothing=0.1), dict(focal_gamma=1.0)])
def test_clip_options(backend, option):
    i, t = _feat(33, 21), _feat(33, 21)
    _check(f"clip{option}",
           lambda i, t, s: fastcl.clip_loss(i, t, s, reduction="none", backend=backend, exact=True, **option),
           lambda i, t, s: R.clip_loss(i, t, s, None, "none", **option), [i, t, _scalar(20.0)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_sigma", [None, 0.5])
def test_dcl(backend, weight_sigma):
    z1, z2 = _feat(23, 17, normalize=False), _feat(23, 17, normalize=False)
    _check("dcl", lambda a, b: fastcl.dcl(a, b, 0.2, weight_sigma=weight_sigma, reduction="none",
                                          backend=backend, exact=True),
           lambda a, b: R.dcl(a, b, 0.2, weight_sigma, reduction="none"), [z1, z2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_soft_targets_mixup(backend, form):
    N, M, D = 27, 35, 13
    q, k = _feat(N, D), _feat(M, D)
    idx = torch.stack([torch.arange(N), torch.randperm(M)[:N]], 1).to(DEVICE)
    lam = torch.rand(N, 1, device=DEVICE)
    w = torch.cat([lam, 1 - lam], 1)
    dense = torch.zeros(N, M, device=DEVICE).scatter_add_(1, idx, w)
    tg = (idx, w) if form == "sparse" else dense
    _check("soft", lambda q, k, s: fastcl.soft_info_nce(q, k, tg, scale=s, bias=0.2, reduction="none",
                                                        backend=backend, exact=True),
           lambda q, k, s: R.soft_info_nce(q, k, dense.to(q.dtype), s, 0.2, "none"), [q, k, _scalar(9.0)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["out", "in"])
def test_supcon_variants(backend, variant):
    B, D = 22, 15
    x = torch.randn(B, 2, D, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 5, (B,), device=DEVICE)
    _check(f"supcon-{variant}", lambda x: fastcl.supcon(x, y, 0.2, variant=variant, reduction="none",
                                                        backend=backend, exact=True),
           lambda x: R.supcon(x, y.to(x.device), 0.2, variant=variant, reduction="none")[0], [x])


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_rectangular(backend):
    x, kx = torch.randn(19, 11, device=DEVICE, requires_grad=True), torch.randn(31, 11, device=DEVICE, requires_grad=True)
    y, ky = torch.randint(0, 4, (19,), device=DEVICE), torch.randint(0, 4, (31,), device=DEVICE)
    _check("supcon-rect", lambda x, kx: fastcl.supcon(x, y, 0.3, keys=kx, key_labels=ky, reduction="none",
                                                      backend=backend, exact=True),
           lambda x, kx: R.supcon(x, y.to(x.device), 0.3, reduction="none", keys=kx,
                                  key_labels=ky.to(x.device))[0], [x, kx])


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniformity_and_alignment(backend):
    x, y = _feat(40, 9, normalize=False), _feat(40, 9, normalize=False)
    _check("uniformity", lambda x: fastcl.uniformity_loss(x, 2.0, backend=backend, exact=True),
           lambda x: R.uniformity(x, 2.0), [x])
    # rows as given, of norms far from 1 (the unit-row identity |x_i - x_j|^2 = 2 - 2<x_i, x_j>
    # does not hold): the norms enter the exponent
    z = (torch.randn(37, 9, device=DEVICE) * torch.linspace(0.2, 1.5, 37, device=DEVICE)[:, None])
    z.requires_grad_()
    out = _check("uniformity-raw", lambda z: fastcl.uniformity_loss(z, 2.0, normalize=False,
                                                                  backend=backend, exact=True),
                 lambda z: R.uniformity(z, 2.0, normalize=False), [z])
    assert abs(out.item() - fastcl.uniformity_loss(z, 2.0, backend=backend).item()) > 0.1
    _check("alignment", lambda x, y: fastcl.alignment_loss(x, y), lambda x, y: R.alignment(x, y), [x, y])


def test_extended_losses_reject_backends_without_split_gradients():
    from fastcl import _backend

    if not _backend.has_extension():
        pytest.skip("needs the compiled extension")
    with pytest.raises(ValueError, match="does not implement this loss"):
        fastcl.dcl(torch.randn(4, 3), torch.randn(4, 3), backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["margin", "ratio", "ids", "margin+ids"])
def test_false_negative_masking(backend, option):
    N, M, D = 30, 45, 6  # small D: many near-duplicates, so every rule masks something
    q, k = _feat(N, D), _feat(M, D)
    kw = {}
    if "margin" in option:
        kw["fn_margin"] = 0.4
    if "ratio" in option:
        kw["fn_ratio"] = 0.8
    if "ids" in option:
        kw["key_ids"] = torch.randint(0, 20, (M,), device=DEVICE)
    plain = fastcl.info_nce(q, k, scale=8.0, reduction="none", backend=backend, exact=True)
    masked = fastcl.info_nce(q, k, scale=8.0, reduction="none", backend=backend, exact=True, **kw)
    assert (plain - masked).abs().max() > 1e-3  # the masking changed something
    _check(f"fn-{option}", lambda q, k: fastcl.info_nce(q, k, scale=8.0, reduction="none", backend=backend,
                                                        exact=True, **kw),
           lambda q, k: R.info_nce(q, k, None, 8.0, None, "none",
                                   **{a: (v.to(q.device) if torch.is_tensor(v) else v) for a, v in kw.items()}),
           [q, k])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["margin", "ratio"])
def test_false_negative_ties_stay(backend, rule):
    """A key that ties with the positive (here an exact copy of every positive) stays at margin 0 /
    ratio 1, in every backend's arithmetic: the positive's product is formed apart from the tiles'
    (in another order: float32 sums differ in their last bits), and the rule must not drop the
    copy on that difference. The expected losses keep, in float64, what lies within 1e-9 of the
    positive (there: only the copies)."""
    N, D = 24, 64
    q, k = _feat(N, D, requires_grad=False), _feat(N, D, requires_grad=False)
    keys = torch.cat([k, k])  # every positive twice
    kw = dict(fn_margin=0.0) if rule == "margin" else dict(fn_ratio=1.0)
    ours = fastcl.info_nce(q, keys, scale=8.0, reduction="none", backend=backend, exact=True, **kw)
    c = q.double() @ keys.double().T
    c_pos = c.diagonal()[:, None]
    other = ~torch.eye(N, 2 * N, dtype=torch.bool, device=DEVICE)

    def expected(tol):
        drop = other & (c > c_pos + tol)
        return torch.logsumexp((8.0 * c).masked_fill(drop, -float("inf")), 1) - 8.0 * c_pos[:, 0]

    want = expected(1e-9)
    assert (ours.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert (want - expected(-1e-9)).abs().max() > 1e-2  # the copies count


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["margin", "ratio"])
def test_false_negative_masking_of_hard_negatives(backend, option):
    """fn_margin / fn_ratio drop private hard negatives by the keys' rule: here one of each row's
    hard negatives is a copy of its positive, so every row masks at least one."""
    N, M, D, h = 23, 31, 7, 3
    q, k = _feat(N, D), _feat(M, D)
    hn = torch.cat([k[:N, None].detach(), _feat(N * (h - 1), D, requires_grad=False).view(N, h - 1, D)], 1)
    hn.requires_grad_()
    kw = dict(fn_margin=0.4) if option == "margin" else dict(fn_ratio=0.8)
    plain = fastcl.info_nce(q, k, scale=8.0, hard_negatives=hn, reduction="none", backend=backend)
    masked = fastcl.info_nce(q, k, scale=8.0, hard_negatives=hn, reduction="none", backend=backend,
                             **kw)
    assert (plain - masked).min() > 0.1  # the copy of the positive left every row
    _check(f"fn-hard-{option}",
           lambda q, k, s, hn: fastcl.info_nce(q, k, scale=s, bias=0.2, hard_negatives=hn,
                                               reduction="none", backend=backend, exact=True, **kw),
           lambda q, k, s, hn: R.info_nce(q, k, None, s, 0.2, "none", hard_negatives=hn, **kw),
           [q, k, _scalar(8.0), hn])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["margin0", "margin", "ratio", "positives", "bf16"])
def test_guided_false_negatives(backend, option):
    """GISTEmbed's rule: keys whose guide product exceeds the positive's (less a margin, or times a
    ratio) leave the row. The guide (its own width) has quarter-integer entries, so every guide
    product is exact in any arithmetic and every backend masks the same entries (ties included:
    equal products stay)."""
    N, M, D, Dg = 26, 37, 19, 5
    dtype = torch.bfloat16 if option == "bf16" else F32
    q, k = features(N, D, dtype, DEVICE), features(M, D, dtype, DEVICE)
    gen = torch.Generator().manual_seed(len(option))
    u, v = (torch.randint(-4, 5, (n, Dg), generator=gen).float().to(DEVICE) / 4 for n in (N, M))
    kw = {"margin": dict(fn_margin=0.25), "ratio": dict(fn_ratio=0.5)}.get(option, {})
    pos = torch.randperm(M, generator=gen)[:N].to(DEVICE) if option == "positives" else None
    plain = fastcl.info_nce(q, k, positives=pos, scale=8.0, reduction="none", backend=backend)
    masked = fastcl.info_nce(q, k, positives=pos, scale=8.0, reduction="none", backend=backend,
                             guide=(u, v), **kw)
    assert (plain - masked).abs().max() > 1e-2  # the guide dropped keys
    g = u.double() @ v.double().T
    p = torch.arange(N, device=DEVICE) if pos is None else pos
    dropped = (g > g[torch.arange(N), p][:, None] - kw.get("fn_margin", 0.0)).sum()
    assert 0 < dropped < N * (M - 1)
    _check(f"fn-guide-{option}",
           lambda q, k, s, b: fastcl.info_nce(q, k, positives=pos, scale=s, bias=b, reduction="none",
                                              guide=(u, v), backend=backend, exact=True, **kw),
           lambda q, k, s, b: R.info_nce(q, k, pos, s, b, "none", guide=(u.double(), v.double()),
                                         **kw),
           [q, k, _scalar(8.0), _scalar(0.2)], dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieval_ties_and_non_finite_rows(backend):
    """Exact duplicates of each positive key tie with it (ties favour the positive): with explicit
    positives and with the default diagonal; a non-finite query ranks NaN instead of first."""
    N, D = 21, 40
    # quarter-integer features: every score is exact in float32, so ties are ties at any precision
    q, k = (torch.randint(-4, 5, (n, D), device=DEVICE).float() / 4 for n in (N, N))
    keys = torch.cat([k, k])
    S = q.double() @ keys.double().T
    for pos in (None, torch.arange(N, device=DEVICE) + N, torch.randperm(2 * N, device=DEVICE)[:N]):
        p = torch.arange(N, device=DEVICE) if pos is None else pos
        want = 1 + (S > S[torch.arange(N), p][:, None]).sum(1)
        got = fastcl.metrics.retrieval(q, keys, pos, backend=backend)["ranks"]
        assert torch.equal(got.long().cpu(), want.cpu()), (got, want)
    # rounded scores, a copy of every positive: explicit positives rank exactly as the default
    # diagonal does (the positive's score in the same arithmetic as its rivals', not a separate
    # dot product that a near-tie, such as the copy, can fall either side of)
    q, k = _feat(N, D, requires_grad=False), _feat(N, D, requires_grad=False)
    keys = torch.cat([k, k])
    diagonal = fastcl.metrics.retrieval(q, keys, backend=backend)["ranks"]
    explicit = fastcl.metrics.retrieval(q, keys, torch.arange(N, device=DEVICE), backend=backend)["ranks"]
    assert torch.equal(diagonal, explicit), (diagonal, explicit)
    bad = q.clone()
    bad[3, 5] = float("nan")
    out = fastcl.metrics.retrieval(bad, keys, backend=backend)
    assert torch.isnan(out["ranks"][3]) and torch.isfinite(out["ranks"][torch.arange(N) != 3]).all()
    assert torch.isnan(out["MRR"]) and out["R@10"].item() <= (N - 1) / N


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieval_metrics(backend):
    N, M, D = 37, 53, 8
    q, k = _feat(N, D, requires_grad=False), _feat(M, D, requires_grad=False)
    pos = torch.randint(0, M, (N,), device=DEVICE)
    out = fastcl.metrics.retrieval(q, k, pos, ks=(1, 5, 10), backend=backend)
    S = q.double() @ k.double().T
    one = torch.ones(1, dtype=torch.float64, device=DEVICE)
    ranks = 1 + R.engine_count_above(q.double(), k.double(), one, None, S[torch.arange(N), pos],
                                     positives=pos).long()
    assert torch.equal(out["ranks"].long().cpu(), ranks.cpu())
    for kk in (1, 5, 10):
        assert abs(out[f"R@{kk}"].item() - (ranks <= kk).double().mean().item()) < 1e-6
    assert abs(out["MRR"].item() - (1.0 / ranks.double()).mean().item()) < 1e-6
    assert 0 < out["R@10"].item() <= 1 and out["R@1"] <= out["R@5"] <= out["R@10"]


def test_uniformity_alignment_metrics():
    x, y = _feat(20, 5, requires_grad=False), _feat(20, 5, requires_grad=False)
    assert abs(fastcl.metrics.uniformity(x).item() - R.uniformity(x.double()).item()) < 1e-5
    assert abs(fastcl.metrics.alignment(x, y).item() - R.alignment(x.double(), y.double()).item()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("directions,objective", [("row", "kl"), ("col", "kl"), ("both", "kl"),
                                                  ("both", "cross_entropy")])
def test_distillation(backend, directions, objective):
    N, D, Dt = 31, 13, 22
    q, k = _feat(N, D), _feat(N, D)
    tq, tk = _feat(N, Dt, requires_grad=False), _feat(N, Dt, requires_grad=False)

    def ref(q, k, s):
        rows = R.distill(q, k, tq.to(q.dtype), tk.to(q.dtype), s, 15.0, "none", objective)
        cols = R.distill(k, q, tk.to(q.dtype), tq.to(q.dtype), s, 15.0, "none", objective)
        return {"row": rows, "col": cols, "both": torch.stack([rows, cols])}[directions]

    out = _check(f"distill-{directions}-{objective}",
                 lambda q, k, s: fastcl.distill(q, k, tq, tk, s, 15.0, directions=directions,
                                                objective=objective, reduction="none",
                                                backend=backend, exact=True),
                 ref, [q, k, _scalar(12.0)])
    assert (out > -1e-5).all()  # a KL divergence, or a cross-entropy
    if objective == "kl":
        with pytest.raises(ValueError, match="objective"):
            fastcl.distill(q, k, tq, tk, 1.0, 1.0, objective="ce", backend=backend)


def test_distillation_teacher_equals_student_is_zero():
    q, k = _feat(20, 9, requires_grad=False), _feat(20, 9, requires_grad=False)
    kl = fastcl.distill(q, k, q, k, 10.0, 10.0, reduction="none", backend="triton", exact=True)
    assert kl.abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_softclip(backend):
    N, D = 29, 11
    i, t, u = _feat(N, D), _feat(N, D), _feat(N, 7, requires_grad=False)
    _check("softclip", lambda i, t, s: fastcl.softclip(i, t, s, u, 8.0, alpha=0.3, reduction="none",
                                                       backend=backend, exact=True),
           lambda i, t, s: R.softclip(i, t, s, u.to(i.dtype), 8.0, 0.3, "none"), [i, t, _scalar(14.0)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["softclip", "soft_info_nce", "soft_info_nce_k2", "mv_infonce"])
def test_target_terms_cancel_in_the_tiles(backend, loss):
    """bfloat16 near-duplicate views at scale 30: the target term's gradient must meet P inside
    the tiles, before dS is rounded for the products. The yardstick is CLIP's gradient error on
    the same features (its targets always were in the tiles); formed apart, the two terms cancel
    after rounding and these gradients were 10-10^3 x worse than it."""
    N, D = 48, 24
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, D, dtype=torch.float64, generator=gen), dim=1)
    y = torch.nn.functional.normalize(x + 0.1 * torch.randn(N, D, dtype=torch.float64, generator=gen), dim=1)
    u = torch.nn.functional.normalize(torch.randn(N, 7, dtype=torch.float64, generator=gen), dim=1)
    u = u.to(DEVICE, torch.bfloat16)
    perm = torch.randperm(N, generator=gen).to(DEVICE)  # soft_info_nce: row i's target is key perm[i]
    w = (torch.rand(N, 1, generator=gen) + 0.5).to(DEVICE, torch.bfloat16)
    w2 = w * torch.tensor([[0.3, 0.7]], device=DEVICE)  # two weighted targets, both on the positive
    losses = {
        "clip": (lambda q, k: fastcl.clip_loss(q, k, 30.0, reduction="none", backend=backend),
                 lambda q, k: R.clip_loss(q, k, 30.0, reduction="none")),
        "softclip": (lambda q, k: fastcl.softclip(q, k, 30.0, u, 20.0, alpha=0.5, reduction="none",
                                                  backend=backend),
                     lambda q, k: R.softclip(q, k, 30.0, u.to(q.dtype), 20.0, 0.5, "none")),
        "soft_info_nce": (lambda q, k: fastcl.soft_info_nce(q, k[perm.argsort()], (perm[:, None], w), scale=30.0,
                                                            reduction="none", backend=backend),
                          lambda q, k: w[:, 0].to(q.dtype) * R.info_nce(q, k[perm.argsort()], perm, 30.0,
                                                                        reduction="none")),
        # two weighted targets per row, both on the positive: the same loss with weight w2_i0 + w2_i1
        "soft_info_nce_k2": (lambda q, k: fastcl.soft_info_nce(q, k[perm.argsort()], (perm[:, None].expand(N, 2), w2),
                                                               scale=30.0, reduction="none", backend=backend),
                             lambda q, k: w2.to(q.dtype).sum(1) * R.info_nce(q, k[perm.argsort()], perm, 30.0,
                                                                             reduction="none")),
        # (rows already unit: normalising them again in bfloat16 would perturb the inputs)
        "mv_infonce": (lambda q, k: fastcl.mv_infonce(torch.stack([q, k], 1), 1 / 30, normalize=False,
                                                      reduction="none", backend=backend),
                       lambda q, k: R.mv_infonce(torch.stack([q, k], 1), 1 / 30, normalize=False,
                                                 reduction="none")),
    }

    def grad_error(name):
        fn, ref = losses[name]
        q, k = (t.to(DEVICE, torch.bfloat16).requires_grad_() for t in (x, y))
        out = fn(q, k)
        g = torch.rand(out.shape, dtype=torch.float64, generator=gen).to(DEVICE) + 0.5
        got = torch.autograd.grad(out, (q, k), g.to(out.dtype))
        q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
        want = torch.autograd.grad(ref(q64, k64), (q64, k64), g)
        return max((a.double() - b).norm().item() / b.norm().item() for a, b in zip(got, want))

    yardstick, err = grad_error("clip"), grad_error(loss)
    assert err <= 4 * yardstick, f"{loss}: gradient error {err:.2e} vs CLIP's {yardstick:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_bias", [(30.0, -15.0), (20.0, -10.0)])
def test_siglip_float32_converged_loss_value(backend, scale_bias):
    """A converged SigLIP batch's loss is a sum of tiny softplus terms (e^-15 and below): float32
    features must give it to float32 accuracy, as the materialised float32 loss does (a product
    of factors 1 + e^-|x| kept ~1e-5 of it)."""
    s, b = scale_bias
    x = torch.nn.functional.normalize(torch.randn(150, 32, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(x + 0.1 * torch.randn(150, 32, dtype=torch.float64), dim=1)
    x, y = x.to(DEVICE), y.to(DEVICE)
    ref = R.siglip_loss(x, y, s, b).item()
    naive = abs(R.siglip_loss(x.float(), y.float(), s, b).item() - ref) / ref
    got = fastcl.siglip_loss(x.float(), y.float(), s, b, backend=backend, exact=True).item()
    assert abs(got - ref) / ref <= 2 * naive + 2e-7, (got, ref, naive)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.01, 0.1])
def test_scale_gradient_at_high_temperature(backend, scale):
    """The scale sums are centred on each row's offset; at a high temperature the LSE's own offset
    log(M) / s lies far outside the similarities and would amplify float32 rounding (1e-3 relative
    at s = 0.01): float32 accuracy at any scale."""
    N, M, D = 70, 150, 24
    gen = torch.Generator().manual_seed(0)  # (the gradient cancels to ~1e-4: fixed data)
    q, k = (features(n, D, F32, DEVICE, requires_grad=False, gen=gen) for n in (N, M))
    s64 = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    want, = torch.autograd.grad(R.info_nce(q.double(), k.double(), None, s64), s64)
    s32 = torch.tensor(scale, device=DEVICE, requires_grad=True)
    naive, = torch.autograd.grad(R.info_nce(q, k, None, s32), s32)  # PyTorch float32
    st = torch.tensor(scale, device=DEVICE, requires_grad=True)
    got, = torch.autograd.grad(fastcl.info_nce(q, k, scale=st, backend=backend, exact=True), st)
    err, naive_err = abs(got.item() - want.item()), abs(naive.item() - want.item())
    assert err <= max(1e-5 * abs(want.item()), 2 * naive_err), (got.item(), want.item(), naive.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_cwcl(backend):
    N, D = 26, 10
    q, k, u = _feat(N, D), _feat(N, D), _feat(N, 6, requires_grad=False)
    _check("cwcl", lambda q, k, s: fastcl.cwcl(q, k, u, scale=s, reduction="none", backend=backend, exact=True),
           lambda q, k, s: R.cwcl(q, k, u.to(q.dtype), u.to(q.dtype), s, "none"), [q, k, _scalar(10.0)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta,tau_plus", [(1.0, 0.1), (0.5, 0.0), (0.0, 0.1)])
def test_hcl(backend, beta, tau_plus):
    z1, z2 = _feat(21, 12, normalize=False), _feat(21, 12, normalize=False)
    _check("hcl", lambda a, b: fastcl.hcl(a, b, 0.5, beta=beta, tau_plus=tau_plus, reduction="none",
                                          backend=backend, exact=True),
           lambda a, b: R.hcl(a, b, 0.5, beta, tau_plus, reduction="none"), [z1, z2])


def test_hcl_small_temperature_is_finite():
    z1, z2 = _feat(16, 8), _feat(16, 8)
    loss = fastcl.hcl(z1, z2, 0.01, beta=1.0, backend="triton", exact=True)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z1.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("views", [2, 4])
def test_mv_infonce(backend, views):
    x = torch.randn(17, views, 9, device=DEVICE, requires_grad=True)
    _check("mv_infonce", lambda x: fastcl.mv_infonce(x, 0.2, reduction="none", backend=backend, exact=True),
           lambda x: R.mv_infonce(x, 0.2, reduction="none"), [x])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("views", [2, 3, 5])
def test_mv_dhel(backend, views):
    """Each view's rows against themselves (one sweep per view, B = 19 rows: not a multiple of a
    block), the pairs' alignment apart; a learnable temperature."""
    x = torch.randn(19, views, 11, device=DEVICE, requires_grad=True)
    _check("mv_dhel", lambda x, t: fastcl.mv_dhel(x, t, reduction="none", backend=backend, exact=True),
           lambda x, t: R.mv_dhel(x, t, reduction="none"), [x, _scalar(0.2)])


def test_mv_dhel_two_views_is_dhel():
    """V = 2: DHEL, -S(u_i, v_i) + log sum_{j != i} e^{S(u_i, u_j)} + log sum_{j != i} e^{S(v_i, v_j)},
    here against the materialised similarities of each view."""
    x = torch.randn(9, 2, 5, dtype=torch.float64)
    u, v = (torch.nn.functional.normalize(x[:, k], dim=1) for k in (0, 1))
    off = torch.eye(9, dtype=torch.bool)
    expect = (torch.logsumexp((u @ u.T / 0.5).masked_fill(off, -float("inf")), 1)
              + torch.logsumexp((v @ v.T / 0.5).masked_fill(off, -float("inf")), 1)
              - (u * v).sum(1) / 0.5)
    torch.testing.assert_close(fastcl.mv_dhel(x, 0.5, reduction="none", backend="torch"), expect)
    with pytest.raises(ValueError, match="at least 2 instances"):
        fastcl.mv_dhel(x[:1])
    with pytest.raises(ValueError, match="V >= 2 views"):
        fastcl.mv_dhel(x[:, :1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["supcon_in", "mv_infonce"])
def test_target_lse_closures_where_the_targets_dominate(backend, loss):
    """SupCon L_in and MV-InfoNCE with V > 2 views subtract a target LSE from a row LSE. Where
    the targets dominate (near-duplicate views, tau = 0.05), both LSEs are ~|S| = 20 and their
    difference is small: formed from the two, every row's loss and the targets' gradient lost
    float32's ulp of 20 (per-row losses up to 25 % off, gradients ~5e-5, as PyTorch's own
    float32). Kept as the negatives' LSE and the targets' apart, float32 accuracy."""
    B, V, D = 24, 3, 16
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(B, 1, D, dtype=torch.float64, generator=gen)
    x = torch.nn.functional.normalize(base + 0.02 * torch.randn(B, V, D, dtype=torch.float64, generator=gen), dim=-1)
    x = x.float().to(DEVICE)
    labels = (torch.arange(B) // 2).to(DEVICE)
    fns = {"supcon_in": (lambda f: fastcl.supcon(f, labels, 0.05, variant="in", reduction="none",
                                                 backend=backend, exact=True),
                         lambda f: R.supcon(f, labels, 0.05, variant="in", reduction="none")[0]),
           "mv_infonce": (lambda f: fastcl.mv_infonce(f, 0.05, reduction="none", backend=backend, exact=True),
                          lambda f: R.mv_infonce(f, 0.05, reduction="none"))}
    fn, ref = fns[loss]
    f32 = x.clone().requires_grad_()
    out = fn(f32)
    g = torch.rand(out.shape, dtype=torch.float64, generator=gen).to(DEVICE) + 0.5
    got, = torch.autograd.grad(out, f32, g.float())
    f64 = x.double().requires_grad_()
    want_out = ref(f64)
    want, = torch.autograd.grad(want_out, f64, g)
    row_err = ((out.double() - want_out) / want_out).abs().max().item()
    grad_err = ((got.double() - want).norm() / want.norm()).item()
    assert row_err < 2e-5, f"per-row loss error {row_err:.2e}"
    assert grad_err < 5e-6, f"gradient error {grad_err:.2e}"


def test_mv_infonce_two_views_is_a_pair_classification():
    """With V = 2 the loss is -log(2 e^{S_12} / sum over both anchors' non-self entries)."""
    x = torch.randn(9, 2, 5, dtype=torch.float64)
    z = torch.nn.functional.normalize(torch.cat([x[:, 0], x[:, 1]]), dim=1)
    S = (z @ z.T / 0.5).fill_diagonal_(-float("inf"))
    i = torch.arange(9)
    denom = torch.logsumexp(torch.cat([S[i], S[i + 9]], dim=1), dim=1)
    expect = -(torch.log(torch.tensor(2.0, dtype=torch.float64)) + S[i, i + 9] - denom)
    torch.testing.assert_close(fastcl.mv_infonce(x, 0.5, reduction="none", backend="torch"), expect)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 12])
def test_hard_negative_mining(backend, k):
    N, M, D = 37, 53, 6
    q, kx = _feat(N, D, requires_grad=False), _feat(M, D, requires_grad=False)
    pos = torch.randint(0, M, (N,), device=DEVICE)
    vals, idx = fastcl.metrics.hard_negatives(q, kx, pos, k=k, backend=backend)
    ref_v, ref_i = R.engine_top_negatives(q.double(), kx.double(), k, positives=pos)
    torch.testing.assert_close(vals.double().cpu(), ref_v.cpu(), rtol=1e-5, atol=1e-5)
    # the indices carry the k largest similarities, each once (two keys within float32 rounding
    # of each other may come in either order)
    c = q.double() @ kx.double().T
    torch.testing.assert_close(c.gather(1, idx.long()).cpu(), ref_v.cpu(), rtol=1e-5, atol=1e-5)
    ranked = idx.sort(dim=1).values
    assert (ranked[:, 1:] != ranked[:, :-1]).all()
    assert (idx >= 0).all() and not (idx == pos[:, None]).any()
    assert (idx.cpu() == ref_i.cpu()).float().mean() > 0.9


def test_hard_negative_mining_ties_across_column_blocks():
    # small-integer features make every similarity exact, so values tie across keys and across
    # column blocks (each key also appears a second time, 40 columns on): the kernel's merge must
    # return the k largest values with ties in ascending column order, as a stable sort does
    q = torch.randint(-2, 3, (9, 5), device=DEVICE).float()
    base = torch.randint(-3, 4, (40, 5), device=DEVICE).float()
    keys = torch.cat([base, base])
    none = torch.full((9,), -1, device=DEVICE)  # no positives: every key is a candidate
    vals, idx = fastcl.metrics.hard_negatives(q, keys, none, k=7, backend="triton")
    S = (q.double() @ keys.double().T).cpu()
    order = torch.sort(-S, dim=1, stable=True).indices[:, :7]
    assert torch.equal(idx.cpu(), order)
    assert torch.equal(vals.double().cpu(), S.gather(1, order))


def test_hard_negative_mining_fewer_negatives_than_k():
    q = _feat(5, 4, requires_grad=False)
    vals, idx = fastcl.metrics.hard_negatives(q, q, k=8, exclude_self=True,
                                              positives=torch.arange(5, device=DEVICE).roll(1),
                                              backend="triton")
    assert (idx[:, :3] >= 0).all() and (idx[:, 3:] == -1).all() and torch.isinf(vals[:, 3:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend):
    # a single class: every other row is a positive, no negatives in the denominator but self
    x = _feat(6, 4)
    y = torch.zeros(6, dtype=torch.int64, device=DEVICE)
    _check("supcon-one-class", lambda x: fastcl.supcon(x, y, 0.1, reduction="none", backend=backend, exact=True),
           lambda x: R.supcon(x, y.to(x.device), 0.1, reduction="none")[0], [x])
    # NT-Xent with one pair: each row's only other column is its positive -> loss exactly 0
    z1, z2 = _feat(1, 3), _feat(1, 3)
    out = fastcl.nt_xent(z1, z2, 0.1, reduction="none", backend=backend)
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-6)
    # tau = 0.01 on the self-similarity losses
    a, b = _feat(12, 5), _feat(12, 5)
    for fn, ref in ((lambda a, b: fastcl.nt_xent(a, b, 0.01, reduction="none", backend=backend, exact=True),
                     lambda a, b: R.nt_xent(a, b, 0.01, reduction="none")),
                    (lambda a, b: fastcl.dcl(a, b, 0.01, reduction="none", backend=backend, exact=True),
                     lambda a, b: R.dcl(a, b, 0.01, reduction="none"))):
        _check("small-tau", fn, ref, [a, b], rtol=1e-4)
    with pytest.raises(ValueError, match="no negatives"):
        fastcl.dcl(z1, z2, backend=backend)
