"""The C++ extension backends ("cpu" kernels here, "cuda" kernels on a GPU) against the float64
reference: public losses, the engine contract directly, low precision, and the op registrations."""
import math
import platform
import re
import shutil

import pytest
import torch

pytest.importorskip("fastcl._C", reason="the C++ extension fastcl._C is not built")

import fastcl  # noqa: E402
from fastcl import reference  # noqa: E402
from fastcl.ops import LossSpec, Targets  # noqa: E402
from fastcl.ops import cpp  # noqa: E402

N, M, D = 37, 53, 29  # awkward sizes: no multiple of any tile or vector width


def _feats(n, d, *, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.to(device=device, dtype=dtype)


def _close(actual, expected, *, rtol=2e-4, atol=2e-5, what=""):
    assert actual is not None and expected is not None, what
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=what)


def _grads(loss_fn, tensors, grad_out):
    out = loss_fn()
    return out.detach(), torch.autograd.grad(out, tensors, grad_out)


# ----------------------------------------------------------------------------------------------
# public API, backend="cpu"
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("custom_positives", [False, True])
def test_info_nce_cpu_matches_reference(reduction, custom_positives):
    q, k = _feats(N, D, seed=1), _feats(M, D, seed=2)
    positives = torch.randperm(M, generator=torch.Generator().manual_seed(3))[:N] if custom_positives else None
    scale = torch.tensor(1 / 0.07)
    bias = torch.tensor(-0.4)
    leaves = [t.clone().requires_grad_() for t in (q, k, scale, bias)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    gshape = (N,) if reduction == "none" else ()
    grad_out = torch.randn(gshape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 1.5

    out, grads = _grads(lambda: fastcl.info_nce(leaves[0], leaves[1], positives=positives, scale=leaves[2],
                                                bias=leaves[3], reduction=reduction, backend="cpu"),
                        leaves, grad_out.float())
    ref, ref_grads = _grads(lambda: reference.info_nce(*ref_leaves[:2], positives=positives,
                                                       scale=ref_leaves[2], bias=ref_leaves[3],
                                                       reduction=reduction), ref_leaves, grad_out)
    _close(out, ref, what="loss")
    for name, g, r in zip(("queries", "keys", "scale", "bias"), grads, ref_grads):
        _close(g, r, what=f"d_{name}")


def test_info_nce_cpu_no_grad_keys_and_fixed_scale():
    """Partial requires_grad: only the queries are trained (queue / frozen-key setting)."""
    q, k = _feats(N, D, seed=5), _feats(M, D, seed=6)
    qq = q.clone().requires_grad_()
    loss = fastcl.info_nce(qq, k, scale=20.0, reduction="sum", backend="cpu")
    (gq,) = torch.autograd.grad(loss * 0.3, qq)
    qr = q.double().requires_grad_()
    ref = reference.info_nce(qr, k.double(), scale=20.0, reduction="sum")
    (rq,) = torch.autograd.grad(ref * 0.3, qr)
    _close(loss, ref, what="loss")
    _close(gq, rq, what="d_queries")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_cpu_matches_reference_at_tau_001(reduction, with_bias):
    n = 45
    img, txt = _feats(n, D, seed=7), _feats(n, D, seed=8)
    scale = torch.tensor(100.0)  # tau = 0.01
    bias = torch.tensor(0.25) if with_bias else None
    leaves = [t.clone().requires_grad_() for t in (img, txt, scale)]
    if bias is not None:
        leaves.append(bias.clone().requires_grad_())
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    gshape = (2, n) if reduction == "none" else ()
    grad_out = torch.rand(gshape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5

    def ours():
        return fastcl.clip_loss(leaves[0], leaves[1], leaves[2], leaves[3] if with_bias else None,
                                reduction=reduction, backend="cpu")

    def ref():
        return reference.clip_loss(ref_leaves[0], ref_leaves[1], ref_leaves[2],
                                   ref_leaves[3] if with_bias else None, reduction=reduction)

    out, grads = _grads(ours, leaves, grad_out.float())
    r, rgrads = _grads(ref, ref_leaves, grad_out)
    _close(out, r, rtol=5e-4, atol=5e-4, what="loss")
    for g, rg in zip(grads, rgrads):
        _close(g, rg, rtol=5e-4, atol=5e-4, what="grad")


def test_clip_loss_cpu_only_text_tower_trains():
    n = 40
    img, txt = _feats(n, 64, seed=10), _feats(n, 64, seed=11)
    tt = txt.clone().requires_grad_()
    loss = fastcl.clip_loss(img, tt, 50.0, backend="cpu")
    (gt,) = torch.autograd.grad(loss, tt)
    tr = txt.double().requires_grad_()
    (rt,) = torch.autograd.grad(reference.clip_loss(img.double(), tr, 50.0), tr)
    _close(gt, rt, rtol=5e-4, atol=1e-5, what="d_text")


# ----------------------------------------------------------------------------------------------
# engine contract directly: every closure, metadata modes, strides
# ----------------------------------------------------------------------------------------------


def _ref_kw(spec, tg):
    return dict(kind=spec.kind, symmetric=spec.symmetric, exclude_self=spec.exclude_self,
                offset=spec.offset, positives=tg.positives, col_positives=tg.col_positives,
                row_labels=tg.row_labels, col_labels=tg.col_labels)


def _engine_case(spec, tg, q, k, scale, bias, needs=(True, True, True, True), grad_row=None,
                 grad_col=None, rtol=3e-4, atol=3e-4):
    n, m = q.shape[0], k.shape[0]
    stats = cpp.forward(q, k, scale, bias, tg, spec)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference.engine_forward(d64(q), d64(k), d64(scale), d64(bias), **_ref_kw(spec, tg))
    for name, a, r in zip(("row_lse", "row_pos", "row_npos", "col_lse", "col_pos"), stats, ref):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        _close(a, r, rtol=rtol, atol=atol, what=name)
    gen = torch.Generator().manual_seed(123)
    if grad_row is None:
        grad_row = torch.randn(n, generator=gen) + 1.0
    if grad_col is None and spec.symmetric:
        grad_col = torch.randn(m, generator=gen) - 0.5
    got = cpp.backward(q, k, scale, bias, tg, spec, stats, grad_row, grad_col, needs)
    want = reference.engine_backward(
        d64(q), d64(k), d64(scale), d64(bias), row_lse=ref[0], row_npos=ref[2], col_lse=ref[3],
        grad_row=grad_row.double(), grad_col=d64(grad_col), needs=needs, **_ref_kw(spec, tg))
    for name, need, a, r in zip(("d_queries", "d_keys", "d_scale", "d_bias"), needs, got, want):
        if not need or (name == "d_bias" and bias is None):
            assert a is None, name
            continue
        _close(a, r, rtol=rtol, atol=atol, what=name)
    return stats, got


def _labels(n, classes, seed):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("offset", [0, 5])
def test_engine_label_mode_exclude_self(offset):
    """SupCon / NT-Xent closure: label-equality positives, self-pairs j == i + offset removed."""
    n, m = 41, 70
    q, k = _feats(n, D, seed=20), _feats(m, D, seed=21)
    labels = _labels(m, 6, 22)
    tg = Targets(row_labels=labels[offset:offset + n].clone(), col_labels=labels)
    spec = LossSpec(exclude_self=True, offset=offset)
    stats, _ = _engine_case(spec, tg, q, k, torch.tensor([1 / 0.07]), None)
    assert (stats.row_npos > 0).any() and (stats.row_npos >= 0).all()


def test_engine_label_mode_rows_without_positives():
    """Rows whose label appears nowhere else get no gradient and a zero npos."""
    n = 30
    x = _feats(n, D, seed=23)
    labels = _labels(n, 4, 24)
    labels[:3] = torch.tensor([100, 101, 102])  # singletons
    tg = Targets(row_labels=labels, col_labels=labels)
    spec = LossSpec(exclude_self=True)
    stats, (dq, dk, ds, db) = _engine_case(spec, tg, x, x.clone(), torch.tensor([10.0]),
                                           torch.tensor([0.1]))
    assert (stats.row_npos[:3] == 0).all()


@pytest.mark.parametrize("labels", [False, True])
def test_engine_sigmoid(labels):
    """SigLIP closure (with learnable scale and bias)."""
    q, k = _feats(N, D, seed=30), _feats(M, D, seed=31)
    tg = Targets(row_labels=_labels(N, 5, 32), col_labels=_labels(M, 5, 33)) if labels else Targets()
    spec = LossSpec(kind="sigmoid")
    stats, _ = _engine_case(spec, tg, q, k, torch.tensor([10.0]), torch.tensor([-10.0]))
    assert (stats.row_pos == 0).all() and (stats.row_npos == 0).all()


def test_engine_sigmoid_exclude_self_offset():
    q, k = _feats(N, D, seed=34), _feats(M, D, seed=35)
    _engine_case(LossSpec(kind="sigmoid", exclude_self=True, offset=3), Targets(), q, k,
                 torch.tensor([5.0]), torch.tensor([-2.0]))


def test_engine_symmetric_custom_positives_and_offset():
    n = 48
    q, k = _feats(n, D, seed=40), _feats(n, D, seed=41)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(42))
    tg = Targets(positives=perm, col_positives=torch.argsort(perm))
    _engine_case(LossSpec(symmetric=True), tg, q, k, torch.tensor([100.0]), torch.tensor([1.0]))
    # default targets on a shifted diagonal: pc(j) = j - offset falls outside [0, N) for some j
    _engine_case(LossSpec(symmetric=True, offset=4), Targets(), q[:40], k, torch.tensor([30.0]), None)


def test_engine_symmetric_row_term_only():
    """grad_col=None: the column statistics get no gradient (one-way use of a symmetric sweep)."""
    n = 33
    q, k = _feats(n, D, seed=43), _feats(n, D, seed=44)
    spec = LossSpec(symmetric=True)
    stats = cpp.forward(q, k, torch.tensor([20.0]), None, Targets(), spec)
    g = torch.randn(n, generator=torch.Generator().manual_seed(45))
    got = cpp.backward(q, k, torch.tensor([20.0]), None, Targets(), spec, stats, g, None,
                       (True, True, False, False))
    want = reference.engine_backward(q.double(), k.double(), torch.tensor([20.0], dtype=torch.float64),
                                     None, row_lse=stats.row_lse.double(), row_npos=stats.row_npos.double(),
                                     col_lse=None, grad_row=g.double(), grad_col=None,
                                     needs=(True, True, False, False), symmetric=True)
    _close(got[0], want[0], what="d_queries")
    _close(got[1], want[1], what="d_keys")


@pytest.mark.parametrize("loss", ["info_nce", "clip"])
@pytest.mark.parametrize("scale", [0.01, 0.1])
def test_scale_gradient_at_high_temperature(loss, scale):
    """At s < log M the lines' centres are shifted by log(M) / s (fastcl.ops.scale_centres): the
    LSE's own offset lies far outside the similarities, and centred on it the float32 sums would
    lose ~1e-3 of a gradient that cancels to ~1e-4 of its terms."""
    gen = torch.Generator().manual_seed(0)
    n, m = (70, 150) if loss == "info_nce" else (150, 150)
    q, k = (torch.nn.functional.normalize(torch.randn(r, 24, generator=gen), dim=1) for r in (n, m))
    fn = {"info_nce": lambda q, k, s, **kw: fastcl.info_nce(q, k, scale=s, **kw),
          "clip": lambda q, k, s, **kw: fastcl.clip_loss(q, k, s, **kw)}[loss]
    ref = {"info_nce": lambda q, k, s: reference.info_nce(q, k, None, s),
           "clip": lambda q, k, s: reference.clip_loss(q, k, s)}[loss]
    s64 = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    want, = torch.autograd.grad(ref(q.double(), k.double(), s64), s64)
    s32 = torch.tensor(scale, requires_grad=True)
    naive, = torch.autograd.grad(ref(q, k, s32), s32)  # PyTorch float32
    st = torch.tensor(scale, requires_grad=True)
    got, = torch.autograd.grad(fn(q, k, st, backend="cpu"), st)
    err, naive_err = abs(got.item() - want.item()), abs(naive.item() - want.item())
    assert err <= max(1e-5 * abs(want.item()), 2 * naive_err), (got.item(), want.item(), naive.item())


@pytest.mark.parametrize("case", ["info_nce", "clip", "clip_offset", "labels"])
def test_engine_scale_gradient_at_low_temperature(case):
    """Near-duplicate pairs at tau = 0.05: d_scale sums N M terms that cancel to ~1e-3 of their
    size, and uncentred the float32 error of the stored LSEs (1 ulp of ~20) moves it by ~1e-3
    relative. Centred on each line's LSE (rows and columns, with the lines' known totals added;
    columns without a positive under an offset) it stays within 4e-6 of float64; d_bias is exact."""
    gen = torch.Generator().manual_seed(80)
    n, d = 60, 24
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(x + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    tg, spec = Targets(), LossSpec(symmetric=case.startswith("clip"))
    if case == "clip_offset":
        spec, x = LossSpec(symmetric=True, offset=4), x[:50]
    elif case == "labels":
        labels = torch.arange(n) % 50
        tg, spec = Targets(row_labels=labels, col_labels=labels), LossSpec()
    q, k = x.float(), y.float()
    scale, bias = torch.tensor([20.0]), torch.tensor([0.3])
    grad_row = torch.rand(q.shape[0], generator=gen) + 0.5
    grad_col = torch.rand(k.shape[0], generator=gen) - 1.5 if spec.symmetric else None
    stats = cpp.forward(q, k, scale, bias, tg, spec)
    needs = (True, True, True, True)
    got = cpp.backward(q, k, scale, bias, tg, spec, stats, grad_row, grad_col, needs)
    ref = reference.engine_forward(x, y, scale.double(), bias.double(), **_ref_kw(spec, tg))
    want = reference.engine_backward(
        x, y, scale.double(), bias.double(), row_lse=ref[0], row_npos=ref[2], col_lse=ref[3],
        grad_row=grad_row.double(), grad_col=None if grad_col is None else grad_col.double(),
        needs=needs, **_ref_kw(spec, tg))
    ds, ds64 = got[2].double().item(), want[2].item()
    assert abs(ds - ds64) <= 4e-6 * abs(ds64), (ds, ds64)
    assert abs(got[3].double().item() - want[3].item()) <= 1e-6 * (1 + grad_row.sum().item()), (got[3], want[3])


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, True), (True, True, True, False),
                                   (False, True, False, True)])
