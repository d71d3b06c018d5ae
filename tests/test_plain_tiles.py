"""The lean path of the Triton kernels for tiles inside the matrix and off the target band (one
exponential per entry, column sums from the row-normalised exponentials, P^col from P by a rank-one
rescaling) and its guarded fallbacks, against the float64 reference.

Under the interpreter the branch predicates are wrapped to record which way each tile went, so a
test fails if the path it is about was not taken (with the interpreter's 32 x 32 tiles).
"""
import collections
import random

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401  (the wrapped predicates are jit functions of this module)

import fastcl
from fastcl import reference as R
from fastcl.ops.triton import engine as E

from .conftest import DEVICE
from .test_triton import _check, _scalar
from ._utils import features, rel

# float32 checks here hold the default mode to float32 bounds: on a GPU with IEEE products too
pytestmark = pytest.mark.usefixtures("ieee_default_products")

interpreter_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="records branches under the interpreter")


# The interpreter re-executes a jit function from its source with the module's globals, so the
# wrappers are module-level functions that look up the originals and the counter here.
_ORIGINAL = {}
_SEEN = collections.Counter()


def _record(name, out):
    _SEEN[(name, bool(out))] += 1
    return out


def _spy_plain_tile(row0, col0, N, M, offset, BLOCK_M, BLOCK_N):
    return _record("_plain_tile", _ORIGINAL["_plain_tile"](row0, col0, N, M, offset, BLOCK_M, BLOCK_N))


def _spy_plain_spans(row0, N, M, offset, BLOCK_M, BLOCK_N):
    lo_end, hi_start, hi_end = _ORIGINAL["_plain_spans"](row0, N, M, offset, BLOCK_M, BLOCK_N)
    _record("_plain_spans", (lo_end > 0) | (hi_end > hi_start))  # some interior tile in the row block
    return lo_end, hi_start, hi_end


def _spy_any_underflow(flags):
    return _record("_any_underflow", _ORIGINAL["_any_underflow"](flags))


def _spy_lses_close(r2, c2):
    return _record("_lses_close", _ORIGINAL["_lses_close"](r2, c2))


@pytest.fixture
def branches(monkeypatch):
    """Counts of (predicate name, outcome) over every tile the kernels visit."""
    _SEEN.clear()
    for name, spy in (("_plain_tile", _spy_plain_tile), ("_plain_spans", _spy_plain_spans),
                      ("_any_underflow", _spy_any_underflow), ("_lses_close", _spy_lses_close)):
        _ORIGINAL[name] = getattr(E, name)
        monkeypatch.setattr(E, name, triton.jit(spy))
    return _SEEN


def _clip(q, k, s, b):
    return fastcl.clip_loss(q, k, logit_scale=s, logit_bias=b, backend="triton")


def _clip_ref(q, k, s, b):
    return fastcl.clip_loss(q, k, logit_scale=s, logit_bias=b, backend="torch")


@interpreter_only
@pytest.mark.parametrize("N,D", [(100, 40), (97, 19), (128, 8)])
def test_clip_plain_tiles(branches, N, D):
    q, k = features(N, D, torch.float32, DEVICE), features(N, D, torch.float32, DEVICE)
    s, b = _scalar(14.0), _scalar(-0.5)
    _check("clip", _clip, _clip_ref, (q, k, s, b))
    assert branches[("_plain_tile", True)] > 0 and branches[("_plain_tile", False)] > 0
    assert branches[("_plain_spans", True)] > 0  # the forward's interior-tile launch had work
    assert branches[("_lses_close", True)] > 0  # P^col formed from P in the backward
    assert branches[("_any_underflow", False)] > 0


@interpreter_only
def test_info_nce_extra_keys_plain_tiles(branches):
    q, k = features(70, 24, torch.float32, DEVICE), features(150, 24, torch.float32, DEVICE)

    def fn(q, k, s):
        return fastcl.info_nce(q, k, scale=s, backend="triton")

    def ref(q, k, s):
        return fastcl.info_nce(q, k, scale=s, backend="torch")

    _check("info_nce", fn, ref, (q, k, _scalar(20.0)))
    assert branches[("_plain_tile", True)] > 0 and branches[("_plain_spans", True)] > 0


def _siglip(q, k, s, b, backend="triton"):
    return fastcl.siglip_loss(q, k, s, b, reduction="none", backend=backend)


def _siglip_ref(q, k, s, b):
    return _siglip(q, k, s, b, backend="torch")


@interpreter_only
@pytest.mark.parametrize("N,M,D,scale,bias", [(100, 100, 40, 10.0, -10.0), (97, 97, 19, 60.0, 2.0),
                                              (70, 150, 24, 25.0, -3.0), (150, 64, 33, 3.0, 0.5)])
def test_siglip_plain_tiles(branches, N, M, D, scale, bias):
    """SigLIP's interior tiles hold only negatives: sum_j softplus(S_ij) forward and a_i sigmoid(S_ij)
    backward without masks, the band and edge tiles on the masked path; at scale 60 most logits
    saturate the sigmoid both ways."""
    q, k = features(N, D, torch.float32, DEVICE), features(M, D, torch.float32, DEVICE)
    _check("siglip", _siglip, _siglip_ref, (q, k, _scalar(scale), _scalar(bias)))
    assert branches[("_plain_tile", True)] > 0 and branches[("_plain_tile", False)] > 0
    assert branches[("_plain_spans", True)] > 0


