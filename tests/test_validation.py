"""Bad input gets a clear ValueError / TypeError naming the argument."""
import pytest
import torch

import fastcl

from .conftest import DEVICE

# float32 values here are held to float32 bounds: on a GPU with IEEE products too
pytestmark = pytest.mark.usefixtures("ieee_default_products")


def f(n, d, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
class TestInfoNCE:
    def test_wrong_rank(self, backend):
        with pytest.raises(ValueError, match="queries must have shape"):
            fastcl.info_nce(torch.randn(4, 3, 2), f(4, 2), backend=backend)
        with pytest.raises(ValueError, match="keys must have shape"):
            fastcl.info_nce(f(4, 2), torch.randn(8), backend=backend)

    def test_not_a_tensor(self, backend):
        with pytest.raises(TypeError, match="queries must be a torch.Tensor"):
            fastcl.info_nce([[1.0, 2.0]], f(4, 2), backend=backend)

    def test_mismatched_dim(self, backend):
        with pytest.raises(ValueError, match="feature dimension D"):
            fastcl.info_nce(f(4, 8), f(4, 9), backend=backend)

    def test_fewer_keys_than_queries(self, backend):
        with pytest.raises(ValueError, match="at least as many rows"):
            fastcl.info_nce(f(5, 8), f(4, 8), backend=backend)

    def test_positives_out_of_range(self, backend):
        # CPU tensors: checked before the backend is resolved (on CUDA tensors the check is a
        # device assertion, tests/test_gpu.py)
        q, k = torch.randn(4, 8), torch.randn(6, 8)
        with pytest.raises(ValueError, match=r"positives must lie in \[0, 6\)"):
            fastcl.info_nce(q, k, positives=torch.tensor([0, 1, 2, 6]), backend=backend)
        with pytest.raises(ValueError, match="positives must lie"):
            fastcl.info_nce(q, k, positives=torch.tensor([0, -1, 2, 3]), backend=backend)

    def test_positives_shape_and_dtype(self, backend):
        with pytest.raises(ValueError, match=r"positives must have shape \(4,\)"):
            fastcl.info_nce(f(4, 8), f(6, 8), positives=torch.arange(3, device=DEVICE), backend=backend)
        with pytest.raises(TypeError, match="positives must be an integer tensor"):
            fastcl.info_nce(f(4, 8), f(6, 8), positives=torch.zeros(4, device=DEVICE), backend=backend)

    def test_mismatched_dtypes(self, backend):
        with pytest.raises(TypeError, match="same dtype"):
            fastcl.info_nce(f(4, 8), f(4, 8, torch.float16), backend=backend)

    def test_integer_features(self, backend):
        with pytest.raises(TypeError, match="queries must be float16, bfloat16, float32 or float64"):
            fastcl.info_nce(torch.ones(4, 8, dtype=torch.int64, device=DEVICE), f(4, 8), backend=backend)

    def test_empty(self, backend):
        with pytest.raises(ValueError, match="queries is empty"):
            fastcl.info_nce(f(0, 8), f(4, 8), backend=backend)
        with pytest.raises(ValueError, match="keys is empty"):
            fastcl.info_nce(f(4, 8), f(0, 8), backend=backend)
        with pytest.raises(ValueError, match=r"N >= 1 and D >= 1"):
            fastcl.info_nce(f(4, 0), f(4, 0), backend=backend)

    def test_bad_reduction_and_scale(self, backend):
        with pytest.raises(ValueError, match="reduction must be one of"):
            fastcl.info_nce(f(4, 8), f(4, 8), reduction="avg", backend=backend)
        with pytest.raises(ValueError, match="scale must be a float or a one-element tensor"):
            fastcl.info_nce(f(4, 8), f(4, 8), scale=torch.ones(2), backend=backend)
        with pytest.raises(TypeError, match="scale must be a float"):
            fastcl.info_nce(f(4, 8), f(4, 8), scale="10", backend=backend)
        with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
            fastcl.info_nce(f(4, 8), f(4, 8), bias=torch.tensor(1), backend=backend)


def test_mismatched_devices():
    if DEVICE.type != "cuda":
        pytest.skip("needs two device types")
    with pytest.raises(ValueError, match="same device"):
        fastcl.info_nce(f(4, 8), torch.randn(4, 8), backend="auto")


def test_clip_batch_mismatch():
    with pytest.raises(ValueError, match="same batch size N"):
        fastcl.clip_loss(f(4, 8), f(5, 8), 10.0)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcl.clip_loss(f(4, 8), f(4, 8), 10.0, backend="jax")


def test_triton_rejects_float64():
    with pytest.raises(TypeError, match="backend='triton' supports float16, bfloat16 and float32"):
        fastcl.clip_loss(f(4, 8, torch.float64), f(4, 8, torch.float64), 10.0, backend="triton")


def test_siglip_and_supcon_labels():
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        fastcl.siglip_loss(f(4, 8), f(4, 8), 10.0, -10.0, labels=torch.arange(5, device=DEVICE))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fastcl.supcon(f(4, 8), torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="features must be a tensor of shape"):
        fastcl.supcon(torch.randn(2, 3, 4, 5), torch.arange(2))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastcl.nt_xent(f(4, 8), f(4, 8), temperature=0.0)
    with pytest.raises(ValueError, match="same batch size"):
        fastcl.nt_xent(f(4, 8), f(3, 8))


def test_non_finite_and_non_positive_parameters():
    """Float parameters must be finite; temperatures (floats or tensors) > 0: never a NaN loss."""
    z = f(6, 8)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        fastcl.clip_loss(z, z, float("inf"))
    with pytest.raises(ValueError, match="scale must be finite"):
        fastcl.info_nce(z, z, scale=float("nan"))
    with pytest.raises(ValueError, match="bias must be finite"):
        fastcl.info_nce(z, z, bias=float("nan"))
    z_cpu = torch.randn(6, 8)  # tensor values: on CUDA a device assertion (tests/test_gpu.py)
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
            fastcl.nt_xent(z_cpu, z_cpu, torch.tensor(bad))
        with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
            fastcl.supcon(z_cpu, torch.arange(6) % 2, temperature=torch.tensor([bad]))
    with pytest.raises(TypeError, match="temperature must be a float"):
        fastcl.hcl(z, z, "0.5")
    with pytest.raises(TypeError, match="temperature must be a float"):
        fastcl.hcl(z, z, torch.tensor(0.5))
    with pytest.raises(ValueError, match="beta must be >= 0 and finite"):
        fastcl.hcl(z, z, beta=float("nan"))
    with pytest.raises(TypeError, match="weight_sigma must be a float"):
        fastcl.dcl(z, z, weight_sigma="a")
    with pytest.raises(ValueError, match="t must be > 0 and finite"):
        fastcl.uniformity_loss(z, float("inf"))
    with pytest.raises(TypeError, match="t must be a float"):
        fastcl.uniformity_loss(z, "2")
    with pytest.raises(ValueError, match="alpha must be > 0 and finite"):
        fastcl.alignment_loss(z, z, alpha=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\] and finite"):
        fastcl.info_nce(z, z, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\] and finite"):
        fastcl.softclip(z, z, 10.0, z, alpha=1.5)
    # NumPy scalars are numbers like any other
    np = pytest.importorskip("numpy")
    assert torch.isfinite(fastcl.nt_xent(z, z, np.float32(0.5)))
    assert torch.isfinite(fastcl.info_nce(z, z, scale=np.float32(10.0)))


def test_full_label_smoothing_matches_cross_entropy():
    q, k = f(5, 8), f(7, 8)
    want = torch.nn.functional.cross_entropy(3.0 * q.double() @ k.double().T, torch.arange(5, device=DEVICE),
                                             label_smoothing=1.0)
    assert abs(fastcl.info_nce(q, k, scale=3.0, label_smoothing=1.0).item() - want.item()) < 1e-5


def test_soft_targets_must_be_non_negative():
    q, k = torch.randn(4, 8), torch.randn(6, 8)  # (on CUDA a device assertion: tests/test_gpu.py)
    idx = torch.tensor([[0, 1]] * 4)
    with pytest.raises(ValueError, match="target weights must be >= 0 and finite"):
        fastcl.soft_info_nce(q, k, (idx, torch.tensor([[1.5, -0.5]] * 4)))
    with pytest.raises(ValueError, match="dense targets must be >= 0 and finite"):
        fastcl.soft_info_nce(q, k, torch.full((4, 6), float("nan")))


def test_modules_check_their_arguments_when_built():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcl.ClipLoss(backend="gpu")
    with pytest.raises(ValueError, match="variant must be 'out' or 'in'"):
        fastcl.SupConLoss(variant="x")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastcl.NTXentLoss(temperature=0)
    with pytest.raises(ValueError, match="weight_sigma must be > 0"):
        fastcl.DCLLoss(weight_sigma=-1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        fastcl.InfoNCELoss(scale=float("inf"))
    with pytest.raises(ValueError, match="directions must be"):
        fastcl.DistillLoss(directions="rows")
    with pytest.raises(ValueError, match="objective must be"):
        fastcl.DistillLoss(objective="ce")
    with pytest.raises(ValueError, match="alpha must be"):
        fastcl.SoftClipLoss(alpha=1.5)
    with pytest.raises(ValueError, match="target_scale must be finite"):
        fastcl.SoftClipLoss(target_scale=float("nan"))
    with pytest.raises(ValueError, match="reduction must be"):
        fastcl.CWCLLoss(reduction="avg")
    with pytest.raises(ValueError, match="tau_plus must be"):
        fastcl.HCLLoss(tau_plus=1.0)
    with pytest.raises(TypeError, match="hcl takes no tensor temperature"):
        fastcl.HCLLoss(temperature=torch.tensor(0.5))
    for cls in (fastcl.MVInfoNCELoss, fastcl.MVDHELLoss):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            cls(temperature=-0.1)
    with pytest.raises(ValueError, match="t must be > 0"):
        fastcl.UniformityLoss(t=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcl.UniformityLoss(backend="gpu")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        fastcl.AlignmentLoss(alpha=-1.0)


def test_metric_arguments():
    q = f(6, 8)
    with pytest.raises(ValueError, match="ks must be a sequence of positive integers"):
        fastcl.metrics.retrieval(q, q, ks=(True,))
    with pytest.raises(ValueError, match="ks must be a sequence of positive integers"):
        fastcl.metrics.retrieval(q, q, ks=5)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_second_derivatives_raise(backend):
    """The fused backward is not itself differentiable: a second derivative (create_graph=True)
    raises instead of silently treating the saved statistics as constants."""
    from fastcl import _backend

    if backend == "cpu" and (DEVICE.type != "cpu" or not _backend.has_extension()):
        pytest.skip("needs the compiled extension and CPU tensors")
    q, k = f(8, 16).requires_grad_(), f(8, 16)
    for loss in (lambda: fastcl.info_nce(q, k, scale=10.0, backend=backend),
                 lambda: fastcl.clip_loss(q, k, 10.0, backend=backend),
                 lambda: fastcl.nt_xent(q, k, backend=backend)):
        g, = torch.autograd.grad(loss(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(g.pow(2).sum(), q)
    if backend != "cpu":
        g, = torch.autograd.grad(fastcl.dcl(q, k, backend=backend), q, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(g.pow(2).sum(), q)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_metrics_under_autocast(backend):
    """Features of two dtypes under autocast are cast like a matmul's inputs, as the losses do."""
    q, k = f(12, 16), f(12, 16)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        r = fastcl.metrics.retrieval(q, k.bfloat16(), backend=backend)
        v, i = fastcl.metrics.hard_negatives(q, k.bfloat16(), k=3, backend=backend)
    want = fastcl.metrics.retrieval(q.bfloat16(), k.bfloat16(), backend=backend)
    assert torch.equal(r["ranks"], want["ranks"]) and v.shape == (12, 3) and i.shape == (12, 3)


def test_views_and_hard_negative_types():
    with pytest.raises(ValueError, match="needs V >= 1 views"):
        fastcl.supcon(torch.randn(4, 0, 8, device=DEVICE), torch.arange(4, device=DEVICE))
    q = f(4, 8)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="hard_negatives must be a floating-point tensor"):
            fastcl.info_nce(q, q, hard_negatives=torch.ones(4, 2, 8, dtype=torch.int64, device=DEVICE))


def test_guide_arguments():
    q, k = f(5, 8), f(7, 8)
    u, v = f(5, 3).detach(), f(7, 3).detach()
    with pytest.raises(TypeError, match="guide must be a pair"):
        fastcl.info_nce(q, k, guide=u)
    with pytest.raises(ValueError, match="guide_queries / guide_keys must have 5 / 7 rows"):
        fastcl.info_nce(q, k, guide=(u, v[:6]))
    with pytest.raises(ValueError, match="guide_keys"):
        fastcl.info_nce(q, k, guide=(u, f(7, 4).detach()))
    with pytest.raises(TypeError, match="guide_queries"):
        fastcl.info_nce(q, k, guide=(u.long(), v))
    with pytest.raises(ValueError, match="guide cannot be combined with hard_negatives"):
        fastcl.info_nce(q, k, guide=(u, v), hard_negatives=f(5, 2 * 8).view(5, 2, 8))
    from fastcl import _backend

    if _backend.has_extension():
        with pytest.raises(ValueError, match="does not implement this loss"):
            fastcl.info_nce(q, k, guide=(u, v), backend="cpu")


@pytest.mark.parametrize("masking", ["fn_margin", "fn_ratio", "key_ids", "guide"])
def test_label_smoothing_refuses_false_negative_masking(masking):
    """Its uniform part would run over the dropped keys too (the materialised loss is inf there)."""
    q, k = f(6, 4), f(6, 4)
    kw = {"fn_margin": dict(fn_margin=0.0), "fn_ratio": dict(fn_ratio=1.0),
          "key_ids": dict(key_ids=torch.arange(6, device=DEVICE)),
          "guide": dict(guide=(q.detach(), k.detach()))}[masking]
    fastcl.info_nce(q, k, **kw)  # alone: fine
    with pytest.raises(ValueError, match="label_smoothing cannot be combined with false-negative"):
        fastcl.info_nce(q, k, label_smoothing=0.1, **kw)