def test_engine_partial_needs(needs):
    q, k = _feats(N, D, seed=50), _feats(M, D, seed=51)
    _engine_case(LossSpec(), Targets(), q, k, torch.tensor([14.0]), torch.tensor([0.5]), needs=needs)


def test_engine_non_contiguous_inputs_and_expanded_grads():
    n = 36
    base_q = _feats(n, 2 * D, seed=60)
    base_k = _feats(D, n, seed=61)
    q = base_q[:, ::2]  # strided rows
    k = base_k.t()  # column-major
    assert not q.is_contiguous() and not k.is_contiguous()
    g = torch.tensor(0.7).expand(n)
    gc = torch.tensor(-1.3).expand(n)
    _engine_case(LossSpec(symmetric=True), Targets(), q, k, torch.tensor([25.0]), None,
                 grad_row=g, grad_col=gc)


def test_engine_multiple_tiles():
    """Sizes spanning several row and column tiles and thread groups, large scale."""
    n, m, d = 150, 600, 40
    q, k = _feats(n, d, seed=70), _feats(m, d, seed=71)
    tg = Targets(positives=torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(72)))
    _engine_case(LossSpec(), tg, q, k, torch.tensor([100.0]), None, rtol=1e-3, atol=1e-3)
    _engine_case(LossSpec(symmetric=True), Targets(), q, k[:n], torch.tensor([100.0]),
                 torch.tensor([2.0]), rtol=1e-3, atol=1e-3)