@interpreter_only
@pytest.mark.parametrize("offset,exclude_self", [(40, False), (-30, True), (500, False)])
def test_siglip_offset_band_plain_tiles(branches, offset, exclude_self):
    """The sigmoid closure with its positives (and self-exclusion) on the band j = i + offset, as in
    a ring step, or on no column at all (offset past M): the lean interior tiles against the torch
    engine in float64."""
    from fastcl.autograd import engine_loss
    from fastcl.ops import LossSpec, Targets

    spec = LossSpec(kind="sigmoid", offset=offset, exclude_self=exclude_self)

    def fn(q, k, s, b, backend="triton"):
        return engine_loss(q, k, s, b, Targets(), spec, backend)[0]

    q, k = features(90, 20, torch.float32, DEVICE), features(130, 20, torch.float32, DEVICE)
    _check("siglip-offset", fn, lambda q, k, s, b: fn(q, k, s, b, "torch"),
           (q, k, _scalar(10.0), _scalar(-5.0)))
    assert branches[("_plain_tile", True)] > 0 and branches[("_plain_spans", True)] > 0


@triton.jit
def _classify_kernel(out_ptr, N, M, offset, n_tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     COLUMNS: tl.constexpr):
    # out[program, tile] = (in the program's plain spans, _plain_tile): row-block programs over
    # column tiles (forward, dQ) or, COLUMNS, column-block programs over row tiles (dK)
    pid = tl.program_id(0)
    if COLUMNS:
        lo_end, hi_start, hi_end = E._plain_row_spans(pid * BLOCK_N, N, M, offset, BLOCK_M, BLOCK_N)
    else:
        lo_end, hi_start, hi_end = E._plain_spans(pid * BLOCK_M, N, M, offset, BLOCK_M, BLOCK_N)
    for t in range(0, n_tiles):
        if COLUMNS:
            row0, col0, start = t * BLOCK_M, pid * BLOCK_N, t * BLOCK_M
        else:
            row0, col0, start = pid * BLOCK_M, t * BLOCK_N, t * BLOCK_N
        in_span = (start < lo_end) | ((start >= hi_start) & (start < hi_end))
        tile = E._plain_tile(row0, col0, N, M, offset, BLOCK_M, BLOCK_N)
        tl.store(out_ptr + (pid * n_tiles + t) * 2, in_span.to(tl.int32))
        tl.store(out_ptr + (pid * n_tiles + t) * 2 + 1, tile.to(tl.int32))


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("N,M,offset,BM,BN", [
    (100, 100, 0, 32, 32), (256, 256, 0, 64, 32), (256, 256, 0, 32, 64), (70, 150, 0, 16, 32),
    (64, 512, 192, 32, 64), (64, 512, 200, 32, 64), (300, 300, 0, 128, 128), (96, 40, 0, 32, 64),
    (512, 64, 0, 64, 32), (300, 300, 0, 128, 64), (128, 1000, 870, 64, 32), (33, 33, 0, 16, 16)])
def test_spans_are_the_plain_tiles(N, M, offset, BM, BN, columns):
    """The interior launches (forward, dQ: row-block programs; dK: column-block programs) sweep
    exactly the tiles inside the matrix and off the band, and the band-and-edge launches (the
    complement) every other tile."""
    n_rows, n_cols = triton.cdiv(N, BM), triton.cdiv(M, BN)
    n_prog, n_tiles = (n_cols, n_rows) if columns else (n_rows, n_cols)
    out = torch.full((n_prog, n_tiles, 2), -1, dtype=torch.int32, device=DEVICE)
    _classify_kernel[(n_prog,)](out, N, M, offset, n_tiles, BLOCK_M=BM, BLOCK_N=BN, COLUMNS=columns)
    out = out.cpu()
    assert torch.equal(out[..., 0], out[..., 1])
    if columns:
        out = out.transpose(0, 1)
    rows = torch.arange(n_rows)[:, None] * BM
    cols = torch.arange(n_cols)[None, :] * BN
    expect = ((rows + BM <= N) & (cols + BN <= M)
              & ((cols + BN <= rows + offset) | (cols >= rows + offset + BM)))
    assert torch.equal(out[..., 0].bool(), expect)
    assert out[..., 0].any() or N < BM or M < BN


@interpreter_only
@pytest.mark.parametrize("scale", [300.0, 3000.0])
def test_column_underflow_and_spread_fallbacks(branches, scale):
    """At tiny temperatures column sums relative to a tile's largest logit underflow and row / column
    LSEs spread apart: the forward redoes those columns with their own maxima and the backward
    computes P^col directly; both still match the reference."""
    q, k = features(96, 6, torch.float32, DEVICE), features(96, 6, torch.float32, DEVICE)
    _check("clip", _clip, _clip_ref, (q, k, _scalar(scale), _scalar(0.3)), rtol=1e-4)
    assert branches[("_any_underflow", True)] > 0
    assert branches[("_lses_close", False)] > 0


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_and_general_paths_agree(monkeypatch, dtype, loss):
    q, k = features(100, 33, dtype, DEVICE), features(100, 33, dtype, DEVICE)
    g = torch.rand(2 if loss == "clip" else 1, 100, device=DEVICE).squeeze(0) + 0.5
    out = {}
    for plain in (True, False):
        monkeypatch.setattr(E, "config_override", {"PLAIN": plain})
        qq, kk = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        s, b = _scalar(30.0), _scalar(-4.0)
        if loss == "clip":
            # (no bias: its gradient vanishes identically, leaving only rounding noise)
            out_ = fastcl.clip_loss(qq, kk, logit_scale=s, backend="triton", reduction="none")
        else:
            out_ = _siglip(qq, kk, s, b)
        out_.backward(g)
        out[plain] = (out_.detach(), qq.grad, kk.grad, s.grad) + ((b.grad,) if loss == "siglip" else ())
    tol = 2e-6 if dtype == torch.float32 else 1e-2  # bf16: dS and the gradients round to bf16
    for a, b in zip(out[True], out[False]):
        assert rel(a, b) < tol, (rel(a, b), tol)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU tile sizes")
