"""The Triton engine against the float64 reference: losses and every gradient.

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (set in conftest) at small, awkward
shapes; with a GPU the same tests run on CUDA tensors.
"""
import pytest
import torch
import triton
import triton.language as tl

import fastcl
from fastcl import reference as R
from fastcl.ops.triton import engine as E

from ._utils import as64, assert_close, features, grads, lowp, rel, shifted_siglip_rows

from .conftest import DEVICE

BACKEND = "triton"
F32 = torch.float32

# (N, M, D): awkward (not multiples of any block), exact multiples, tiny, D spanning several chunks
SHAPES = [(37, 53, 29), (64, 64, 32), (1, 3, 5), (50, 50, 70), (33, 100, 16)]
SQUARE = [(37, 29), (64, 32), (1, 5), (50, 70)]


def _scalar(v, requires_grad=True):
    return torch.tensor(v, dtype=F32, device=DEVICE, requires_grad=requires_grad)


def _check(name_fn, fn, ref_fn, inputs, *, dtype=F32, rtol=2e-5, factor=2.0):
    """Run ``fn`` on ``inputs`` and ``ref_fn`` on float64 copies (and on ``dtype`` copies, the
    PyTorch low-precision baseline); compare the output and every requested gradient."""
    out = fn(*inputs)
    ins64 = [as64(x) for x in inputs]
    ref = ref_fn(*ins64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all()
    # grad_output != 1, positive and varied, representable in the output's dtype (the one
    # every computation receives)
    g = (torch.rand_like(ref) + 0.5).to(out.dtype).to(ref.dtype)
    ins_lp = [lowp(x, dtype) for x in inputs]  # PyTorch's own computation in the inputs' dtype
    base = ref_fn(*ins_lp)
    g_base = grads(base, ins_lp, g.to(base.dtype))
    assert_close(f"{name_fn} loss", out, ref, base, rtol=rtol, factor=factor)
    g_out = grads(out, inputs, g.to(DEVICE))
    g_ref = grads(ref, ins64, g)
    # scalar gradients (scale, bias) are sums over N*M terms: measure them against that size
    size = max(sum(x.detach().double().norm().item() for x in g_ref if x is not None and x.dim() > 0), 1.0)
    for i, (a, r) in enumerate(zip(g_out, g_ref)):
        if r is None:
            assert a is None
            continue
        assert a is not None and a.shape == inputs[i].shape and torch.isfinite(a).all()
        b = g_base[i] if g_base is not None else None
        assert_close(f"{name_fn} grad[{i}]", a, r, b, rtol=rtol, factor=factor,
                     scale=None if r.dim() > 0 else size)
    return out


# ----------------------------------------------------------------------------------------------
# info_nce
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("explicit_positives", [False, True])
def test_info_nce(shape, reduction, explicit_positives):
    N, M, D = shape
    q, k = features(N, D, F32, DEVICE), features(M, D, F32, DEVICE)
    s, b = _scalar(12.5), _scalar(-0.7)
    pos = torch.randint(0, M, (N,), device=DEVICE) if explicit_positives else None

    def fn(q, k, s, b):
        return fastcl.info_nce(q, k, positives=pos, scale=s, bias=b, reduction=reduction,
                               backend=BACKEND, exact=True)

    def ref(q, k, s, b):
        return R.info_nce(q, k, None if pos is None else pos.to(q.device), s, b, reduction)

    _check("info_nce", fn, ref, [q, k, s, b])


# ----------------------------------------------------------------------------------------------
# clip_loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SQUARE)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip(shape, reduction, with_bias):
    N, D = shape
    img, txt = features(N, D, F32, DEVICE), features(N, D, F32, DEVICE)
    s = _scalar(1 / 0.07)
    inputs = [img, txt, s] + ([_scalar(0.3)] if with_bias else [])

    def fn(img, txt, s, b=None):
        return fastcl.clip_loss(img, txt, s, b, reduction=reduction, backend=BACKEND, exact=True)

    def ref(img, txt, s, b=None):
        return R.clip_loss(img, txt, s, b, reduction)

    _check("clip", fn, ref, inputs)


@pytest.mark.parametrize("scale", [100.0, 1000.0])
def test_clip_small_temperature(scale):
    """tau = 0.01 and 0.001: the column LSE is merged from exact partials, no fixed offset."""
    img, txt = features(45, 24, F32, DEVICE), features(45, 24, F32, DEVICE)
    s = _scalar(scale)
    _check("clip-small-tau",
           lambda i, t, s: fastcl.clip_loss(i, t, s, reduction="none", backend=BACKEND, exact=True),
           lambda i, t, s: R.clip_loss(i, t, s, reduction="none"), [img, txt, s], rtol=1e-4)


def test_info_nce_small_temperature_unnormalised():
    """Large logits (tau = 0.01 on unnormalised features, |S| up to ~1e3) stay finite and exact."""
    q, k = features(20, 16, F32, DEVICE, normalize=False), features(30, 16, F32, DEVICE, normalize=False)
    _check("info_nce-large-logits",
           lambda q, k: fastcl.info_nce(q, k, scale=100.0, reduction="none", backend=BACKEND, exact=True),
           lambda q, k: R.info_nce(q, k, None, 100.0, None, "none"), [q, k], rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# partial requires_grad, float parameters, low precision
# ----------------------------------------------------------------------------------------------

PATTERNS = {  # which of (queries, keys, scale, bias) require grad
    "queries": (1, 0, 0, 0), "keys": (0, 1, 0, 0), "scale": (0, 0, 1, 0), "bias": (0, 0, 0, 1),
    "queries+scale": (1, 0, 1, 0), "keys+bias": (0, 1, 0, 1), "features": (1, 1, 0, 0),
}


@pytest.mark.parametrize("loss", ["info_nce", "clip", "siglip"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_partial_requires_grad(loss, pattern):
    N, M, D = (23, 41, 19) if loss == "info_nce" else (23, 23, 19)
    flags = PATTERNS[pattern]
    q = features(N, D, F32, DEVICE, requires_grad=bool(flags[0]))
    k = features(M, D, F32, DEVICE, requires_grad=bool(flags[1]))
    s = _scalar(10.0, bool(flags[2]))
    b = _scalar(-5.0 if loss == "siglip" else 0.4, bool(flags[3]))
    fns = {
        "info_nce": (lambda q, k, s, b: fastcl.info_nce(q, k, scale=s, bias=b, backend=BACKEND, exact=True),
                     lambda q, k, s, b: R.info_nce(q, k, None, s, b)),
        "clip": (lambda q, k, s, b: fastcl.clip_loss(q, k, s, b, backend=BACKEND, exact=True),
                 lambda q, k, s, b: R.clip_loss(q, k, s, b)),
        "siglip": (lambda q, k, s, b: fastcl.siglip_loss(q, k, s, b, backend=BACKEND, exact=True),
                   lambda q, k, s, b: R.siglip_loss(q, k, s, b)),
    }
    fn, ref = fns[loss]
    _check(f"{loss}-{pattern}", fn, ref, [q, k, s, b])


def test_float_scale_and_no_grad_keys():
    q = features(17, 9, F32, DEVICE)
    k = features(30, 9, F32, DEVICE, requires_grad=False)
    _check("float-scale", lambda q: fastcl.info_nce(q, k, scale=14.0, backend=BACKEND, exact=True),
           lambda q: R.info_nce(q, k.detach().to(q.dtype), None, 14.0), [q])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["info_nce", "clip"])
def test_low_precision(dtype, loss):
    """bf16/fp16 inputs: within 2x of PyTorch's own error in that dtype (fp32 statistics)."""
    N, M, D = (40, 56, 48) if loss == "info_nce" else (40, 40, 48)
    q, k = features(N, D, dtype, DEVICE), features(M, D, dtype, DEVICE)
    s = _scalar(1 / 0.07)
    if loss == "info_nce":
        fn = lambda q, k, s: fastcl.info_nce(q, k, scale=s, reduction="none", backend=BACKEND)  # noqa: E731
        ref = lambda q, k, s: R.info_nce(q, k, None, s.to(q.dtype), None, "none")  # noqa: E731
    else:
        fn = lambda q, k, s: fastcl.clip_loss(q, k, s, reduction="none", backend=BACKEND)  # noqa: E731
        ref = lambda q, k, s: R.clip_loss(q, k, s.to(q.dtype), None, "none")  # noqa: E731
    out = _check(f"{loss}-{dtype}", fn, ref, [q, k, s], dtype=dtype, rtol=1e-3)
    assert out.dtype == torch.float32


def test_tf32_default_close_to_exact():
    q, k = features(64, 64, F32, DEVICE), features(64, 64, F32, DEVICE)
    a = fastcl.clip_loss(q, k, 20.0, backend=BACKEND)
    b = fastcl.clip_loss(q, k, 20.0, backend=BACKEND, exact=True)
    assert abs(a.item() - b.item()) <= 2e-3 * abs(b.item())


# ----------------------------------------------------------------------------------------------
# launch-level paths: several D chunks, several partial-LSE launches, strides
# ----------------------------------------------------------------------------------------------


def test_split_feature_dim(monkeypatch):
    """dQ/dK accumulated over several D chunks (BLOCK_DV < D) and the similarity over several."""
    monkeypatch.setattr(E, "config_override", {"BLOCK_DV": 16, "BLOCK_D": 16})
    img, txt = features(37, 45, F32, DEVICE), features(37, 45, F32, DEVICE)
    _check("split-D", lambda i, t, s: fastcl.clip_loss(i, t, s, reduction="none", backend=BACKEND, exact=True),
           lambda i, t, s: R.clip_loss(i, t, s, reduction="none"), [img, txt, _scalar(30.0)])


@pytest.mark.parametrize("exact", [True, False])
def test_column_partials_over_several_launches(monkeypatch, exact):
    """A small partial-LSE budget forces one row block per launch; the merge must be exact (with
    IEEE products, of the column LSEs' hi and lo parts)."""
    monkeypatch.setattr(E, "_PARTIAL_BYTES", 1)
    launches = []
    merge = E._merge_column_partials_kernel
    monkeypatch.setattr(E, "_merge_column_partials_kernel",
                        type("Spy", (), {"__getitem__": lambda self, g: (
                            launches.append(g) or merge[g])})())
    img, txt = features(70, 20, F32, DEVICE), features(70, 20, F32, DEVICE)
    _check("multi-launch", lambda i, t, s: fastcl.clip_loss(i, t, s, reduction="none", backend=BACKEND,
                                                            exact=exact),
           lambda i, t, s: R.clip_loss(i, t, s, reduction="none"), [img, txt, _scalar(50.0)],
           **({} if exact else dict(rtol=5e-3)))
    assert len(launches) > 1 or DEVICE.type == "cuda"  # (one per row block: 128 rows on a GPU)


def test_non_contiguous_inputs():
    base_q = features(40, 2 * 21, F32, DEVICE, requires_grad=False)
    base_k = features(21, 60, F32, DEVICE, requires_grad=False)
    q = base_q[:, ::2].detach().requires_grad_()  # stride (42, 2)
    k = base_k.t().detach().requires_grad_()  # (60, 21), column-major
    assert not q.is_contiguous() and not k.is_contiguous()
    _check("strided", lambda q, k: fastcl.info_nce(q, k, scale=9.0, reduction="none", backend=BACKEND, exact=True),
           lambda q, k: R.info_nce(q, k, None, 9.0, None, "none"), [q, k])


def test_expanded_grad_output_and_repeated_backward():
    q, k = features(19, 11, F32, DEVICE), features(19, 11, F32, DEVICE)
    loss = fastcl.clip_loss(q, k, 10.0, backend=BACKEND, exact=True)
    (gq,) = torch.autograd.grad(3.0 * loss, [q])
    qd, kd = as64(q), as64(k)
    (rq,) = torch.autograd.grad(3.0 * R.clip_loss(qd, kd, 10.0), [qd])
    assert_close("expanded", gq, rq)


# ----------------------------------------------------------------------------------------------
# the engine's other closures through their public losses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_siglip(reduction, with_labels):
    N, D = 37, 29
    img, txt = features(N, D, F32, DEVICE), features(N, D, F32, DEVICE)
    labels = torch.randint(0, 5, (N,), device=DEVICE) if with_labels else None
    s, b = _scalar(10.0), _scalar(-10.0)

    def fn(i, t, s, b):
        return fastcl.siglip_loss(i, t, s, b, labels=labels, reduction=reduction, backend=BACKEND, exact=True)

    def ref(i, t, s, b):
        return R.siglip_loss(i, t, s, b, None if labels is None else labels.to(i.device), reduction)

    _check("siglip", fn, ref, [img, txt, s, b])


@pytest.mark.parametrize("block_n", [16, 64, 128])
@pytest.mark.parametrize("scale", [0.0, 10.0, 60.0])
def test_siglip_softplus_products(monkeypatch, block_n, scale):
    # the forward sums softplus through one logarithm of a product per row and tile: exact for
    # tiles up to 64 columns, scaled beyond; zero logits (scale 0) put every factor at its bound 2
    # (2^128 would overflow), large scales make most factors 1 and a few e^-|S| matter. The
    # per-row losses match float64 as closely as PyTorch's float32 loss does.
    monkeypatch.setattr(E, "config_override", {"fwd.BLOCK_N": block_n})
    N, M, D = 45, 150, 12
    img, txt = features(N, D, F32, DEVICE), features(M, D, F32, DEVICE)
    s, b = torch.tensor([scale], device=DEVICE), torch.tensor([-scale / 3], device=DEVICE)
    out = fastcl.siglip_loss(img, txt, s, b, reduction="none", backend=BACKEND, exact=True)
    ref = R.siglip_loss(*(t.double() for t in (img, txt, s, b)), None, "none")
    torch_f32 = R.siglip_loss(img, txt, s, b, None, "none")
    err = ((out.double() - ref).norm() / ref.norm()).item()
    torch_err = ((torch_f32.double() - ref).norm() / ref.norm()).item()
    assert err <= max(2 * torch_err, 2e-7), (err, torch_err)


# the sigmoid closure's step: "mean" and "sum" take the loss from the backward's sweep (E.step)
STEP_PATHS = {"fused": {}, "split": {"SPLIT": True}, "wide": {"DENSE": True},
              "wide_split": {"DENSE": True, "SPLIT": True}}


def _engine_calls(monkeypatch):
    """Counts of E.forward / E.backward / E.step calls (E.step's own backward counted)."""
    calls = {"forward": 0, "backward": 0, "step": 0}
    for name in calls:
        def spy(*args, _real=getattr(E, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(E, name, spy)
    return calls


@pytest.mark.parametrize("path", list(STEP_PATHS))
@pytest.mark.parametrize("case,dtype", [("mean", F32), ("mean", torch.bfloat16), ("sum-labels", F32),
                                        ("sum-labels", torch.bfloat16), ("mean-no-bias", F32),
                                        ("saturated", F32), ("converged", F32)])
def test_siglip_step(monkeypatch, path, case, dtype):
    """siglip_loss with reduction "mean" / "sum" and gradients asked for runs one step and no
    forward sweep, on every backward path (the wide one over several row chunks and column
    slabs): the loss and every gradient against float64 (16-bit: within 2x PyTorch's own error),
    grad_output != 1, and the loss equal to the forward's sums. "converged": matched pairs far
    above every negative, whose terms e^-|S| lie below float32's 2^-24 next to 1 (the softplus
    sums' series)."""
    monkeypatch.setattr(E, "config_override", dict(STEP_PATHS[path]))
    monkeypatch.setattr(E, "_DENSE_BYTES_MIN", 1)
    N, M, D = (100, 100, 20) if case == "sum-labels" else (100, 130, 20)
    scale, bias = {"saturated": (60.0, 20.0), "converged": (100.0, -80.0)}.get(case, (10.0, -10.0))
    labels = torch.randint(0, 7, (N,), device=DEVICE) if case == "sum-labels" else None
    reduction = "sum" if case == "sum-labels" else "mean"
    q, k = features(N, D, dtype, DEVICE), features(M, D, dtype, DEVICE)
    if case == "converged":  # each query's key close to it (cos ~0.98)
        with torch.no_grad():
            k[:N] = torch.nn.functional.normalize(q + 0.02 * torch.randn_like(q), dim=1)
    inputs = [q, k, _scalar(scale)] + ([] if case == "mean-no-bias" else [_scalar(bias)])

    def fn(q, k, s, b=None):
        return fastcl.siglip_loss(q, k, s, b, labels=labels, reduction=reduction, backend=BACKEND)

    def ref(q, k, s, b=None):
        return R.siglip_loss(q, k, s.to(q.dtype), None if b is None else b.to(q.dtype),
                             None if labels is None else labels.to(q.device), reduction)

    calls = _engine_calls(monkeypatch)
    out = _check(f"siglip-step-{path}", fn, ref, inputs, dtype=dtype,
                 rtol=2e-5 if dtype == F32 else 1e-3)
    assert (calls["step"], calls["forward"], calls["backward"]) == (1, 0, 1), calls
    with torch.no_grad():  # the forward's sweep
        swept = fn(*inputs)
    assert calls["forward"] == 1
    assert abs(out.item() - swept.item()) <= 2e-6 * abs(swept.item()), (out.item(), swept.item())
    if case == "converged":  # a total of ~1e-5: relative to PyTorch's float32 error, not absolute
        ref64 = ref(*(as64(x) for x in inputs))
        torch32 = ref(*(x.detach() for x in inputs))
        assert rel(out, ref64) <= max(2 * rel(torch32, ref64), 5e-6), (rel(out, ref64), rel(torch32, ref64))


@pytest.mark.parametrize("path", ["fused", "wide"])
@pytest.mark.parametrize("offset", [37, 130, -100])
def test_siglip_step_at_an_offset(monkeypatch, path, offset):
    """E.step of a block whose positives j = i + offset are shifted off the tile grid (37), or
    out of range altogether (a ring's off-diagonal blocks): the rows' losses and the weighted
    gradients against float64."""
    monkeypatch.setattr(E, "config_override", dict(STEP_PATHS[path]))
    monkeypatch.setattr(E, "_DENSE_BYTES_MIN", 1)
    N, M, D, w = 100, 130, 20, 0.3
    q, k = features(N, D, F32, DEVICE, requires_grad=False), features(M, D, F32, DEVICE, requires_grad=False)
    s, b = torch.tensor([10.0], device=DEVICE), torch.tensor([-10.0], device=DEVICE)
    spec = fastcl.ops.LossSpec(kind="sigmoid", offset=offset)
    stats, grads = E.step(q, k, s, b, fastcl.ops.Targets(), spec, (True,) * 4, weight=w)
    q64, k64, s64, b64 = (x.detach().double().requires_grad_() for x in (q, k, s, b))
    rows = shifted_siglip_rows(q64, k64, s64, b64, offset)
    want = torch.autograd.grad(w * rows.sum(), [q64, k64, s64, b64])
    assert rel(stats.row_lse, rows) <= 2e-6, rel(stats.row_lse, rows)
    for name, got, ref in zip(("queries", "keys", "scale", "bias"), grads, want):
        assert rel(got.reshape(ref.shape), ref) <= 2e-5, (name, rel(got.reshape(ref.shape), ref))


@pytest.mark.parametrize("pattern", ["keys", "scale", "bias", "queries+scale"])
def test_siglip_step_partial_grads_on_the_wide_path(monkeypatch, pattern):
    """Only the gradients asked for, on the wide path too (where the dS tiles alone give the
    loss when no feature gradient is needed)."""
    monkeypatch.setattr(E, "config_override", {"DENSE": True})
    flags = PATTERNS[pattern]
    q = features(40, 24, F32, DEVICE, requires_grad=bool(flags[0]))
    k = features(70, 24, F32, DEVICE, requires_grad=bool(flags[1]))
    s, b = _scalar(10.0, bool(flags[2])), _scalar(-8.0, bool(flags[3]))
    calls = _engine_calls(monkeypatch)
    _check(f"siglip-step-{pattern}", lambda q, k, s, b: fastcl.siglip_loss(q, k, s, b, backend=BACKEND),
           lambda q, k, s, b: R.siglip_loss(q, k, s, b), [q, k, s, b])
    assert calls["step"] == 1 and calls["forward"] == 0, calls


def test_siglip_step_off(monkeypatch):
    """config_override["STEP"] = False: the forward sweep and the backward, the same loss; the
    step serves the sigmoid closure alone."""
    q, k = features(40, 24, F32, DEVICE), features(50, 24, F32, DEVICE)
    s, b = _scalar(10.0), _scalar(-10.0)
    calls = _engine_calls(monkeypatch)
    with_step = fastcl.siglip_loss(q, k, s, b, backend=BACKEND)
    monkeypatch.setattr(E, "config_override", {"STEP": False})
    without = fastcl.siglip_loss(q, k, s, b, backend=BACKEND)
    assert (calls["step"], calls["forward"]) == (1, 1), calls
    assert abs(with_step.item() - without.item()) <= 2e-6 * abs(without.item())
    spec = fastcl.ops.LossSpec(kind="softmax")
    assert not E.takes_step(q, spec, fastcl.ops.Targets())
    with pytest.raises(ValueError, match="sigmoid"):
        E.step(q, k, s.detach().reshape(1), None, fastcl.ops.Targets(), spec, (True,) * 4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nt_xent(reduction):
    z1, z2 = features(21, 13, F32, DEVICE, normalize=False), features(21, 13, F32, DEVICE, normalize=False)
    _check("nt_xent", lambda a, b: fastcl.nt_xent(a, b, 0.2, reduction=reduction, backend=BACKEND, exact=True),
           lambda a, b: R.nt_xent(a, b, 0.2, reduction=reduction), [z1, z2])


@pytest.mark.parametrize("views", [1, 3])
def test_supcon(views):
    B, D = 26, 17
    x = torch.randn(B, views, D, dtype=F32, device=DEVICE) if views > 1 else torch.randn(B, D, device=DEVICE)
    x.requires_grad_()
    labels = torch.randint(0, 6, (B,), device=DEVICE)[torch.randperm(B, device=DEVICE)]
    labels[1:13] = torch.arange(6, device=DEVICE).repeat(2)  # every class has two members
    labels[0] = 99  # a class of one: with one view that row has no positive
    out, valid = fastcl.supcon(x, labels, 0.1, backend=BACKEND, exact=True, return_valid=True)
    assert valid.sum().item() == B * views - (1 if views == 1 else 0)
    _check("supcon", lambda x: fastcl.supcon(x, labels, 0.1, backend=BACKEND, exact=True),
           lambda x: R.supcon(x, labels.to(x.device), 0.1)[0], [x])


_TMA_LOSSES = {
    "clip": lambda q, k: fastcl.clip_loss(q, k[:q.shape[0]], 10.0, reduction="none", backend=BACKEND,
                                          exact=True),
    "info_nce": lambda q, k: fastcl.info_nce(q, k, scale=10.0, reduction="none", backend=BACKEND,
                                             exact=True),
    "supcon": lambda q, k: fastcl.supcon(q, torch.arange(q.shape[0], device=q.device) % 5, 0.1,
                                         reduction="none", backend=BACKEND, exact=True),
    "siglip": lambda q, k: fastcl.siglip_loss(q, k[:q.shape[0]], 10.0, -3.0, reduction="none",
                                              backend=BACKEND, exact=True),
}


@pytest.mark.skipif(E._TensorDescriptor is None, reason="this Triton has no host-side tensor descriptors")
@pytest.mark.parametrize("loss", sorted(_TMA_LOSSES))
@pytest.mark.parametrize("N,M,D", [(70, 150, 40), (37, 53, 24)])
def test_forward_through_tensor_descriptors(monkeypatch, loss, N, M, D):
    # TMA: True (opt-in) streams the forward's D chunks through tensor descriptors: the same
    # statistics as the pointer loads, at shapes that are no multiple of the blocks (the copies
    # zero-pad outside the matrices), through the band, interior and one-launch forwards
    real, made = E._TensorDescriptor, []

    def counting(base, shape, strides, block_shape):
        made.append(block_shape)
        return real(base, shape, strides, block_shape)

    q, k = features(N, D, F32, DEVICE), features(M, D, F32, DEVICE)
    monkeypatch.setattr(E, "_TensorDescriptor", counting)
    monkeypatch.setattr(E, "config_override", {"BLOCK_D": 16})
    want = _TMA_LOSSES[loss](q, k)
    assert not made
    monkeypatch.setattr(E, "config_override", {"BLOCK_D": 16, "TMA": True})
    got = _TMA_LOSSES[loss](q, k)
    assert made, "the descriptors were not used"
    # the interpreter runs the same arithmetic on both paths; a GPU may order the MMA differently
    exact = DEVICE.type == "cpu"
    torch.testing.assert_close(got, want, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


@pytest.mark.skipif(E._TensorDescriptor is None, reason="this Triton has no host-side tensor descriptors")
def test_tensor_descriptors_fall_back_for_unaligned_rows(monkeypatch):
    # rows of 13 float32 features (52 bytes) cannot be described to the copy engine: the launch
    # keeps its pointer loads
    q, k = features(20, 13, F32, DEVICE), features(30, 13, F32, DEVICE)
    args, cfg = E._with_tma((q, k, 0), q, k, dict(TMA=True, BLOCK_M=32, BLOCK_N=32, BLOCK_D=16))
    assert args[0] is q and cfg["TMA"] is False
    monkeypatch.setattr(E, "config_override", {"TMA": True})
    torch.testing.assert_close(_TMA_LOSSES["info_nce"](q, k),
                               R.info_nce(q.double(), k.double(), None, 10.0, None, "none").float(),
                               rtol=1e-5, atol=1e-5)


def test_dense_ids_keep_exactly_the_equalities():
    # labels / ids reach the kernels as int32 ranks of the sorted union: equal exactly when the
    # int64 values are, including values that agree in their low 32 bits
    rows = torch.tensor([5, 5 + 2**32, -7, 2**62, 5, -(2**40), 3], device=DEVICE)
    cols = torch.tensor([2**62, 5, 11, 5 + 2**32, -7, 3 - 2**32, 5, -(2**40)], device=DEVICE)
    r, c = E._dense_ids(rows, cols)
    assert r.dtype == c.dtype == torch.int32
    assert torch.equal(r[:, None] == c[None, :], rows[:, None] == cols[None, :])
    assert torch.equal(r[:, None] == r[None, :], rows[:, None] == rows[None, :])
    same_r, same_c = E._dense_ids(rows, rows)
    assert same_r is same_c and torch.equal(same_r[:, None] == same_r[None, :], rows[:, None] == rows[None, :])
    assert E._dense_ids(None, None) == (None, None)
    # ids that already fit in 32 bits are kept as they are (prepared once, reused by the backward)
    r32, c32 = E._dense_ids(r, c)
    assert torch.equal(r32, r) and torch.equal(c32, c)


@pytest.mark.parametrize("loss", ["supcon", "fn_ids"])
def test_labels_and_ids_beyond_32_bits(loss):
    # classes / duplicate ids that differ only above bit 31 stay distinct in the kernels
    B, D = 24, 9
    x = features(B, D, F32, DEVICE)
    base = torch.arange(B, device=DEVICE) % 4
    wide = base + (torch.arange(B, device=DEVICE) // 12) * 2**32  # 8 classes; 4 if truncated to int32
    if loss == "supcon":
        fn = lambda x: fastcl.supcon(x, wide, 0.2, reduction="none", backend=BACKEND, exact=True)  # noqa: E731
        ref = lambda x: R.supcon(x, wide.to(x.device), 0.2, reduction="none")[0]  # noqa: E731
        low = fastcl.supcon(x, base, 0.2, reduction="none", backend=BACKEND, exact=True)
    else:
        k = features(B, D, F32, DEVICE)
        fn = lambda x: fastcl.info_nce(x, k, scale=8.0, reduction="none", backend=BACKEND, exact=True,  # noqa: E731
                                       key_ids=wide)
        ref = lambda x: R.info_nce(x, k.to(x), None, 8.0, None, "none", key_ids=wide.to(x.device))  # noqa: E731
        low = fastcl.info_nce(x, k, scale=8.0, reduction="none", backend=BACKEND, exact=True, key_ids=base)
    assert (fn(x) - low).abs().max() > 1e-3  # the high bits matter for this loss
    _check(f"wide-{loss}", fn, ref, [x])


def test_supcon_no_positives_anywhere():
    x = features(8, 5, F32, DEVICE)
    labels = torch.arange(8, device=DEVICE)
    loss = fastcl.supcon(x, labels, backend=BACKEND)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, [x])
    assert torch.all(g == 0)


# ----------------------------------------------------------------------------------------------
# the wide-feature backward (dS row chunks + GEMMs), forced at small shapes
# ----------------------------------------------------------------------------------------------

DENSE_CASES = {
    "info_nce": (lambda q, k, s, b: fastcl.info_nce(q, k[:, :], positives=torch.arange(q.shape[0], device=q.device).flip(0),
                                                    scale=s, bias=b, reduction="none", backend=BACKEND, exact=True),
                 lambda q, k, s, b: R.info_nce(q, k, torch.arange(q.shape[0], device=q.device).flip(0), s, b, "none")),
    "clip": (lambda q, k, s, b: fastcl.clip_loss(q, k[: q.shape[0]], s, b, reduction="none", backend=BACKEND, exact=True),
             lambda q, k, s, b: R.clip_loss(q, k[: q.shape[0]], s, b, "none")),
    "siglip": (lambda q, k, s, b: fastcl.siglip_loss(q, k, s, b, reduction="none", backend=BACKEND, exact=True),
               lambda q, k, s, b: R.siglip_loss(q, k, s, b, reduction="none")),
    "nt_xent": (lambda q, k: fastcl.nt_xent(q, k, 0.3, reduction="none", backend=BACKEND, exact=True),
                lambda q, k: R.nt_xent(q, k, 0.3, reduction="none")),
}


@pytest.mark.parametrize("case", list(DENSE_CASES))
@pytest.mark.parametrize("chunked", [False, True])
def test_dense_backward(monkeypatch, case, chunked):
    monkeypatch.setattr(E, "config_override", {"DENSE": True})
    if chunked:  # several row chunks: dK accumulated across chunks
        monkeypatch.setattr(E, "_DENSE_BYTES_MIN", 1)
    N, M, D = (37, 53, 29) if case in ("info_nce", "siglip") else (37, 37, 29)
    fn, ref = DENSE_CASES[case]
    inputs = [features(N, D, F32, DEVICE), features(M, D, F32, DEVICE)]
    if case != "nt_xent":
        inputs += [_scalar(9.0), _scalar(-0.4)]
    _check(f"dense-{case}", fn, ref, inputs)


@pytest.mark.parametrize("loss,dtype,exact,want", [
    ("clip", F32, True, True), ("clip", F32, False, False), ("info_nce", F32, True, False),
    ("clip", torch.bfloat16, False, False), ("clip", torch.bfloat16, True, False),
    ("clip", torch.float16, False, False)])
def test_exact_symmetric_backward_goes_wide(monkeypatch, loss, dtype, exact, want):
    """A symmetric closure with IEEE float32 products asks for the wide-feature backward at any D
    (its fused kernels spill with those products); TF32, 16-bit features (whose products are IEEE
    too, with exact or not) and one-way closures do not."""
    seen = []
    real = E._dense_backward

    def spy(queries, exact_symmetric=False):
        seen.append(exact_symmetric)
        return real(queries, exact_symmetric)

    monkeypatch.setattr(E, "_dense_backward", spy)
    q, k = features(20, 16, dtype, DEVICE), features(20, 16, dtype, DEVICE)
    if loss == "clip":
        out = fastcl.clip_loss(q, k, 10.0, backend=BACKEND, exact=exact)
    else:
        out = fastcl.info_nce(q, k, scale=10.0, backend=BACKEND, exact=exact)
    out.backward()
    assert seen == [want]


@pytest.mark.parametrize("blocked", [False, True])
def test_dense_backward_low_precision(monkeypatch, blocked):
    """16-bit features: with several column slabs dQ is summed over them in bfloat16 (one
    rounding each), dK over the row chunks in float32; both within 2x PyTorch's bf16 error."""
    monkeypatch.setattr(E, "config_override", {"DENSE": True})
    if blocked:
        monkeypatch.setattr(E, "_DENSE_BYTES_MIN", 1)
        rows, cols = E.dense_plan(150, 150, 48, 2, 32, 32, True)
        assert rows < 150 and -(-150 // cols) >= 3
    q, k = features(150 if blocked else 40, 48, torch.bfloat16, DEVICE), \
        features(150 if blocked else 40, 48, torch.bfloat16, DEVICE)
    _check("dense-bf16", lambda q, k, s: fastcl.clip_loss(q, k, s, reduction="none", backend=BACKEND),
           lambda q, k, s: R.clip_loss(q, k, s.to(q.dtype), None, "none"), [q, k, _scalar(14.0)],
           dtype=torch.bfloat16, rtol=1e-3)


@pytest.mark.parametrize("path", [{}, {"DENSE": True}])
@pytest.mark.parametrize("loss", ["dcl", "dclw", "mv_infonce_3", "mv_infonce_4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, F32])
def test_view_pair_sweeps(monkeypatch, path, loss, dtype):
    """DCL and DCLW of two views, and MV-InfoNCE of V > 2 views, sweep each view against itself
    and the views against each other (one symmetric sweep per pair), each sweep leaving out its
    band j = i only: no closure leaves its targets out or takes a target LSE, so every sweep's
    interior tiles take the lean path (PLAIN), on the fused and the wide-feature backward. Loss
    and gradients (the temperature's too) within 2x PyTorch's own error in the features'
    dtype."""
    monkeypatch.setattr(E, "config_override", path)
    monkeypatch.setattr(E, "_DENSE_BYTES_MIN", 1)
    seen = []
    real = E._flags

    def spy(queries, spec, targets, bias, **kw):
        out = real(queries, spec, targets, bias, **kw)
        seen.append((spec.exclude_targets or spec.target_lse, E._plain(spec, targets), out["PLAIN"],
                     kw.get("gram")))
        return out

    monkeypatch.setattr(E, "_flags", spy)
    t = torch.tensor(0.2, dtype=F32, device=DEVICE, requires_grad=True)
    if loss.startswith("dcl"):
        sigma = 0.5 if loss == "dclw" else None
        views = [features(75, 40, dtype, DEVICE), features(75, 40, dtype, DEVICE)]
        fn = lambda a, b, t: fastcl.dcl(a, b, t, weight_sigma=sigma, reduction="none",  # noqa: E731
                                        backend=BACKEND, exact=True)
        ref = lambda a, b, t: R.dcl(a, b, t, sigma, reduction="none")  # noqa: E731
    else:
        V = int(loss[-1])
        views = [torch.stack([features(40, 24, dtype, DEVICE) for _ in range(V)], 1).detach()
                 .requires_grad_()]
        fn = lambda x, t: fastcl.mv_infonce(x, t, reduction="none", backend=BACKEND,  # noqa: E731
                                            exact=True)
        ref = lambda x, t: R.mv_infonce(x, t, reduction="none")  # noqa: E731
    _check(loss, fn, ref, views + [t], dtype=dtype, rtol=1e-3 if dtype != F32 else 2e-5)
    pairs = 3 if loss.startswith("dcl") else int(loss[-1]) * (int(loss[-1]) + 1) // 2
    assert len(seen) >= 2 * pairs and not any(x[0] for x in seen) and all(x[1] for x in seen), seen
    # every launch on the lean path but the self-sweeps' GRAM launches, which IEEE float32
    # products take for their lines' sums, as every self-similarity's do
    assert all(x[2] for x in seen if not x[3]), seen


def _supcon_in(a, b, **kw):
    return fastcl.supcon(torch.cat([a, b]), _LABELS.repeat(2).to(a.device), 0.2, variant="in", **kw)


_LABELS = torch.arange(75) % 20
_SELF = {  # the loss of two views, its float64 reference, DENSE_ROWS, and the plan's same_rows
    "nt_xent": (lambda a, b, **kw: fastcl.nt_xent(a, b, 0.2, **kw),
                lambda a, b: R.nt_xent(a, b, 0.2, reduction="none"), True, True),
    "nt_xent_cols": (lambda a, b, **kw: fastcl.nt_xent(a, b, 0.2, **kw),
                     lambda a, b: R.nt_xent(a, b, 0.2, reduction="none"), False, False),
    "hcl": (lambda a, b, **kw: fastcl.hcl(a, b, 0.5, **kw),
            lambda a, b: R.hcl(a, b, 0.5, reduction="none"), True, True),
    "hcl_fold": (lambda a, b, **kw: fastcl.hcl(a, b, 0.5, **kw),
                 lambda a, b: R.hcl(a, b, 0.5, reduction="none"), False, True),
    "supcon_in": (_supcon_in, lambda a, b: R.supcon(torch.cat([a, b]), _LABELS.repeat(2).to(a.device),
                                                    0.2, variant="in", reduction="none")[0], True, True),
}


@pytest.mark.parametrize("case", list(_SELF))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_self_similarity(monkeypatch, case, dtype):
    """The self-similarities on the wide-feature backward, in several row chunks and column
    slabs, within 2x PyTorch's own error in the features' dtype. By default the block holds
    dS + dS^T -- the symmetric closure's (NT-Xent), or the transposed term added in the tiles
    (GRAM: HCL, SupCon L_in) -- and the rows' gradient, summed over the slabs in float32
    per row chunk, is the whole one, in a block of the stacked rows' bytes. ``DENSE_ROWS`` False
    keeps dS alone: NT-Xent then takes dK's float32 sums per slab in a block of twice those
    bytes; HCL dQ summed in the gradient over twice as many slabs, dK's float32 sums per slab
    folded into it, in a block of the stacked rows' bytes. (DCL, DCLW and MV-InfoNCE with
    V > 2 views sweep each view against itself and the views against each other:
    test_view_pair_sweeps.) (IEEE float32 features: the lines' totals are corrected
    afterwards, test_dense_backward, test_line_totals.)"""
    loss, ref, dense_rows, same_rows = _SELF[case]
    monkeypatch.setattr(E, "config_override", {"DENSE": True, "DENSE_ROWS": dense_rows})
    monkeypatch.setattr(E, "_DENSE_BYTES_MIN", 1)
    plans = []
    real = E.dense_plan

    def spy(N, M, D, elt, BM, BN, dk_sums, same_rows=False, rows_acc=False):
        plans.append((N, same_rows, rows_acc, dk_sums) + real(N, M, D, elt, BM, BN, dk_sums,
                                                              same_rows, rows_acc))
        return plans[-1][4:]

    monkeypatch.setattr(E, "dense_plan", spy)
    z1, z2 = features(75, 40, dtype, DEVICE), features(75, 40, dtype, DEVICE)
    _check(f"dense-{case}", lambda a, b: loss(a, b, reduction="none", backend=BACKEND, exact=True),
           ref, [z1, z2], dtype=dtype, rtol=1e-3)
    (N, *mode, chunk, slab), = plans
    assert mode == [same_rows, dense_rows, not dense_rows], plans
    slabs = -(-N // slab)
    assert N == 150 and chunk < N and (slabs > E._DENSE_SLABS if same_rows and not dense_rows
                                       else slabs >= 3), plans


def test_dense_plan_small_matrix_is_one_block():
    """A matrix whose whole dS and float32 sums take at most 8 x _DENSE_BYTES_MIN (64 MiB) is
    one block: N = M = 4096, D = 512, bf16 (dS 32 MiB + dK sums 8 MiB) in one pair of dS
    launches and two GEMMs instead of four column slabs; N = M = 8192 (128 MiB of dS) keeps
    its slabs and row chunks within the inputs' bytes."""
    assert E.dense_plan(4096, 4096, 512, 2, 128, 64, True) == (4096, 4096)
    assert E.dense_plan(4000, 3000, 512, 2, 128, 64, True) == (4096, 3008)
    assert E.dense_plan(4096, 4096, 512, 2, 128, 64, False, same_rows=True,
                        rows_acc=True) == (4096, 4096)
    R, W = E.dense_plan(8192, 8192, 512, 2, 128, 64, True)
    assert W == 2048 and R < 8192 and R * W * 2 + W * 512 * 4 <= 16 << 20


@pytest.mark.parametrize("D", [384, 512, 768, 1024, 2048])
@pytest.mark.parametrize("N,M", [(32768, 32768), (8192, 65536), (1 << 20, 1 << 20), (300, 70)])
def test_dense_plan_bounds(N, M, D):
    """The wide-feature backward's dS block and float32 dK sums stay within the inputs' bytes (up
    to D = 512; or twice the sums), in at most four column slabs; at N = M = 32768 in bf16 its
    whole extra memory, gradients included, is under 200 MiB up to D = 1024 (torch.compile's is
    ~4 GiB there)."""
    for elt in (2, 4):
        R, W = E.dense_plan(N, M, D, elt, 128, 64, True)
        budget = max(E._DENSE_BYTES_MIN, (N + M) * min(D, 512) * elt, 2 * W * D * 4)
        assert R % 128 == 0 and W % 64 == 0 and R >= 128
        assert -(-M // W) <= E._DENSE_SLABS
        assert R * W * elt + W * D * 4 <= budget, (R, W)
        if elt == 2 and N == M == 32768 and D <= 1024:
            assert (R * W * elt + W * D * 4 + (N + M) * D * elt) < 200 * 2**20
        R1, W1 = E.dense_plan(N, M, D, elt, 128, 64, False)  # no dK: longer row chunks
        assert W1 == W and R1 >= R
        # a self-similarity (N rows against themselves): the block and the rows' float32 sums
        # (dS + dS^T in the block), or dK's (dS alone, DENSE_ROWS false: twice as many slabs),
        # within the features' bytes counted once
        once = max(E._DENSE_BYTES_MIN, N * min(D, 512) * elt)
        R2, W2 = E.dense_plan(N, N, D, elt, 128, 64, False, same_rows=True, rows_acc=True)
        assert R2 % 128 == 0 and W2 % 64 == 0 and -(-N // W2) <= E._DENSE_SLABS
        assert R2 == 128 or R2 * W2 * elt + R2 * D * 4 <= once
        R3, W3 = E.dense_plan(N, N, D, elt, 128, 64, True, same_rows=True)
        assert R3 % 128 == 0 and W3 % 64 == 0 and -(-N // W3) <= 2 * E._DENSE_SLABS
        assert R3 == 128 or R3 * W3 * elt + W3 * D * 4 <= max(once, 2 * W3 * D * 4)
        if elt == 2 and N == 32768 and D <= 1024:  # the block, the stacked rows, their gradient
            assert R2 * W2 * elt + R2 * D * 4 + 2 * N * D * elt < 160 * 2**20
            assert R3 * W3 * elt + W3 * D * 4 + 2 * N * D * elt <= 160 * 2**20
            assert R3 >= R // 2 and (D > 512 or R3 >= R)  # (chunks as long as two sets' up to 512)


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + o, mask=o < n)
    tl.store(y_ptr + o, E._lowp(x, y_ptr.dtype.element_ty, UPCAST), mask=o < n)


def test_bfloat16_conversions_round_to_nearest_even():
    """The kernels' float32 -> bfloat16 conversions (dS into the tensor-core products, dQ / dK
    and the wide path's dS on store) round to nearest even, bit for bit as torch does, on the GPU
    and under the interpreter (which on its own truncates)."""
    ulp = 2.0 ** -7
    ties = [1 + 0.5 * ulp, 1 + 1.5 * ulp, -(1 + 0.5 * ulp), 1 + 0.75 * ulp, 1 + 0.25 * ulp]
    special = [0.0, -0.0, float("inf"), float("-inf"), 3.3895e38, 1.2e-38]  # (the interpreter
    # flushes subnormal results to zero; the GPU keeps them: contributions below 1e-38 either way)
    x = torch.cat([torch.tensor(ties + special), torch.randn(1000) * torch.logspace(-30, 30, 1000)])
    x = x.to(DEVICE)
    y = torch.empty(x.numel(), dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(1,)](x, y, x.numel(), UPCAST=DEVICE.type != "cuda", BLOCK=2048)
    expect = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), expect.view(torch.int16))


def test_bfloat16_gradients_carry_only_the_roundings_of_bf16_products():
    """bf16 CLIP gradients: dS is rounded once to bf16 for the tensor-core products and the
    result once on store, so the error stays well below PyTorch's materialised bf16 loss."""
    N, D = 100, 40
    q, k = features(N, D, torch.bfloat16, DEVICE), features(N, D, torch.bfloat16, DEVICE)
    s = _scalar(14.0)
    g = torch.tensor(0.7, device=DEVICE)
    out = fastcl.clip_loss(q, k, s, backend=BACKEND)
    ins64 = [as64(x) for x in (q, k, s)]
    ref = R.clip_loss(*ins64)
    lp = [lowp(x, torch.bfloat16) for x in (q, k, s)]
    base = R.clip_loss(lp[0], lp[1], lp[2].to(torch.bfloat16))
    got = grads(out, [q, k], g)
    want = grads(ref, ins64[:2], g.double())
    naive = grads(base, lp[:2], g.to(base.dtype))
    for a, r, b in zip(got, want, naive):
        err = ((a.double() - r).norm() / r.norm()).item()
        err_naive = ((b.double() - r).norm() / r.norm()).item()
        assert err < 0.75 * err_naive, (err, err_naive)