def test_engine_line_maximum_anywhere_in_a_tile():
    """Logits spread far beyond exp's float32 range (scale 300: each line's largest logit ~300,
    the rest below ~200), every line's largest entry at another place of its tile: the first
    and the last of a vector's lanes, the columns past the tile's last full vector, the last tile
    (M = 600: tiles of 256, 256 and 88 columns). An online LSE shifted by less than the line's
    maximum overflows to inf."""
    m, d = 600, 40
    k = _feats(m, d, seed=75)
    where = [0, 15, 16, 31, 250, 255, 256, 300, 511, 512, 591, 592, 595, 599]
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(76))
    cols = torch.tensor(where + [int(j) for j in perm if int(j) not in where][:50])
    q = k[cols]  # row i's largest logit at column cols[i]
    stats, _ = _engine_case(LossSpec(), Targets(positives=cols.flip(0)), q, k, torch.tensor([300.0]),
                            None, rtol=1e-3, atol=1e-3)
    assert torch.all(stats.row_lse > 299.0)
    # symmetric: the rows are a permutation of the keys, so every column's maximum is placed too
    stats, _ = _engine_case(LossSpec(symmetric=True), Targets(), k[perm], k, torch.tensor([300.0]),
                            None, rtol=1e-3, atol=1e-3)
    assert torch.all(stats.row_lse > 299.0) and torch.all(stats.col_lse > 299.0)


def test_engine_single_column_fully_excluded():
    """M = 1 with self-exclusion: every entry invalid, LSE -inf, no gradient, no NaN."""
    q, k = _feats(1, 8, seed=73), _feats(1, 8, seed=74)
    spec = LossSpec(exclude_self=True)
    tg = Targets(row_labels=torch.zeros(1, dtype=torch.long), col_labels=torch.zeros(1, dtype=torch.long))
    st = cpp.forward(q, k, torch.tensor([3.0]), None, tg, spec)
    assert st.row_lse.item() == -math.inf and st.row_npos.item() == 0
    dq, dk, ds, _ = cpp.backward(q, k, torch.tensor([3.0]), None, tg, spec, st, torch.ones(1), None,
                                 (True, True, True, False))
    assert torch.all(dq == 0) and torch.all(dk == 0) and ds.item() == 0