@pytest.mark.parametrize("scale", [14.0, 3000.0])
def test_clip_plain_tiles_gpu(scale):
    """With the GPU's 128-row tiles: most tiles interior, and at tau = 1/3000 the column-underflow
    and LSE-spread fallbacks (fp32 exact products, so only the paths differ from the reference)."""
    q, k = features(1000, 64, torch.float32, DEVICE), features(1000, 64, torch.float32, DEVICE)

    def fn(q, k, s, b):
        return fastcl.clip_loss(q, k, logit_scale=s, logit_bias=b, backend="triton", exact=True)

    _check("clip", fn, _clip_ref, (q, k, _scalar(scale), _scalar(0.3)), rtol=1e-4)


@interpreter_only
def test_clip_plain_tiles_bf16(branches):
    """bf16 inputs: within 2x of PyTorch's own bf16 CLIP loss error (the materialised loss in bf16)."""
    q, k = features(100, 40, torch.bfloat16, DEVICE), features(100, 40, torch.bfloat16, DEVICE)

    def fn(q, k, s):
        return fastcl.clip_loss(q, k, s, reduction="none", backend="triton")

    def ref(q, k, s):
        return R.clip_loss(q, k, s.to(q.dtype), None, "none")

    _check("clip-bf16", fn, ref, (q, k, _scalar(14.0)), dtype=torch.bfloat16, rtol=1e-3)
    assert branches[("_plain_tile", True)] > 0


@pytest.mark.parametrize("plain_n,general_n", [(64, 32), (64, 16)])
def test_interior_launch_wider_than_band_launch(branches, monkeypatch, plain_n, general_n):
    """The interior tiles' launch may use wider column tiles than the band-and-edge launch (as on
    the GPU, where the masked path would spill at the interior's width): the column partials
    keep one reference per interior-width tile and the loss still matches the reference."""
    config_for = E.config_for

    def widths(device_type, dtype, D, pass_, arch=90, lean=True, exact=False):
        cfg = dict(config_for(device_type, dtype, D, pass_, arch, lean, exact))
        if pass_ == "fwd_plain":
            cfg.update(BLOCK_N=plain_n)
        elif pass_ == "fwd":
            cfg.update(BLOCK_N=general_n)
        return cfg

    monkeypatch.setattr(E, "config_for", widths)
    q, k = features(150, 24, torch.float32, DEVICE), features(150, 24, torch.float32, DEVICE)
    _check("clip", _clip, _clip_ref, (q, k, _scalar(25.0), _scalar(-0.5)))
    if DEVICE.type == "cpu":
        assert branches[("_plain_spans", True)] > 0


def _spy_resident_tile(q, k_ptr, col0, M, D, stride_kn, stride_kd, BLOCK_N, BLOCK_D, PRECISION, UPCAST):
    _record("_resident_tile", True)
    return _ORIGINAL["_resident_tile"](q, k_ptr, col0, M, D, stride_kn, stride_kd, BLOCK_N, BLOCK_D,
                                       PRECISION, UPCAST)


@pytest.mark.parametrize("N,M,D,dtype", [(100, 100, 40, torch.float32), (97, 97, 19, torch.float32),
                                         (70, 150, 64, torch.float32), (100, 100, 33, torch.bfloat16)])
def test_interior_launch_with_resident_query_block(branches, monkeypatch, N, M, D, dtype):
    """With the query block loaded once per program (one product per tile, D padded to a power of
    two), the loss and every gradient still match the reference."""
    if DEVICE.type == "cpu":
        _ORIGINAL["_resident_tile"] = E._resident_tile
        monkeypatch.setattr(E, "_resident_tile", triton.jit(_spy_resident_tile))
    monkeypatch.setattr(E, "config_override", {"fwd_plain.RESIDENT": True})
    assert E.config_for(DEVICE.type, dtype, D, "fwd_plain")["BLOCK_D"] >= D
    q, k = features(N, D, dtype, DEVICE), features(M, D, dtype, DEVICE)
    if N == M:
        def fn(q, k, s, b):
            return fastcl.clip_loss(q, k, logit_scale=s, logit_bias=b, backend="triton")
        ref = _clip_ref
        args = (q, k, _scalar(20.0), _scalar(-0.5))
    else:
        def fn(q, k, s):
            return fastcl.info_nce(q, k, scale=s, backend="triton")

        def ref(q, k, s):
            return fastcl.info_nce(q, k, scale=s, backend="torch")
        args = (q, k, _scalar(20.0))
    if dtype == torch.float32:
        _check("resident", fn, ref, args)
    else:
        _check("resident-bf16", fn, lambda q, k, s, b: R.clip_loss(q, k, s.to(q.dtype), b.to(q.dtype)),
               args, dtype=dtype, rtol=1e-3)
    if DEVICE.type == "cpu":
        assert branches[("_resident_tile", True)] > 0 and branches[("_plain_spans", True)] > 0


