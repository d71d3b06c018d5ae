"""CUDA-only checks: torch.compile of a step ending in each backend's loss, larger shapes in low
precision, memory bounds, no host-device syncs, 64-bit offsets. Skipped on machines without a
GPU."""
import os
import subprocess
import sys

import pytest
import torch

import fastcl
from fastcl import reference as R

from ._utils import as64, assert_close, compiled_step, features, grads, lowp, shifted_siglip_rows

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


# one compile per case, first in the file so that a deadline-bound run starts them early
@pytest.mark.parametrize("backend, fullgraph", [("triton", False), ("triton", True), ("cuda", True),
                                                ("torch", True)])
def test_torch_compile_training_step(backend, fullgraph):
    """A compiled step (torch.compile, inductor; as one graph, and for Triton also with graph
    breaks allowed) that projects, normalises and ends in the fused CLIP loss gives the eager loss
    and gradients: the Triton backend (its kernels traced by dynamo), the CUDA extension (its fake
    kernels) and the torch backend."""
    if backend == "cuda":
        pytest.importorskip("fastcl._C", reason="the C++ extension fastcl._C is not built")
    eager, compiled = compiled_step(backend, CUDA, torch.bfloat16, fullgraph, n=1000, d_in=96,
                                    d=256, seed=11)
    for name, c, e in zip(("loss", "d_w", "d_scale"), compiled, eager):
        err = ((c - e).norm() / e.norm()).item()
        assert err < 2e-2, (name, err)  # bf16 projections, fused or not


@pytest.mark.parametrize("D", [256, 512])
def test_siglip_step_matches_the_two_sweeps(monkeypatch, D):
    """SigLIP reduced by mean with gradients (its step: the loss from the backward's sweep, the
    fused backward at D = 256 and the wide-feature one at 512 on Hopper) against the forward and
    backward sweeps (``STEP`` false): the same loss and gradients, bf16, N = 4096."""
    from fastcl.ops.triton import engine as E

    q, k = features(4096, D, torch.bfloat16, CUDA), features(4096, D, torch.bfloat16, CUDA)
    s = torch.tensor(10.0, device=CUDA, requires_grad=True)
    b = torch.tensor(-10.0, device=CUDA, requires_grad=True)

    def run():
        for x in (q, k, s, b):
            x.grad = None
        loss = fastcl.siglip_loss(q, k, s, b, backend="triton")
        loss.backward()
        return [loss.detach().float()] + [x.grad.float() for x in (q, k, s, b)]

    step = run()
    monkeypatch.setattr(E, "config_override", {"STEP": False})
    sweeps = run()
    for name, x, y, tol in zip(("loss", "dq", "dk", "ds", "db"), step, sweeps,
                               (1e-5, 1e-2, 1e-2, 1e-4, 1e-4)):
        err = ((x - y).norm() / y.norm()).item()
        assert err < tol, (name, err)


@pytest.mark.parametrize("offset", [4096, -4096, 1000])
def test_siglip_step_at_an_offset(offset):
    """The Triton step of a ring's off-diagonal block (positives out of range, offset +-N) and
    of a shifted diagonal, bf16, N = 4096, D = 256: the rows' losses and the weighted gradients
    against float64 (within 2x the error of PyTorch's bf16 loss)."""
    from fastcl.ops import LossSpec, Targets
    from fastcl.ops.triton import engine as E

    N, D, w = 4096, 256, 1.0 / 4096
    q = features(N, D, torch.bfloat16, CUDA, requires_grad=False)
    k = features(N, D, torch.bfloat16, CUDA, requires_grad=False)
    s, b = torch.tensor([10.0], device=CUDA), torch.tensor([-10.0], device=CUDA)
    stats, got = E.step(q, k, s, b, Targets(), LossSpec(kind="sigmoid", offset=offset),
                        (True,) * 4, weight=w)

    def rows_and_grads(dtype):
        q_, k_, s_, b_ = (x.detach().to(dtype).requires_grad_() for x in (q, k, s, b))
        rows = shifted_siglip_rows(q_, k_, s_, b_, offset)
        return rows, torch.autograd.grad(w * rows.float().sum(), [q_, k_, s_, b_])

    rows64, want = rows_and_grads(torch.float64)
    rows16, torch16 = rows_and_grads(torch.bfloat16)
    rel = lambda x, y: ((x.double() - y).norm() / y.norm()).item()  # noqa: E731
    assert rel(stats.row_lse, rows64) <= max(2 * rel(rows16, rows64), 1e-5)
    for name, x, ref, base in zip(("dq", "dk", "ds", "db"), got, want, torch16):
        x = x.reshape(ref.shape)
        assert rel(x, ref) <= max(2 * rel(base.reshape(ref.shape), ref), 1e-4), (name, rel(x, ref))