# ----------------------------------------------------------------------------------------------
# low precision: error judged against torch's own error in that dtype
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clip_loss_cpu_low_precision(dtype):
    n, d = 64, 48
    img, txt = _feats(n, d, seed=80, dtype=dtype), _feats(n, d, seed=81, dtype=dtype)
    scale = 30.0

    def run(fn, a, b):
        a = a.clone().requires_grad_()
        b = b.clone().requires_grad_()
        loss = fn(a, b)
        ga, gb = torch.autograd.grad(loss, (a, b))
        return loss.double(), ga.double(), gb.double()

    exact = run(lambda a, b: reference.clip_loss(a, b, scale), img.double(), txt.double())
    ours = run(lambda a, b: fastcl.clip_loss(a, b, scale, backend="cpu"), img, txt)
    torch_lp = run(lambda a, b: reference.clip_loss(a, b, scale), img, txt)
    assert ours[1].dtype == torch.float64  # (cast above); the raw grads come back in `dtype`
    for name, o, t, e in zip(("loss", "d_image", "d_text"), ours, torch_lp, exact):
        err_ours = (o - e).abs().max().item()
        err_torch = (t - e).abs().max().item()
        assert err_ours <= 2.0 * err_torch + 1e-3 * e.abs().max().item(), (name, err_ours, err_torch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_dtype_follows_inputs(dtype):
    q, k = _feats(N, D, seed=82, dtype=dtype), _feats(M, D, seed=83, dtype=dtype)
    st = cpp.forward(q, k, torch.tensor([10.0]), None, Targets(), LossSpec())
    assert st.row_lse.dtype == torch.float32
    dq, dk, ds, db = cpp.backward(q, k, torch.tensor([10.0]), None, Targets(), LossSpec(), st,
                                  torch.ones(N), None, (True, True, True, False))
    assert dq.dtype == dtype and dk.dtype == dtype and ds.dtype == torch.float32 and db is None


# ----------------------------------------------------------------------------------------------
# op registrations: schemas, fake kernels, compile tracing, input checks
# ----------------------------------------------------------------------------------------------


def _fwd_args(kind=0, symmetric=False, labels=False, exclude_self=False, bias=True):
    q, k = _feats(N, D, seed=90), _feats(M if not symmetric else N, D, seed=91)
    m = k.shape[0]
    rl = _labels(N, 3, 92) if labels else None
    cl = _labels(m, 3, 93) if labels else None
    return (q, k, torch.tensor([8.0]), torch.tensor([0.2]) if bias else None, None, None, rl, cl,
            kind, symmetric, exclude_self, 0, False)


_FWD_SAMPLES = [
    _fwd_args(),
    _fwd_args(symmetric=True, bias=False),
    _fwd_args(labels=True, exclude_self=True),
    _fwd_args(kind=1, labels=True),
]


@pytest.mark.parametrize("args", _FWD_SAMPLES, ids=["index", "symmetric", "labels", "sigmoid"])
def test_opcheck_engine_forward(args):
    torch.library.opcheck(torch.ops.fastcl.engine_forward.default, args)


@pytest.mark.parametrize("args", _FWD_SAMPLES, ids=["index", "symmetric", "labels", "sigmoid"])
@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, False, False)])
def test_opcheck_engine_backward(args, needs):
    row_lse, _, row_npos, col_lse, *_ = torch.ops.fastcl.engine_forward(*args)
    symmetric = args[9]
    n, m = args[0].shape[0], args[1].shape[0]
    grad_col = torch.rand(m) if symmetric else None
    line_sums = args[8] == 0  # (softmax closures only)
    bwd = (args + (row_lse, row_npos, col_lse if symmetric else None, torch.rand(n), grad_col)
           + needs + (line_sums,))
    torch.library.opcheck(torch.ops.fastcl.engine_backward.default, bwd)


def test_backward_empty_outputs_convention():
    args = _fwd_args()
    row_lse, _, row_npos, *_ = torch.ops.fastcl.engine_forward(*args)
    dq, dk, ds, db, rs, cs = torch.ops.fastcl.engine_backward(
        *args, row_lse, row_npos, None, torch.ones(N), None, False, True, False, False, False)
    assert dq.shape == (0,) and dk.shape == (M, D) and ds.shape == (0,) and db.shape == (0,)
    assert rs.shape == (0,) and cs.shape == (0,)
    # line sums: each row's sum of dS's row part; columns' only with a column term
    *_, rs, cs = torch.ops.fastcl.engine_backward(
        *args, row_lse, row_npos, None, torch.ones(N), None, False, True, False, False, True)
    assert rs.shape == (N,) and rs.dtype == torch.float32 and cs.shape == (0,)
    with pytest.raises(ValueError, match="line_sums"):
        sig = _fwd_args(kind=1)
        lse, _, npos, *_ = torch.ops.fastcl.engine_forward(*sig)
        torch.ops.fastcl.engine_backward(*sig, lse, npos, None, torch.ones(N), None, True, True,
                                         False, False, True)


def test_line_sums_are_the_lines_sums_of_dS():
    """row_sums / col_sums: per line, the sum of dS's row / column part (float64 oracle from the
    materialised matrix), whichever gradients the call computes."""
    args = _fwd_args(symmetric=True)
    q, k, s, b = args[:4]
    row_lse, _, row_npos, col_lse, *_ = torch.ops.fastcl.engine_forward(*args)
    g, gc = torch.rand(N) + 0.5, torch.rand(N) - 0.5
    S = s.double() * q.double() @ k.double().T + b.double()
    eye = torch.eye(N, dtype=torch.float64)
    row_part = g[:, None].double() * (torch.softmax(S, 1) - eye)
    col_part = gc[None, :].double() * (torch.softmax(S, 0) - eye)
    for needs in [(True, True), (True, False), (False, True)]:
        *_, rs, cs = torch.ops.fastcl.engine_backward(*args, row_lse, row_npos, col_lse, g, gc,
                                                      *needs, False, False, True)
        torch.testing.assert_close(rs.double(), row_part.sum(1), rtol=0, atol=1e-5)
        torch.testing.assert_close(cs.double(), col_part.sum(0), rtol=0, atol=1e-5)


def _line_totals_case(seed, *, symmetric, targets, offset, exclude_self, needs):
    """Arguments of correct_line_totals_ with every kind of line: rows whose LSE is -inf or that
    have no target (npos 0: a positive out of range or excluded, a class of one), columns
    likewise. ``targets``: "diagonal" (j = i + offset), "index" (positives) or "labels"."""
    gen = torch.Generator().manual_seed(seed)
    n, m = N, (N if symmetric else M)
    q, k = torch.randn(n, D, generator=gen), torch.randn(m, D, generator=gen)
    rows = torch.arange(n)
    pos = torch.randint(-2, m + 2, (n,), generator=gen) if targets == "index" else None
    rl = torch.randint(0, 6, (n,), generator=gen) if targets == "labels" else None
    cl = torch.randint(0, 5, (m,), generator=gen) if targets == "labels" else None
    if targets == "labels":  # (labels 5 in the rows only: rows without targets)
        hit = rl[:, None] == cl[None, :]
        if exclude_self:
            hit &= torch.arange(m)[None, :] != rows[:, None] + offset
        npos = hit.sum(1).float()
    else:
        p = pos if pos is not None else rows + offset
        npos = ((p >= 0) & (p < m) & ~(exclude_self & (p == rows + offset))).float()
    lse = torch.randn(n, generator=gen) * 5
    lse[::7] = -math.inf
    cpos = torch.randint(-2, n + 2, (m,), generator=gen) if symmetric and pos is not None else None
    col = (lambda x: x if symmetric else None)
    clse = torch.randn(m, generator=gen) * 5
    clse[::5] = -math.inf
    dq = torch.randn(n, D, generator=gen) if needs[0] else torch.empty(0)
    dk = torch.randn(m, D, generator=gen) if needs[1] else torch.empty(0)
    return (dq, dk, q, k, torch.tensor([7.5]), pos, cpos, rl, cl, offset, exclude_self, lse, npos,
            col(clse), torch.randn(n, generator=gen), col(torch.randn(m, generator=gen)),
            torch.randn(n, generator=gen) * 1e-4, col(torch.randn(m, generator=gen) * 1e-4))