@pytest.mark.parametrize("loss", ["clip", "info_nce", "supcon"])
@pytest.mark.parametrize("N,M,D", [(100, 100, 40), (37, 53, 29), (64, 64, 16)])
def test_fused_backward_with_resident_feature_blocks(monkeypatch, loss, N, M, D):
    """The fused backward with each program's own feature block loaded once and one product per
    tile (the key / query tile reused for dQ / dK), as on Hopper for D <= 256: every gradient
    matches the reference, for the two-kernel backward and the self-similarity (GRAM) one."""
    monkeypatch.setattr(E, "config_override", {"bwd.RESIDENT": True, "bwd_gram.RESIDENT": True})
    cfg = E.config_for(DEVICE.type, torch.float32, D, "bwd")
    assert cfg["RESIDENT"] and cfg["BLOCK_D"] == cfg["BLOCK_DV"] >= D
    q = features(N, D, torch.float32, DEVICE)
    if loss == "clip":
        k = features(N, D, torch.float32, DEVICE)
        _check("clip", _clip, _clip_ref, (q, k, _scalar(14.0), _scalar(-0.3)))
    elif loss == "info_nce":
        k = features(M, D, torch.float32, DEVICE)
        pos = torch.randint(0, M, (N,), device=DEVICE)

        def fn(q, k, s, backend="triton"):
            return fastcl.info_nce(q, k, positives=pos, scale=s, backend=backend)
        _check("info_nce", fn, lambda q, k, s: fn(q, k, s, backend="torch"), (q, k, _scalar(12.0)))
    else:
        labels = torch.randint(0, 5, (N,), device=DEVICE)

        def fn(f, t, backend="triton"):
            return fastcl.supcon(f, labels, temperature=t, normalize=False, backend=backend)
        _check("supcon", lambda f, t: fn(f, 1 / t), lambda f, t: fn(f, 1 / t, backend="torch"),
               (q, _scalar(10.0)))


@pytest.mark.parametrize("tiling", [{}, {"bwd_rows_plain.BLOCK_M": 64, "bwd_cols_plain.BLOCK_M": 64},
                                    {"bwd_rows_plain.BLOCK_N": 64, "bwd_cols_plain.BLOCK_N": 64},
                                    {"bwd_rows_plain.BLOCK_N": 16, "bwd_cols_plain.BLOCK_M": 64,
                                     "bwd.BLOCK_M": 64},
                                    {"bwd_rows_plain.RESIDENT": True, "bwd_cols_plain.RESIDENT": True,
                                     "bwd.RESIDENT": False}])
@pytest.mark.parametrize("case", ["clip", "info_nce_extra_keys", "dq_only", "dk_only", "siglip"])
def test_split_backward(monkeypatch, tiling, case):
    """The backward of lean closures with the interior tiles in launches of their own (after the
    band and edge tiles' launches, whose float32 partial sums they continue), with interior tiles
    as wide as or wider than the band's: every gradient, and partial requires_grad, match."""
    monkeypatch.setattr(E, "config_override", dict(tiling, SPLIT=True))
    N, D = 150, 24
    q = features(N, D, torch.float32, DEVICE)
    if case == "info_nce_extra_keys":
        k = features(230, D, torch.float32, DEVICE)

        def fn(q, k, s, backend="triton"):
            return fastcl.info_nce(q, k, scale=s, backend=backend)
        _check("info_nce", fn, lambda q, k, s: fn(q, k, s, "torch"), (q, k, _scalar(20.0)))
        return
    if case == "siglip":
        k = features(170, D, torch.float32, DEVICE)
        _check("siglip", _siglip, _siglip_ref, (q, k, _scalar(12.0), _scalar(-6.0)))
        return
    k = features(N, D, torch.float32, DEVICE)
    if case == "dq_only":
        k.requires_grad_(False)
    if case == "dk_only":
        q.requires_grad_(False)
    _check("clip", _clip, _clip_ref, (q, k, _scalar(14.0), _scalar(-0.5)))


@pytest.mark.parametrize("tiling", [{}, {"dense_plain.BLOCK_M": 64, "dense_plain.BLOCK_N": 64},
                                    {"dense_plain.BLOCK_N": 64, "fwd.BLOCK_N": 16}])
@pytest.mark.parametrize("case", ["clip", "siglip", "info_nce_extra_keys"])
def test_wide_feature_backward_split(branches, monkeypatch, tiling, case):
    """The wide-feature backward of lean closures with the dS tiles of plain spans in a launch of
    their own (lean path only, spans as wide as or wider than the band launch's tiles), over
    several column slabs and row chunks: every gradient matches the reference."""
    monkeypatch.setattr(E, "config_override", dict(tiling, DENSE=True, SPLIT=True))
    monkeypatch.setattr(E, "_DENSE_BYTES_MIN", 1)
    q = features(150, 24, torch.float32, DEVICE)
    if case == "clip":
        k = features(150, 24, torch.float32, DEVICE)
        _check("clip", _clip, _clip_ref, (q, k, _scalar(14.0), _scalar(-0.5)))
    elif case == "siglip":
        k = features(200, 24, torch.float32, DEVICE)
        _check("siglip", _siglip, _siglip_ref, (q, k, _scalar(12.0), _scalar(-6.0)))
    else:
        k = features(230, 24, torch.float32, DEVICE)

        def fn(q, k, s, backend="triton"):
            return fastcl.info_nce(q, k, scale=s, backend=backend)
        _check("info_nce", fn, lambda q, k, s: fn(q, k, s, "torch"), (q, k, _scalar(20.0)))
    if DEVICE.type == "cpu":
        assert branches[("_plain_tile", True)] > 0 and branches[("_plain_tile", False)] > 0