def test_distributed_siglip_ring_of_one_takes_the_step():
    """fastcl.distributed.siglip_loss on one process (a ring of one: _RingStep on CUDA tensors,
    the Triton step) gives fastcl.siglip_loss's loss and gradients, bf16, N = 4096, D = 512."""
    from fastcl import distributed as fdist

    q, k = features(4096, 512, torch.bfloat16, CUDA), features(4096, 512, torch.bfloat16, CUDA)
    s = torch.tensor(10.0, device=CUDA, requires_grad=True)
    b = torch.tensor(-10.0, device=CUDA, requires_grad=True)
    out = []
    for fn in (lambda: fdist.siglip_loss(q, k, s, b, mode="ring", backend="triton"),
               lambda: fastcl.siglip_loss(q, k, s, b, backend="triton")):
        loss = fn()
        out.append([loss.detach().float()] + [g.float() for g in torch.autograd.grad(loss * 0.5, [q, k, s, b])])
    for name, x, y in zip(("loss", "dq", "dk", "ds", "db"), *out):
        assert ((x - y).norm() / y.norm()).item() < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,D", [(1000, 256), (2048, 512), (777, 1024)])
def test_clip_large_low_precision(dtype, N, D):
    i, t = features(N, D, dtype, CUDA), features(N, D, dtype, CUDA)
    s = torch.tensor(1 / 0.07, device=CUDA, requires_grad=True)
    out = fastcl.clip_loss(i, t, s, backend="triton")
    ins64 = [as64(x) for x in (i, t, s)]
    ref = R.clip_loss(*ins64)
    lp = [lowp(x, dtype) for x in (i, t, s)]
    if dtype == torch.float32:  # the default path is TF32: compare against PyTorch in TF32
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        base = R.clip_loss(lp[0], lp[1], lp[2].to(dtype))
        g_base = grads(base, lp, torch.tensor(0.7, device=CUDA, dtype=base.dtype))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert_close("loss", out, ref, base, rtol=1e-4)
    g = torch.tensor(0.7, device=CUDA, dtype=torch.float64)
    for name, a, r, b in zip("its", grads(out, [i, t, s], g), grads(ref, ins64, g), g_base):
        assert_close(name, a, r, b, rtol=1e-4)


# values the checks on CPU tensors reject with a ValueError (tests/test_validation.py)
_DEVICE_CHECKS = {
    "positives": "fastcl.info_nce(q, k, positives=torch.tensor([0, 1, 2, 6], device='cuda'))",
    "temperature": "fastcl.nt_xent(q, k[:4], torch.tensor(-0.5, device='cuda'))",
    "target_weights": "fastcl.soft_info_nce(q, k, (torch.tensor([[0, 1]] * 4, device='cuda'), "
                      "torch.tensor([[1.5, -0.5]] * 4, device='cuda')))",
}