@pytest.mark.parametrize("symmetric,targets", [(False, "diagonal"), (True, "diagonal"),
                                               (False, "index"), (True, "index"),
                                               (False, "labels")])
@pytest.mark.parametrize("offset,exclude_self", [(0, False), (0, True), (3, True), (-2, False)])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_correct_line_totals_op_matches_python_form(symmetric, targets, offset, exclude_self, needs):
    """The CPU op applies fastcl.ops.correct_line_totals in place: the same gradients as the
    Python form on the same line sums, to float32 rounding."""
    from fastcl.ops import EngineStats, closure_weights, correct_line_totals

    args = _line_totals_case(11 + offset, symmetric=symmetric, targets=targets, offset=offset,
                             exclude_self=exclude_self, needs=needs)
    (dq, dk, q, k, s, pos, cpos, rl, cl, offset, exclude_self, lse, npos, clse, g, gc, rs,
     cs) = args
    spec = LossSpec(symmetric=symmetric, exclude_self=exclude_self, offset=offset)
    stats = EngineStats(lse, torch.zeros_like(lse), npos, clse, None)
    want = [x.clone() if x.numel() else None for x in (dq, dk)]
    correct_line_totals(*want, q, k, s, spec, Targets(pos, cpos, rl, cl), stats,
                        closure_weights(spec, stats, g, grad_col=gc), rs, cs)
    before = [x.clone() for x in (dq, dk)]
    torch.ops.fastcl.correct_line_totals_(*args)
    for got, ref, old in zip((dq, dk), want, before):
        if ref is None:
            assert got.numel() == 0
            continue
        # (every case corrects something, but the default targets j = i + offset all excluded)
        assert (got != old).any() == (targets != "diagonal" or not exclude_self)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("symmetric,targets", [(True, "index"), (False, "labels")])
def test_opcheck_correct_line_totals(symmetric, targets):
    args = _line_totals_case(5, symmetric=symmetric, targets=targets, offset=0, exclude_self=True,
                             needs=(True, True))
    torch.library.opcheck(torch.ops.fastcl.correct_line_totals_.default, args)


# ----------------------------------------------------------------------------------------------
# one-sweep step of row-only closures (engine_step): forward and the gradients of sum_i L_i
# ----------------------------------------------------------------------------------------------

_STEP_CASES = {  # (kind, targets, exclude_self, offset, bias, n, m, d)
    "diagonal": (0, "diagonal", False, 0, True, N, M, D),
    "positives": (0, "positives", False, 0, False, N, M, D),
    "labels_self": (0, "labels", True, 0, False, N, N, D),
    "labels_offset": (0, "labels", True, 5, False, N, M, D),
    "positives_self_offset": (0, "positives", True, 3, True, N, M, D),
    "sigmoid": (1, "labels", False, 0, True, N, N, D),
    "sigmoid_self": (1, "diagonal", True, 2, True, N, M, D),
    # several row blocks and column tiles, the last of each partial
    "tiles": (0, "labels", True, 0, True, 300, 600, 19),
    "sigmoid_tiles": (1, "diagonal", False, 0, True, 300, 600, 19),
    # targets that dominate their rows (the float32 line-total correction at work)
    "dominant": (0, "diagonal", False, 0, False, 150, 150, D),
}


def _step_case(name, dtype=torch.float32):
    kind, targets, exclude_self, offset, bias, n, m, d = _STEP_CASES[name]
    q, k = _feats(n, d, seed=110, dtype=dtype), _feats(m, d, seed=111, dtype=dtype)
    t = Targets()
    if targets == "positives":
        t = Targets(positives=torch.randperm(m, generator=torch.Generator().manual_seed(112))[:n])
    elif targets == "labels":  # (some rows of a class of their own: no targets)
        t = Targets(row_labels=_labels(n, n // 3, 113), col_labels=_labels(m, n // 3, 114))
        if m == n:
            t = Targets(row_labels=t.row_labels, col_labels=t.row_labels)
    spec = LossSpec(kind=("softmax", "sigmoid")[kind], exclude_self=exclude_self, offset=offset)
    s = torch.tensor([6.0])
    if name == "dominant":
        k = torch.nn.functional.normalize(q + 0.05 * _feats(n, d, seed=115, dtype=dtype), dim=1)
        s = torch.tensor([60.0])
    return (q, k, s, torch.tensor([-0.3]) if bias else None, t, spec)


@pytest.mark.parametrize("name", list(_STEP_CASES))
@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, False, False),
                                   (True, False, False, True), (False, False, True, False)])
def test_engine_step_matches_forward_and_backward(name, needs):
    """cpp.step: the forward's statistics bit for bit, and the backward's gradients with every
    row's weight 1 (float32 line-total correction included), from one sweep."""
    q, k, s, b, t, spec = _step_case(name)
    stats, grads = cpp.step(q, k, s, b, t, spec, needs)
    ref = cpp.forward(q, k, s, b, t, spec)
    for field in ("row_lse", "row_pos", "row_npos", "row_lse_lo"):
        got, want = getattr(stats, field), getattr(ref, field)
        assert (got is None) == (want is None), field
        if got is not None:
            assert torch.equal(got, want), field
    assert stats.col_lse is None and stats.col_pos is None
    want = cpp.backward(q, k, s, b, t, spec, ref, torch.ones(q.shape[0]), None, needs)
    assert spec.kind == "sigmoid" or stats.row_npos.max() > 0
    for i, (g, w) in enumerate(zip(grads, want)):
        assert (g is None) == (w is None), i
        if g is not None:
            assert g.dtype == torch.float32 and g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * w.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["labels_self", "sigmoid", "tiles"])
def test_engine_step_low_precision_keeps_float32_gradients(name, dtype):
    """16-bit features: the step's gradients stay float32 (rounded once, after the total's
    gradient scales them) and match the backward's within its single rounding."""
    q, k, s, b, t, spec = _step_case(name, dtype)
    needs = (True, True, True, b is not None)
    stats, grads = cpp.step(q, k, s, b, t, spec, needs)
    ref = cpp.forward(q, k, s, b, t, spec)
    assert torch.equal(stats.row_lse, ref.row_lse) and torch.equal(stats.row_pos, ref.row_pos)
    want = cpp.backward(q, k, s, b, t, spec, ref, torch.ones(q.shape[0]), None, needs)
    for g, w in zip(grads[:2], want[:2]):
        assert g.dtype == torch.float32 and w.dtype == dtype
        torch.testing.assert_close(g.to(dtype), w, rtol=1e-2, atol=1e-2 * w.abs().max().item())
    torch.testing.assert_close(grads[2], want[2], rtol=1e-5, atol=1e-6)