def test_span_work_matches_the_tiles():
    """span_work (which of the wide-feature backward's two dS launches has tiles in a block)
    against every span of the block classified as the kernels' _plain_tile does, over blocks of
    several plans: square and rectangular, edges cut by N and M or not, offsets either side of
    the diagonal and past the matrix, spans of unequal sides."""
    rng = random.Random(0)

    def plain(r, c, N, M, off, BM, BN):
        return r + BM <= N and c + BN <= M and (c + BN <= r + off or c >= r + off + BM)

    seen = set()
    for _ in range(600):
        BM, BN = rng.choice([16, 32, 64]), rng.choice([16, 32, 64])
        N, M = rng.randint(1, 9 * 64), rng.randint(1, 9 * 64)
        off = rng.randint(-M, N + M) if rng.random() < 0.7 else 0
        R, W = BM * rng.randint(1, 5), BN * rng.randint(1, 5)
        for r0 in range(0, N, R):
            for c0 in range(0, M, W):
                r1, c1 = min(N, r0 + R), min(M, c0 + W)
                kinds = {plain(r, c, N, M, off, BM, BN)
                         for r in range(r0, r1, BM) for c in range(c0, c1, BN)}
                got = E.span_work(r0, r1, c0, c1, N, M, off, BM, BN)
                assert got == (False in kinds, True in kinds), (r0, r1, c0, c1, N, M, off, BM, BN)
                seen.add(got)
    assert seen == {(True, False), (False, True), (True, True)}


@pytest.mark.parametrize("resident", [False, True])
@pytest.mark.parametrize("N,D,scale", [(150, 40, 14.0), (97, 19, 50.0), (200, 24, 300.0)])
def test_column_sums_on_tensor_cores(branches, monkeypatch, N, D, scale, resident):
    """The interior forward's column sums as a product with the row weights on the tensor cores
    (the GPU's default for 16-bit features; P and w rounded to bfloat16, float32 sums; W P with
    the query block resident, P^T W streamed): the loss and every gradient stay within 2x
    PyTorch's own bf16 error, also at tau = 1/300 where the sums of some columns underflow and
    their row blocks are redone."""
    monkeypatch.setattr(E, "config_override", {"fwd_plain.COLSUM_MMA": True,
                                               "fwd_plain.RESIDENT": resident})
    assert E.config_for(DEVICE.type, torch.bfloat16, D, "fwd_plain")["RESIDENT"] == resident
    assert E.config_for(DEVICE.type, torch.bfloat16, D, "fwd_plain")["COLSUM_MMA"]
    q, k = features(N, D, torch.bfloat16, DEVICE), features(N, D, torch.bfloat16, DEVICE)

    def fn(q, k, s):
        return fastcl.clip_loss(q, k, s, reduction="none", backend="triton")

    def ref(q, k, s):
        return R.clip_loss(q, k, s.to(q.dtype), None, "none")

    _check("clip-colsum-mma", fn, ref, (q, k, _scalar(scale)), dtype=torch.bfloat16, rtol=1e-3)
    if DEVICE.type == "cpu":
        assert branches[("_plain_spans", True)] > 0
        assert branches[("_any_underflow", scale > 100)] > 0


def test_column_sums_on_tensor_cores_default():
    """On the GPU the column sums use the tensor cores for 16-bit features only."""
    assert E.config_for("cuda", torch.bfloat16, 256, "fwd_plain")["COLSUM_MMA"]
    assert E.config_for("cuda", torch.float16, 1024, "fwd_plain")["COLSUM_MMA"]
    assert not E.config_for("cuda", torch.float32, 256, "fwd_plain")["COLSUM_MMA"]
    assert not E.config_for("cuda", torch.bfloat16, 256, "fwd")["COLSUM_MMA"]
    assert not E.config_for("cpu", torch.bfloat16, 256, "fwd_plain")["COLSUM_MMA"]