@pytest.mark.parametrize("case", sorted(_DEVICE_CHECKS))
def test_value_checks_are_device_assertions(case):
    """On CUDA tensors, out-of-range positives, a tensor temperature <= 0 and negative target
    weights are checked by an asynchronous device assertion (no host sync): the process fails at
    the next synchronisation instead of a loss being computed. One process per case, since the
    assertion leaves its CUDA context unusable."""
    code = ("import torch, fastcl\n"
            "q, k = torch.randn(4, 8, device='cuda'), torch.randn(6, 8, device='cuda')\n"
            f"loss = {_DEVICE_CHECKS[case]}\n"
            "torch.cuda.synchronize()\n"
            "print('synchronised', loss.item(), flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode != 0 and "synchronised" not in proc.stdout, proc.stdout
    assert "device-side assert" in proc.stderr, proc.stderr[-2000:]


def test_no_host_device_sync():
    i, t = features(4096, 256, torch.bfloat16, CUDA), features(4096, 256, torch.bfloat16, CUDA)
    s = torch.tensor(14.0, device=CUDA, requires_grad=True)
    wide = [features(4096, 512, torch.bfloat16, CUDA) for _ in range(2)]
    fastcl.clip_loss(i, t, s).backward()  # compile outside the checked region
    fastcl.clip_loss(*wide, s).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastcl.clip_loss(i, t, s).backward()
        fastcl.info_nce(i, t, scale=s).backward()
        fastcl.clip_loss(*wide, s).backward()  # the wide-feature backward
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _family_calls(N, D):
    """name -> (inputs, loss of the inputs) for every public loss, bf16 features on the GPU, the
    scalar parameters as tensors with gradients."""
    bf = torch.bfloat16
    f = lambda n, d=D: features(n, d, bf, CUDA)  # noqa: E731
    s = lambda v: torch.tensor(v, device=CUDA, requires_grad=True)  # noqa: E731
    leaf = lambda x: x.detach().requires_grad_()  # noqa: E731
    q, k, k2, hn = f(N), f(N), f(2 * N), leaf(f(N * 3).view(N, 3, D))
    u, v = f(N, 64).detach(), f(N, 64).detach()  # teacher / target embeddings (no gradient)
    pos = torch.randperm(2 * N, device=CUDA)[:N]
    ids = torch.randint(0, N // 4, (2 * N,), device=CUDA)
    lab = torch.randint(0, 16, (N // 2,), device=CUDA)
    views = leaf(f(N).view(N // 2, 2, D))
    mv = leaf(f(N).view(N // 4, 4, D))
    sc, b, t = s(14.0), s(-0.5), s(0.1)
    soft = (torch.stack([torch.arange(N, device=CUDA), pos], 1), torch.rand(N, 2, device=CUDA))
    return {
        "clip": ([q, k, sc, b], lambda: fastcl.clip_loss(q, k, sc, b)),
        "clip_smoothing": ([q, k, sc], lambda: fastcl.clip_loss(q, k, sc, label_smoothing=0.1)),
        "clip_focal": ([q, k, sc], lambda: fastcl.clip_loss(q, k, sc, focal_gamma=2.0)),
        "siglip": ([q, k, sc, b], lambda: fastcl.siglip_loss(q, k, sc, b)),
        "info_nce_positives": ([q, k2, sc], lambda: fastcl.info_nce(q, k2, positives=pos, scale=sc)),
        "info_nce_hard_negatives": ([q, k, hn, sc], lambda: fastcl.info_nce(q, k, hard_negatives=hn,
                                                                           scale=sc)),
        "info_nce_false_negatives": ([q, k2, sc], lambda: fastcl.info_nce(
            q, k2, positives=pos, scale=sc, fn_margin=0.1, key_ids=ids)),
        "info_nce_guide": ([q, k, sc], lambda: fastcl.info_nce(q, k, scale=sc, guide=(u, v))),
        "nt_xent": ([q, k, t], lambda: fastcl.nt_xent(q, k, t)),
        "supcon_out": ([views, t], lambda: fastcl.supcon(views, lab, t)),
        "supcon_in": ([views, t], lambda: fastcl.supcon(views, lab, t, variant="in")),
        "dcl": ([q, k], lambda: fastcl.dcl(q, k, 0.1, weight_sigma=0.5)),
        "hcl": ([q, k], lambda: fastcl.hcl(q, k, 0.5)),
        "soft_info_nce": ([q, k2, sc], lambda: fastcl.soft_info_nce(q, k2, soft, scale=sc)),
        "distill": ([q, k, sc], lambda: fastcl.distill(q, k, u, v, sc, 20.0)),
        "softclip": ([q, k, sc], lambda: fastcl.softclip(q, k, sc, u)),
        "cwcl": ([q, k, sc], lambda: fastcl.cwcl(q, k, u, scale=sc)),
        "mv_infonce": ([mv, t], lambda: fastcl.mv_infonce(mv, t)),
        "mv_dhel": ([mv, t], lambda: fastcl.mv_dhel(mv, t)),
        "uniformity": ([q], lambda: fastcl.uniformity_loss(q)),
    }


_FAMILY = ["clip", "clip_smoothing", "clip_focal", "siglip", "info_nce_positives", "info_nce_hard_negatives",
           "info_nce_false_negatives", "info_nce_guide", "nt_xent", "supcon_out", "supcon_in", "dcl",
           "hcl", "soft_info_nce", "distill", "softclip", "cwcl", "mv_infonce", "mv_dhel",
           "uniformity"]


@pytest.mark.parametrize("D", [128, 512])  # the fused backward, the wide-feature backward
@pytest.mark.parametrize("name", _FAMILY)
def test_no_host_device_sync_across_the_family(name, D):
    """Every public loss, forward and backward with gradients for every input and scalar, runs
    without a host-device synchronisation (after a first call that compiles)."""
    calls = _family_calls(1024, D)
    assert sorted(calls) == sorted(_FAMILY)  # every loss built is one the test runs
    inputs, loss = calls[name]
    g = torch.tensor(0.7, device=CUDA)
    loss().backward(g)
    torch.cuda.synchronize()
    for x in inputs:
        x.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss().backward(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for x in inputs:
        assert x.grad is not None and torch.isfinite(x.grad).all(), name


def _peak_extra(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_memory_is_linear_in_batch():
    """N = M = 16384, D = 256, bf16: the fused loss needs < 64 MiB beyond the inputs (the
    gradients themselves are 16 MiB); the naive loss needs > 1 GiB."""
    N, D = 16384, 256
    i, t = features(N, D, torch.bfloat16, CUDA), features(N, D, torch.bfloat16, CUDA)
    s = torch.tensor(14.0, device=CUDA, requires_grad=True)
    fastcl.clip_loss(i, t, s).backward()  # warm-up / compile
    i.grad = t.grad = s.grad = None

    def fused():
        fastcl.clip_loss(i, t, s).backward()

    def naive():
        R.clip_loss(i, t, s).backward()

    fused_bytes = _peak_extra(fused)
    i.grad = t.grad = s.grad = None
    naive_bytes = _peak_extra(naive)
    assert fused_bytes < 64 * 2**20, fused_bytes / 2**20
    assert naive_bytes > 2**30, naive_bytes / 2**20


def test_wide_feature_backward_memory():
    """N = M = 16384, D = 512, bf16 (the backward through dS blocks and GEMMs): the gradients
    (32 MiB), the dS block and its float32 dK sums (32 MiB together) and nothing else of size."""
    N, D = 16384, 512
    i, t = features(N, D, torch.bfloat16, CUDA), features(N, D, torch.bfloat16, CUDA)
    s = torch.tensor(14.0, device=CUDA, requires_grad=True)
    fastcl.clip_loss(i, t, s, backend="triton").backward()  # warm-up / compile
    i.grad = t.grad = s.grad = None
    extra = _peak_extra(lambda: fastcl.clip_loss(i, t, s, backend="triton").backward())
    assert extra < 80 * 2**20, extra / 2**20


@pytest.mark.slow
@pytest.mark.xdist_group("gpu_memory")  # ~20 GB each: one at a time beside parallel tests
@pytest.mark.parametrize("D", [256, 512])  # the fused backward, the wide-feature backward
def test_64bit_offsets_keys(D):
    """M * D > 2^31 elements: keys offsets need 64-bit arithmetic; checked on all rows."""
    N, M = 64, (2**31) // D + 4099
    q = features(N, D, torch.bfloat16, CUDA)
    k = torch.randn(M, D, device=CUDA, dtype=torch.bfloat16)
    k = torch.nn.functional.normalize(k.float(), dim=1).to(torch.bfloat16).requires_grad_()
    pos = torch.randint(M - 5000, M, (N,), device=CUDA)  # positives deep past 2^31 elements
    out = fastcl.info_nce(q, k, positives=pos, scale=20.0, reduction="none", backend="triton")
    stats = R.engine_forward(q.detach(), k.detach(), torch.tensor([20.0], device=CUDA), None,
                             positives=pos)
    ref = stats[0] - stats[1]
    assert_close("loss", out, ref, rtol=2e-3)
    out.sum().backward()
    rows = torch.arange(M - 5000, M, device=CUDA)
    g_ref = R.engine_backward(q.detach(), k.detach(), torch.tensor([20.0], device=CUDA), None,
                              row_lse=stats[0], row_npos=stats[2], col_lse=None,
                              grad_row=torch.ones(N, device=CUDA), grad_col=None,
                              needs=(False, True, False, False), positives=pos)[1]
    assert_close("dK tail", k.grad[rows].float(), g_ref[rows].float(), rtol=2e-2)


@pytest.mark.slow
@pytest.mark.xdist_group("gpu_memory")  # ~20 GB each: one at a time beside parallel tests
@pytest.mark.parametrize("D", [256, 512])  # the fused backward, the wide-feature backward
def test_64bit_offsets_queries(D):
    """N * D > 2^31 elements on the query side (SigLIP, 128 keys): the forward's and the
    backward's query offsets and their reads of deep rows need 64-bit arithmetic; the per-row
    losses and dQ are checked on sampled rows (head, random, tail) and dK in full, against
    float64 with grad_output != 1."""
    N, M = (2**31) // D + 4099, 128
    s, b = 10.0, -10.0
    gen = torch.Generator(device=CUDA).manual_seed(7)
    q = torch.empty(N, D, device=CUDA, dtype=torch.bfloat16)
    for r0 in range(0, N, 1 << 20):  # normalised in chunks: no float32 copy of all rows
        x = torch.randn(min(1 << 20, N - r0), D, device=CUDA, generator=gen)
        q[r0:r0 + x.shape[0]] = torch.nn.functional.normalize(x, dim=1).to(torch.bfloat16)
    q.requires_grad_()
    k = features(M, D, torch.bfloat16, CUDA)
    out = fastcl.siglip_loss(q, k, s, b, reduction="none", backend="triton")
    g = torch.rand(N, device=CUDA, generator=gen) + 0.5
    out.backward(g.to(out.dtype))

    s64, b64 = (torch.tensor([v], device=CUDA, dtype=torch.float64) for v in (s, b))
    kd = k.detach().double()

    def reference(r):
        """Float64 per-row losses, dQ of rows r and their part of dK (positive of row i: key i)."""
        qs = q.detach()[r].double()
        stats = R.engine_forward(qs, kd, s64, b64, kind="sigmoid", positives=r)
        dq, dk, _, _ = R.engine_backward(qs, kd, s64, b64, row_lse=stats[0], row_npos=stats[2],
                                         col_lse=None, grad_row=g[r].double(), grad_col=None,
                                         needs=(True, True, False, False), kind="sigmoid",
                                         positives=r)
        return stats[0], dq, dk

    rows = torch.cat([torch.arange(64, device=CUDA),
                      torch.randint(0, N, (2048,), device=CUDA, generator=gen),
                      torch.arange(N - 2048, N, device=CUDA)])
    ref, g_ref, _ = reference(rows)
    assert_close("loss rows", out[rows], ref, rtol=2e-3)
    assert_close("dQ rows", q.grad[rows].float(), g_ref, rtol=2e-2)

    dk_ref = sum(reference(torch.arange(r0, min(N, r0 + (1 << 19)), device=CUDA))[2]
                 for r0 in range(0, N, 1 << 19))
    assert_close("dK", k.grad.float(), dk_ref, rtol=2e-2)