def test_engine_step_past_its_scratch_budget_takes_two_sweeps():
    """Where the dK partials would pass their budget (64 MiB of float32: here M D > 2^24) the
    step runs the forward and backward sweeps; the same numbers either way."""
    q, k = _feats(5, 4100, seed=115), _feats(4100, 4100, seed=116)
    t = Targets(positives=torch.tensor([7, 0, 4099, 2, 1000]))
    s = torch.tensor([9.0])
    needs = (True, True, True, False)
    stats, grads = cpp.step(q, k, s, None, t, LossSpec(), needs)
    ref = cpp.forward(q, k, s, None, t, LossSpec())
    assert torch.equal(stats.row_lse, ref.row_lse)
    want = cpp.backward(q, k, s, None, t, LossSpec(), ref, torch.ones(5), None, needs)
    for g, w in zip(grads[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def _step_args(name, needs, line_sums):
    q, k, s, b, t, spec = _step_case(name)
    return (q, k, s, b, t.positives, t.row_labels, t.col_labels, cpp.KINDS[spec.kind],
            spec.exclude_self, spec.offset, *needs, line_sums)


@pytest.mark.parametrize("name,line_sums", [("diagonal", True), ("labels_offset", True),
                                            ("sigmoid", False)])
@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, False, False)])
def test_opcheck_engine_step(name, needs, line_sums):
    torch.library.opcheck(torch.ops.fastcl.engine_step.default, _step_args(name, needs, line_sums))


def test_engine_step_validates():
    args = list(_step_args("sigmoid", (True, True, False, False), False))
    args[-1] = True
    with pytest.raises(ValueError, match="line_sums is only for softmax"):
        torch.ops.fastcl.engine_step(*args)
    args = list(_step_args("diagonal", (True, True, False, False), False))
    args[1] = args[1][:, :-1]
    with pytest.raises(ValueError, match="share the feature dimension"):
        torch.ops.fastcl.engine_step(*args)
    q, k, s, b, t, _ = _step_case("diagonal")
    with pytest.raises(ValueError, match="row-only"):
        cpp.step(q, k, s, b, t, LossSpec(symmetric=True), (True, True, False, False))


_ROW_TOTAL_LOSSES = {
    "info_nce": lambda q, k, s, b, labels, red: fastcl.info_nce(
        q, k, positives=torch.arange(q.shape[0]).flip(0), scale=s, bias=b, reduction=red,
        label_smoothing=0.1, backend="cpu"),
    "siglip": lambda q, k, s, b, labels, red: fastcl.siglip_loss(
        q, k[: q.shape[0]], s, b, labels=labels, reduction=red, backend="cpu"),
    "nt_xent": lambda q, k, s, b, labels, red: fastcl.nt_xent(
        q, k[: q.shape[0]], 1 / s, reduction=red, backend="cpu"),
    "supcon": lambda q, k, s, b, labels, red: fastcl.supcon(
        q, labels, 1 / s, reduction=red, backend="cpu"),
}
_ROW_TOTAL_REFS = {
    "info_nce": lambda q, k, s, b, labels, red: reference.info_nce(
        q, k, positives=torch.arange(q.shape[0]).flip(0), scale=s, bias=b, reduction=red,
        label_smoothing=0.1),
    "siglip": lambda q, k, s, b, labels, red: reference.siglip_loss(
        q, k[: q.shape[0]], s, b, labels=labels, reduction=red),
    "nt_xent": lambda q, k, s, b, labels, red: reference.nt_xent(
        q, k[: q.shape[0]], 1 / s, reduction=red),
    "supcon": lambda q, k, s, b, labels, red: reference.supcon(q, labels, 1 / s, reduction=red)[0],
}