def _linear_target_case(case, dtype=torch.float32, normalize=True):
    """(fn(..., backend), inputs) of a loss whose target term is linear in S (``normalize``: the
    losses that normalise their features do)."""
    N, D = 150, 24
    gen = torch.Generator().manual_seed(7)
    if case == "nt_xent":
        z1, z2 = features(N // 2, D, dtype, DEVICE), features(N // 2, D, dtype, DEVICE)
        return (lambda a, b, t, backend: fastcl.nt_xent(a, b, t, normalize=normalize, reduction="none",
                                                        backend=backend),
                (z1, z2, _scalar(0.2)))
    if case in ("supcon", "supcon_views", "supcon_int32"):
        views = 2 if case == "supcon_views" else 1
        labels = torch.randint(-3, 6, (N // views,), generator=gen)
        labels[:4] = torch.tensor([40, 41, 42, 43])  # rows whose class has no other member
        if case == "supcon_int32":
            labels = (labels * 1000003).to(torch.int32)  # not ranks: the class sums index by rank
        x = features(N, D, dtype, DEVICE)
        x = x.detach().view(N // views, views, D).requires_grad_() if views > 1 else x
        return (lambda f, t, backend: fastcl.supcon(f, labels.to(DEVICE), t, normalize=normalize,
                                                    reduction="none", backend=backend),
                (x, _scalar(0.1)))
    if case == "supcon_rect":
        labels = torch.randint(0, 9, (N,), generator=gen).to(DEVICE)
        key_labels = torch.randint(0, 9, (170,), generator=gen).to(DEVICE)
        q, k = features(N, D, dtype, DEVICE), features(170, D, dtype, DEVICE)
        return (lambda f, kk, t, backend: fastcl.supcon(f, labels, t, keys=kk, key_labels=key_labels,
                                                        normalize=normalize, reduction="none",
                                                        backend=backend),
                (q, k, _scalar(0.1)))
    if case == "info_nce_pos":
        q, k = features(N, D, dtype, DEVICE), features(170, D, dtype, DEVICE)
        pos = torch.randint(0, 170, (N,), generator=gen).to(DEVICE)
        return (lambda a, b, s, bias, backend: fastcl.info_nce(a, b, positives=pos, scale=s, bias=bias,
                                                               reduction="none", backend=backend),
                (q, k, _scalar(12.0), _scalar(-0.4)))
    if case == "mv_infonce":  # two views: the pair's logit is each row's index target (V > 2
        # has target LSEs, not linear: the masked path, checked in test_family)
        x = features(N, D, dtype, DEVICE).detach().view(N // 2, 2, D).requires_grad_()
        return (lambda f, t, backend: fastcl.mv_infonce(f, t, reduction="none", backend=backend),
                (x, _scalar(0.2)))
    assert case == "uniformity"
    x = features(N, D, dtype, DEVICE)
    return (lambda f, backend: fastcl.uniformity_loss(f, backend=backend).reshape(1), (x,))


_LINEAR_CASES = ["nt_xent", "supcon", "supcon_views", "supcon_int32", "supcon_rect", "info_nce_pos",
                 "mv_infonce", "uniformity"]


@pytest.mark.parametrize("path", [{}, {"SPLIT": True}, {"SPLIT": True, "bwd_rows_plain.RESIDENT": True},
                                  {"DENSE": True, "SPLIT": True}, {"DENSE": True, "SPLIT": False},
                                  {"PLAIN": False}])
@pytest.mark.parametrize("case", _LINEAR_CASES)
def test_linear_targets_beside_the_sweep(branches, monkeypatch, case, path):
    """Index and label targets whose loss term is the mean target logit (InfoNCE with positives,
    NT-Xent, SupCon L_out) are summed beside the forward sweep, which computes the row LSE alone
    on the lean path, and compared in the backward's lean tiles; self-similarities (NT-Xent,
    SupCon, MV-InfoNCE, uniformity) take their whole gradient from the row kernel on the lean path
    (the symmetric sweep with the rows' statistics on both sides). Every gradient matches the
    float64 reference on every backward path, and the forward and backward went the lean way
    (``PLAIN: False``: every kernel on the masked path)."""
    monkeypatch.setattr(E, "config_override", path)
    monkeypatch.setattr(E, "_DENSE_BYTES_MIN", 1)  # several slabs and row chunks
    monkeypatch.setattr(E, "_TARGET_BYTES", 4 * 150 * 16)  # several feature chunks of the sums
    fn, inputs = _linear_target_case(case)
    launched = []
    launch = E._launch

    def spy(kernel, grid, args, const, cfg, tuned):
        launched.append((kernel, const.get("TILES"), const.get("PLAIN")))
        return launch(kernel, grid, args, const, cfg, tuned)
    monkeypatch.setattr(E, "_launch", spy)
    tiles = E._grad_tiles_kernel  # the wide-feature backward launches it directly

    class TilesSpy:
        def __getitem__(self, grid):
            def run(*args, **const):
                launched.append((tiles, const.get("TILES"), const.get("PLAIN")))
                return tiles[grid](*args, **const)
            return run
    monkeypatch.setattr(E, "_grad_tiles_kernel", TilesSpy())
    _check(case, lambda *a: fn(*a, backend="triton"), lambda *a: fn(*a, backend="torch"), inputs)
    lean = path.get("PLAIN", True)
    # the forward's interior launch (lean path only) ran, or (PLAIN: False) one masked launch
    assert ((E._forward_kernel, 2, None) in launched) == lean
    # the backward's kernels on the lean path (PLAIN: False, masked); self-similarities: the row
    # kernel (or the dS tiles) alone
    bwd = tiles if path.get("DENSE") else E._backward_rows_kernel
    ran = [p for k, _, p in launched if k is bwd]
    assert ran and all(p == lean for p in ran), ran
    cols = [p for k, _, p in launched if k is E._backward_cols_kernel]
    if case in ("info_nce_pos", "supcon_rect") and not path.get("DENSE"):
        assert cols and all(p == lean for p in cols), cols
    else:
        assert cols == []


@pytest.mark.parametrize("case", ["nt_xent", "supcon_views", "supcon_rect"])
@pytest.mark.parametrize("path", [{}, {"SPLIT": True}, {"DENSE": True, "SPLIT": True}])
def test_linear_targets_cancel_in_float32(monkeypatch, case, path):
    """bfloat16 features at a low temperature, where the gradient's softmax and target terms
    nearly cancel for most rows (the backward forms dS = P - T/npos in float32 in its tiles,
    before rounding it for the tensor cores): the loss and every gradient stay within 2.5x
    PyTorch's own bf16 error, 3x on the wide-feature path. The features are taken as given:
    normalising them in bf16 would round them again, an input perturbation PyTorch's run shares
    only by chance, and at this temperature it alone moves the temperature's gradient by ~1e-3.
    (This regime is the hardest for the ratio: over 60 draws of NT-Xent's feature gradients, ours
    / PyTorch's error has a median of 1.35 (max 2.1) fused and 1.6 (max 2.6) on the wide-feature
    path, whose one GEMM takes dS_ij + dS_ji rounded once; 1.25 - 1.3 at tau = 0.2.)"""
    monkeypatch.setattr(E, "config_override", path)
    monkeypatch.setattr(E, "_DENSE_BYTES_MIN", 1)
    fn, inputs = _linear_target_case(case, torch.bfloat16, normalize=False)
    if case != "nt_xent":
        inputs = (*inputs[:-1], _scalar(0.05))
    else:
        # two views of nearly the same sample: the positive dominates every row's softmax
        z1 = inputs[0].detach()
        z2 = torch.nn.functional.normalize(z1.double() + 0.05 * torch.randn_like(z1.double()), dim=1)
        inputs = (z1.requires_grad_(), z2.to(torch.bfloat16).requires_grad_(), _scalar(0.05))
    _check(case, lambda *a: fn(*a, backend="triton"),
           lambda *a: fn(*a, backend="torch"), inputs, dtype=torch.bfloat16, rtol=1e-3,
           factor=3.0 if path.get("DENSE") else 2.5)


def _near_duplicates(n, d, dtype, gen):
    """Two views (n, d) of the same samples, 0.05 apart: the positive dominates each softmax."""
    z1 = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, generator=gen), dim=1)
    z2 = torch.nn.functional.normalize(z1 + 0.05 * torch.randn(n, d, dtype=torch.float64, generator=gen), dim=1)
    return (z1.to(DEVICE, dtype).requires_grad_(), z2.to(DEVICE, dtype).requires_grad_())


@pytest.mark.parametrize("path", [{}, {"DENSE": True, "SPLIT": True}])
@pytest.mark.parametrize("case", ["nt_xent", "supcon", "supcon_in", "dclw", "info_nce",
                                  "info_nce_keys_only", "info_nce_hard_negatives", "clip",
                                  "clip_keys_only", "clip_queries_only", "distill", "softclip"])
@pytest.mark.usefixtures("position_independent_interpreter_dots")
def test_scale_gradient_at_low_temperature(monkeypatch, case, path):
    """tau = 0.05 on near-duplicate views: d_tau = -d_scale / tau^2 sums N M terms of size ~1 /
    tau^2 that cancel to ~1e-3 of that. Without centring the sums on each line's LSE
    (``_centres``), the float32 LSE's own error (1 ulp of ~20) moves it by ~1e-5 - 1e-3 relative;
    with it the gradient of the temperature stays within 4e-6 of the float64 reference (PyTorch
    float32: ~1e-4 - 1e-3; the self-similarities' dS tiles: see below). Row kernel (one-way;
    the self-similarities' symmetric closure; DCLW's self and cross sweeps; SupCon L_in's GRAM
    kernel), column kernel (only the keys need a gradient) and the dS tiles; rows whose dS sums
    to a_i + b_i != 0 (DCLW's weights),
    label targets; CLIP's column part (centred on the columns: in the column kernel, or in the
    one kernel that runs), teacher targets (KL distillation, SoftCLIP's mixed targets); private
    hard negatives merged into the row LSE beside the kernels."""
    monkeypatch.setattr(E, "config_override", path)
    monkeypatch.setattr(E, "_DENSE_BYTES_MIN", 1)
    gen = torch.Generator().manual_seed(11)
    z1, z2 = _near_duplicates(70, 24, torch.float32, gen)
    noise = torch.randn(70, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    u = torch.nn.functional.normalize(z1.detach().double().cpu() + 0.05 * noise, dim=1)  # teacher
    # fn(a, b, t, **kw): kw are reduction, backend and exact
    if case == "nt_xent":
        fn = lambda a, b, t, **kw: fastcl.nt_xent(a, b, t, **kw)  # noqa: E731
    elif case == "supcon":
        labels = (torch.arange(70) % 60).repeat(2).to(DEVICE)  # the two views, some classes of 4
        fn = lambda a, b, t, **kw: fastcl.supcon(torch.cat([a, b]), labels, t, **kw)  # noqa: E731
    elif case == "supcon_in":  # the targets' LSE apart from the negatives' (GRAM)
        labels = (torch.arange(70) % 60).repeat(2).to(DEVICE)
        fn = lambda a, b, t, **kw: fastcl.supcon(torch.cat([a, b]), labels, t, variant="in",  # noqa: E731
                                                 **kw)
    elif case == "dclw":  # targets left out of the LSE, weighted: the rows' dS sum to a_i + b_i != 0
        fn = lambda a, b, t, **kw: fastcl.dcl(a, b, t, weight_sigma=0.5, **kw)  # noqa: E731
    elif case.startswith("clip"):
        if case == "clip_keys_only":
            z1.requires_grad_(False)
        elif case == "clip_queries_only":
            z2.requires_grad_(False)
        fn = lambda a, b, t, **kw: fastcl.clip_loss(a, b, 1 / t, **kw)  # noqa: E731
    elif case == "distill":  # teacher softmax targets from other features
        fn = lambda a, b, t, **kw: fastcl.distill(a, b, u.to(a), z2.detach().to(a), 1 / t, 20.0,  # noqa: E731
                                                  **kw)
    elif case == "softclip":  # w softmax + (1 - w) I targets
        fn = lambda a, b, t, **kw: fastcl.softclip(a, b, 1 / t, u.to(a), **kw)  # noqa: E731
    elif case == "info_nce_hard_negatives":  # two other samples' views per row
        fn = lambda a, b, t, **kw: fastcl.info_nce(  # noqa: E731
            a, b, scale=1 / t, hard_negatives=torch.stack([b.roll(1, 0), b.roll(2, 0)], 1).detach(),
            **kw)
    else:
        if case == "info_nce_keys_only":  # queries without a gradient: the column kernel's sums
            z1.requires_grad_(False)
        fn = lambda a, b, t, **kw: fastcl.info_nce(a, b, scale=1 / t, **kw)  # noqa: E731
    # The default mode's products are IEEE ones here, on the GPU too (ieee_default_products), but
    # it keeps no LSE rounding terms and forms the target logits apart from the sweep: there the
    # self-similarities' dS tiles come within 5e-6 - 7e-5 of the reference (NT-Xent, 20 draws;
    # PyTorch float32 on the materialised matrix: 1e-4 - 3e-4), held to twice PyTorch's error,
    # and their centring is checked with exact=True.
    dense_self = bool(path.get("DENSE")) and case in ("nt_xent", "supcon")
    g = None
    grads = {}
    runs = [("reference", torch.float64, "torch", False), ("triton", torch.float32, "triton", False)]
    if not path:  # the torch backend centres its sums the same way
        runs.append(("torch", torch.float32, "torch", False))
    if dense_self:
        runs += [("triton-exact", torch.float32, "triton", True),
                 ("pytorch", torch.float32, "torch", None)]  # None: the materialised reference
    for name, dtype, be, ex in runs:
        t = torch.tensor(0.05, dtype=dtype, device=DEVICE, requires_grad=True)
        a, b = (z.detach().to(dtype).requires_grad_(z.requires_grad) for z in (z1, z2))
        if ex is None:
            out = (R.nt_xent(a, b, t, reduction="none") if case == "nt_xent" else
                   R.supcon(torch.cat([a, b]), labels, t, reduction="none")[0])
        else:
            out = fn(a, b, t, reduction="none", backend=be, exact=ex)
        if g is None:  # grad_output != 1, varied
            g = torch.rand(out.shape, dtype=torch.float64, generator=gen) + 0.5
        out.backward(g.to(DEVICE, dtype))
        grads[name] = t.grad.double().item()
    ref = grads.pop("reference")
    tols = {}
    if dense_self:
        tols["triton"] = max(4e-6, 2 * abs(grads.pop("pytorch") - ref) / abs(ref))
    if case == "info_nce_hard_negatives":  # (the negatives' share of the row weight, ~1e-5,
        # reaches the kernels as 1 - share rounded to float32: 1.4e-5; PyTorch float32 2.6e-4)
        tols = {"triton": 3e-5, "torch": 3e-5}
    for name, ours in grads.items():
        tol = tols.get(name, 4e-6)
        assert abs(ours - ref) <= tol * abs(ref), (case, name, ours, ref, tol)


@pytest.mark.parametrize("path", [{}, {"PLAIN": False}, {"DENSE": True, "SPLIT": True}])
def test_weighted_index_targets(monkeypatch, path):
    """K weighted index targets per row, T_ij = sum_k w_ik [j == p_ik] (soft_info_nce's sparse
    targets), compared inside the tiles: statistics and every gradient against the float64
    torch engine, which is checked against the materialised T. Awkward sizes, a repeated index
    within rows (weights add), rows whose weights are all zero (no targets), split statistic
    weights (grad_row_pos); the lean path of interior tiles, the masked path, the dS tiles."""
    from fastcl.ops import LossSpec, Targets, torch_engine
    monkeypatch.setattr(E, "config_override", path)
    monkeypatch.setattr(E, "_DENSE_BYTES_MIN", 1)
    gen = torch.Generator().manual_seed(21)
    N, M, D, K = 37, 70, 19, 3
    q = torch.nn.functional.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(M, D, generator=gen, dtype=torch.float64), dim=1)
    idx = torch.randint(0, M, (N, K), generator=gen)
    idx[::3, 1] = idx[::3, 0]
    w = torch.rand(N, K, generator=gen, dtype=torch.float64)
    w[:2] = 0.0
    scale, bias = torch.tensor([11.0], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    spec = LossSpec()
    ref = torch_engine.forward(q, k, scale, bias, Targets(positives=idx, target_weights=w), spec)
    T = torch.zeros(N, M, dtype=torch.float64).scatter_add_(1, idx, w)
    S = scale * q @ k.T + bias
    assert torch.allclose(ref.row_pos, (T * S).sum(1)) and torch.allclose(ref.row_npos, T.sum(1))
    dev = lambda t: t.to(DEVICE, torch.float32)  # noqa: E731
    tg = Targets(positives=idx.to(DEVICE), target_weights=dev(w))
    got = E.forward(dev(q), dev(k), dev(scale), dev(bias), tg, spec)
    for name in ("row_lse", "row_pos", "row_npos"):
        a, b = getattr(got, name).double().cpu(), getattr(ref, name)
        assert rel(a, b) <= 1e-6, name
    g = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5
    gp = torch.rand(N, generator=gen, dtype=torch.float64) - 1.5
    needs = (True, True, True, True)
    want = torch_engine.backward(q, k, scale, bias, Targets(positives=idx, target_weights=w), spec,
                                 ref, g, None, needs, grad_row_pos=gp)
    have = E.backward(dev(q), dev(k), dev(scale), dev(bias), tg, spec, got, dev(g), None, needs,
                      grad_row_pos=dev(gp))
    for name, a, b in zip(("d_queries", "d_keys", "d_scale", "d_bias"), have, want):
        assert rel(a.double().cpu(), b) <= 2e-6, name
