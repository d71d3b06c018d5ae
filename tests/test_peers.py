"""The family against peer libraries' own implementations, where they install on CPU."""
import pytest
import torch

import fastcl

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, [x])
    return g


@pytest.mark.parametrize("backend", ["torch", "triton"])
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
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