@pytest.mark.parametrize("loss", list(_ROW_TOTAL_LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("trained", ["all", "scale", "keys"])
def test_row_total_losses_take_the_step_and_match_reference(monkeypatch, loss, reduction, trained):
    """The row-only losses reduced by sum / mean on the C++ CPU backend: one step call (no
    backward sweep), loss and every gradient asked for against float64, grad_output != 1."""
    calls = []
    for fn in ("step", "backward"):
        real = getattr(cpp, fn)
        monkeypatch.setattr(cpp, fn, lambda *a, _r=real, _n=fn, **kw: (calls.append(_n), _r(*a, **kw))[1])
    n, m, d = 300, 340, 24  # several row blocks, partial tiles
    q, k = _feats(n, d, seed=117), _feats(m, d, seed=118)
    labels = _labels(n, 40, 119)
    labels[:3] = 1000 + torch.arange(3)  # rows without positives (SupCon: out of the mean)
    vals = {"q": q, "k": k, "s": torch.tensor(9.0), "b": torch.tensor(-2.0)}
    train = {"all": "qksb", "scale": "s", "keys": "k"}[trained]
    if loss in ("nt_xent", "supcon"):  # (no bias; SupCon: one set of features)
        train = train.replace("b", "")
        train = train.replace("k", "") or "q" if loss == "supcon" else train
    leaves = {x: v.clone().requires_grad_(x in train) for x, v in vals.items()}
    refs = {x: v.double().requires_grad_(x in train) for x, v in vals.items()}
    args = lambda t: (t["q"], t["k"], t["s"], t["b"], labels, reduction)  # noqa: E731
    out = _ROW_TOTAL_LOSSES[loss](*args(leaves))
    want = _ROW_TOTAL_REFS[loss](*args(refs))
    grads = torch.autograd.grad(out * 0.7, [leaves[x] for x in train])
    ref_grads = torch.autograd.grad(want * 0.7, [refs[x] for x in train])
    assert calls == ["step"], calls
    _close(out, want, rtol=1e-5, atol=1e-6, what="loss")
    for x, g, r in zip(train, grads, ref_grads):
        # (a softmax loss's bias gradient is 0: float64's is rounding noise)
        _close(g, r, rtol=1e-4, atol=1e-6 + 1e-5 * r.abs().max().item(), what=f"d_{x}")
    with torch.no_grad():
        again = _ROW_TOTAL_LOSSES[loss](*args(leaves))
    assert calls == ["step"] and torch.equal(again, out.detach())
    # a retained graph's second backward scales the same saved gradients by its own weight
    out = _ROW_TOTAL_LOSSES[loss](*args(leaves))
    first = torch.autograd.grad(out, [leaves[x] for x in train], retain_graph=True)
    second = torch.autograd.grad(out * -2.5, [leaves[x] for x in train])
    for a, b in zip(first, second):
        torch.testing.assert_close(b, -2.5 * a)


def test_correct_line_totals_op_validates():
    args = list(_line_totals_case(6, symmetric=True, targets="diagonal", offset=0,
                                  exclude_self=False, needs=(True, True)))
    labels = torch.zeros(N, dtype=torch.long)
    bad = {0: (torch.randn(N, D + 1), ValueError, "d_queries"),
           1: (torch.randn(N, D).double(), TypeError, "d_keys"),
           5: (torch.zeros(N + 1, dtype=torch.long), ValueError, "positives"),
           7: (labels, ValueError, "together"),
           17: (None, ValueError, "col_sums"),
           16: (torch.randn(N + 1), ValueError, "row_sums")}
    for i, (value, err, match) in bad.items():
        a = list(args)
        a[i] = value
        with pytest.raises(err, match=match):
            torch.ops.fastcl.correct_line_totals_(*a)
    a = list(args)
    a[7], a[8] = labels, labels
    with pytest.raises(ValueError, match="no column term"):
        torch.ops.fastcl.correct_line_totals_(*a)


def test_compile_fullgraph_traces_through_ops():
    q, k = _feats(N, D, seed=94), _feats(M, D, seed=95)

    def fn(q, k, s):
        st = cpp.forward(q, k, s, None, Targets(), LossSpec())
        return st.row_lse - st.row_pos

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    s = torch.tensor([12.0])
    torch.testing.assert_close(compiled(q, k, s), fn(q, k, s))


def test_compile_fullgraph_clip_loss_cpu_forward_backward():
    n = 37
    img, txt = _feats(n, D, seed=98), _feats(n, D, seed=99)

    def fn(a, b, s):
        return fastcl.clip_loss(a, b, s, backend="cpu", reduction="sum")

    def run(f):
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = torch.tensor(30.0, requires_grad=True)
        loss = f(a, b, s)
        return (loss, *torch.autograd.grad(loss * 0.7, (a, b, s)))

    eager = run(fn)  # also resolves (and caches) the backend lookup outside the traced region
    torch._dynamo.reset()
    compiled = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("loss", ["info_nce", "supcon"])
def test_compile_fullgraph_row_total_step(loss):
    """A row-only loss whose forward takes the one-sweep step traces as one graph (the step
    op's fake kernel) and gives the eager loss and gradients."""
    img, txt = _feats(N, D, seed=100), _feats(N, D, seed=101)
    labels = _labels(N, 6, 102)

    def fn(a, b, s):
        if loss == "supcon":
            return fastcl.supcon(a, labels, 1 / s, backend="cpu")
        return fastcl.info_nce(a, b, scale=s, backend="cpu")

    def run(f):
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = torch.tensor(12.0, requires_grad=True)
        out = f(a, b, s)
        ins = (a, s) if loss == "supcon" else (a, b, s)
        return (out, *torch.autograd.grad(out * 0.7, ins))

    eager = run(fn)
    torch._dynamo.reset()
    compiled = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)


def test_op_input_errors():
    q, k = _feats(N, D, seed=96), _feats(M, D, seed=97)
    s = torch.tensor([1.0])
    fwd = torch.ops.fastcl.engine_forward
    with pytest.raises(ValueError, match="feature dimension"):
        fwd(q, k[:, :-1], s, None, None, None, None, None, 0, False, False, 0, False)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fwd(q.double(), k.double(), s, None, None, None, None, None, 0, False, False, 0, False)
    with pytest.raises(ValueError, match="positives"):
        fwd(q, k, s, None, torch.zeros(N + 1, dtype=torch.long), None, None, None, 0, False, False,
            0, False)
    with pytest.raises(ValueError, match="kind"):
        fwd(q, k, s, None, None, None, None, None, 7, False, False, 0, False)
    with pytest.raises(TypeError, match="scale"):
        fwd(q, k, s.double(), None, None, None, None, None, 0, False, False, 0, False)
    with pytest.raises(ValueError, match="row_labels and col_labels"):
        fwd(q, k, s, None, None, None, _labels(N, 2, 0), None, 0, False, False, 0, False)


# ----------------------------------------------------------------------------------------------
# CUDA kernels (need a GPU)
# ----------------------------------------------------------------------------------------------


def _cuda_case(spec, tg, dtype, n, m, d, scale, bias, tol):
    q = _feats(n, d, seed=100, dtype=dtype, device="cuda")
    k = _feats(m, d, seed=101, dtype=dtype, device="cuda")
    s = torch.tensor([scale], device="cuda")
    b = None if bias is None else torch.tensor([bias], device="cuda")
    tg = Targets(*[None if t is None else t.cuda() for t in tg])
    stats = cpp.forward(q, k, s, b, tg, spec)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference.engine_forward(d64(q), d64(k), d64(s), d64(b), **_ref_kw(spec, tg))
    for name, a, r in zip(("row_lse", "row_pos", "row_npos", "col_lse", "col_pos"), stats, ref):
        if r is not None:
            _close(a, r, rtol=tol, atol=tol, what=name)
    gen = torch.Generator().manual_seed(7)
    g = (torch.randn(n, generator=gen) + 1).cuda()
    gc = (torch.randn(m, generator=gen) - 0.5).cuda() if spec.symmetric else None
    needs = (True, True, True, bias is not None)
    got = cpp.backward(q, k, s, b, tg, spec, stats, g, gc, needs)
    want = reference.engine_backward(d64(q), d64(k), d64(s), d64(b), row_lse=ref[0], row_npos=ref[2],
                                     col_lse=ref[3], grad_row=g.double(), grad_col=d64(gc), needs=needs,
                                     **_ref_kw(spec, tg))
    for name, a, r in zip(("d_queries", "d_keys", "d_scale", "d_bias"), got, want):
        if r is not None:
            # gradients of sums over M entries: scale the tolerance by the reference magnitude
            _close(a, r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()), what=name)


