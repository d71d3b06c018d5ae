"""The family against peer libraries' own implementations, where they install on CPU."""
import warnings

import pytest
import torch

import fastcl

try:
    from pytorch_metric_learning import losses as pml_losses
except Exception:  # pragma: no cover - not installable here
    pml_losses = None


# the Triton backend on these CPU tensors: the interpreter (tests/test_triton.py and the others
# run the kernels on CUDA tensors where there is a GPU)
TRITON = pytest.param("triton", marks=pytest.mark.interpreter)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, [x])
    return g


@pytest.mark.skipif(pml_losses is None, reason="pytorch-metric-learning is not installed")
@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_nt_xent_matches_pytorch_metric_learning(backend):
    torch.manual_seed(0)
    N, D = 24, 16
    z = torch.randn(2 * N, D, dtype=torch.float64 if backend == "torch" else torch.float32, requires_grad=True)
    labels = torch.arange(N).repeat(2)
    ref = pml_losses.NTXentLoss(temperature=0.2)(z, labels)
    ours = fastcl.nt_xent(z[:N], z[N:], 0.2, backend=backend, exact=True)
    tol = 1e-10 if backend == "torch" else 2e-5
    assert abs(ours.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    torch.testing.assert_close(_grad(ours, z), _grad(ref, z), rtol=tol * 10, atol=tol)


@pytest.mark.skipif(pml_losses is None, reason="pytorch-metric-learning is not installed")
@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_supcon_matches_pytorch_metric_learning(backend):
    torch.manual_seed(1)
    B, D = 40, 12
    x = torch.randn(B, D, dtype=torch.float64 if backend == "torch" else torch.float32, requires_grad=True)
    labels = torch.randint(0, 6, (B,))
    ref = pml_losses.SupConLoss(temperature=0.1)(x, labels)
    ours = fastcl.supcon(x, labels, 0.1, backend=backend, exact=True)
    tol = 1e-10 if backend == "torch" else 2e-5
    assert abs(ours.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    torch.testing.assert_close(_grad(ours, x), _grad(ref, x), rtol=tol * 10, atol=tol)


lightly_loss = None
try:  # lightly is an optional peer: its DCL / DCLW implementations
    from lightly import loss as lightly_loss
except Exception:  # pragma: no cover - not installable here
    pass


@pytest.mark.skipif(lightly_loss is None, reason="lightly is not installed")
@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_dcl_matches_lightly(backend):
    torch.manual_seed(2)
    dt = torch.float64 if backend == "torch" else torch.float32
    a = torch.randn(20, 10, dtype=dt, requires_grad=True)
    b = torch.randn(20, 10, dtype=dt, requires_grad=True)
    tol = 1e-10 if backend == "torch" else 2e-5
    ref = lightly_loss.DCLLoss(temperature=0.2)(a, b)
    ours = fastcl.dcl(a, b, 0.2, backend=backend, exact=True)
    assert abs(ours.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    torch.testing.assert_close(_grad(ours, a), _grad(ref, a), rtol=tol * 10, atol=tol)
    # DCLW: lightly builds its weights with torch.tensor(...), i.e. without a gradient path; the
    # values agree (fastcl keeps the weights differentiable, as the paper's code does)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref_w = lightly_loss.DCLWLoss(temperature=0.2, sigma=0.5)(a, b)
    ours_w = fastcl.dcl(a, b, 0.2, weight_sigma=0.5, backend=backend, exact=True)
    assert abs(ours_w.item() - ref_w.item()) <= tol * max(1.0, abs(ref_w.item()))