_CUDA_DTYPES = [(torch.float32, True, 2e-4), (torch.float32, False, 3e-2), (torch.bfloat16, False, 6e-2),
                (torch.float16, False, 3e-2)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,exact,tol", _CUDA_DTYPES)
@pytest.mark.parametrize("case", ["index", "symmetric", "labels", "sigmoid"])
def test_cuda_engine_matches_reference(dtype, exact, tol, case):
    n, m, d = 197, 261, 77
    if case == "index":
        spec, tg, scale, bias = LossSpec(exact=exact), Targets(), 14.0, 0.3
    elif case == "symmetric":
        # tau = 0.01 with IEEE products; TF32 rounds S by ~scale * 5e-4, so a smaller scale there
        scale = 100.0 if (exact or dtype != torch.float32) else 20.0
        spec, tg, bias, m = LossSpec(symmetric=True, exact=exact), Targets(), None, n
    elif case == "labels":
        spec = LossSpec(exclude_self=True, offset=2, exact=exact)
        tg = Targets(row_labels=_labels(n, 7, 1), col_labels=_labels(m, 7, 2))
        scale, bias = 10.0, None
    else:
        spec, tg, scale, bias = LossSpec(kind="sigmoid", exact=exact), Targets(), 10.0, -10.0
    _cuda_case(spec, tg, dtype, n, m, d, scale, bias, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_clip_loss_matches_reference_and_triton(dtype):
    n, d = 300, 128
    img = _feats(n, d, seed=110, dtype=dtype, device="cuda")
    txt = _feats(n, d, seed=111, dtype=dtype, device="cuda")

    def run(fn, a, b, s):
        a, b, s = (t.clone().requires_grad_() for t in (a, b, s))
        loss = fn(a, b, s)
        return (loss.double(), *(g.double() for g in torch.autograd.grad(loss * 1.3, (a, b, s))))

    s = torch.tensor(50.0, device="cuda")
    ours = run(lambda a, b, s: fastcl.clip_loss(a, b, s, backend="cuda", exact=True), img, txt, s)
    ref = run(lambda a, b, s: reference.clip_loss(a, b, s), img.double(), txt.double(), s.double())
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for o, r in zip(ours, ref):
        _close(o, r, rtol=tol, atol=tol)
    try:
        tri = run(lambda a, b, s: fastcl.clip_loss(a, b, s, backend="triton", exact=True), img, txt, s)
    except (ImportError, RuntimeError) as e:  # the Triton backend is optional here
        pytest.skip(f"triton backend unavailable: {e}")
    for o, t in zip(ours, tri):
        _close(o, t, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_cuda_info_nce_rectangular_no_grad_keys():
    n, m, d = 129, 1000, 64
    q = _feats(n, d, seed=120, device="cuda").requires_grad_()
    k = _feats(m, d, seed=121, device="cuda")
    pos = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(3)).cuda()
    loss = fastcl.info_nce(q, k, positives=pos, scale=20.0, reduction="sum", backend="cuda", exact=True)
    (gq,) = torch.autograd.grad(loss, q)
    qr = q.detach().double().requires_grad_()
    ref = reference.info_nce(qr, k.double(), positives=pos, scale=20.0, reduction="sum")
    (rq,) = torch.autograd.grad(ref, qr)
    _close(loss, ref, rtol=1e-4, atol=1e-3)
    _close(gq, rq, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_cuda_opcheck_and_determinism():
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _fwd_args(symmetric=True))
    torch.library.opcheck(torch.ops.fastcl.engine_forward.default, args)
    row_lse, _, row_npos, col_lse, *_ = torch.ops.fastcl.engine_forward(*args)
    n = args[0].shape[0]
    g = torch.rand(n, device="cuda")
    bwd = args + (row_lse, row_npos, col_lse, g, torch.rand(n, device="cuda"), True, True, True, False,
                  True)
    torch.library.opcheck(torch.ops.fastcl.engine_backward.default, bwd)
    first = torch.ops.fastcl.engine_backward(*bwd)
    second = torch.ops.fastcl.engine_backward(*bwd)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _setup_constant(name):
    import ast
    import pathlib

    tree = ast.parse((pathlib.Path(__file__).parents[1] / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def _gcc() -> bool:
    """Whether g++ here is GCC (its vectorisation report; the tile loops' x86-64-v3 clones)."""
    import subprocess

    if shutil.which("g++") is None or platform.machine() != "x86_64":
        return False
    out = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    return "Free Software Foundation" in out


@pytest.mark.skipif(not _gcc(), reason="reads GCC's vectorisation report of the x86-64-v3 clones")
def test_tile_loops_vectorise(tmp_path):
    """Every tile loop that takes an exponential (exp, softplus, sigmoid) compiles to vector code
    with the build's flags (GCC's report): a scalar exp costs the CPU forward about as much as
    its matrix products."""
    import pathlib
    import subprocess
    import sysconfig

    import torch.utils.cpp_extension as cpp_ext

    root = pathlib.Path(__file__).parents[1]
    src = root / "csrc" / "cpu" / "engine_cpu.cpp"
    flags = _setup_constant("CXX_OPT_FLAGS")
    cmake = root / "CMakeLists.txt"  # (not in the copy of the sources the floor checks use)
    if cmake.exists():
        cmake_text = cmake.read_text()
        assert all(f"<COMPILE_LANGUAGE:CXX>:{f}>" in cmake_text for f in flags), "CMake's C++ flags differ"
    aten = pathlib.Path(cpp_ext.include_paths()[0]) / "ATen" / "ATen.h"
    std = "-std=c++20" if "C++20" in aten.read_text() else "-std=c++17"
    cmd = (["g++", *flags, std, "-fopenmp", "-fPIC", "-c", str(src), "-o", str(tmp_path / "e.o"),
            "-fopt-info-vec-optimized", f"-I{root / 'csrc'}", f"-I{sysconfig.get_paths()['include']}"]
           + [f"-I{p}" for p in cpp_ext.include_paths()])
    report = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    lines = src.read_text().splitlines()
    vector_lines = {int(n) for n in re.findall(r"engine_cpu\.cpp:(\d+):\d+: optimized: loop vectorized "
                                               r"using 32 byte", report)}
    loops = []  # (first line, last line) of each innermost loop calling exp_fast / softplus_fast / ...
    for n, text in enumerate(lines, 1):
        if not text.lstrip().startswith("for ("):
            continue
        end = n
        if text.rstrip().endswith("{"):
            indent = len(text) - len(text.lstrip())
            while not (lines[end].startswith(" " * indent + "}")):
                end += 1
            end += 1
        elif not text.rstrip().endswith(";"):
            end = n + 1
        body = "\n".join(lines[n - 1:end])
        if "_fast(" in body and body.count("for (") == 1:
            loops.append((n, end))
    assert len(loops) >= 6, "the tile loops moved: update this test"
    scalar = [lines[a - 1].strip() for a, b in loops if not any(a <= v <= b for v in vector_lines)]
    assert not scalar, f"scalar exp loops: {scalar}"
