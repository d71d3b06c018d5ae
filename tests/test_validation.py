"""Bad input gets a clear ValueError / TypeError naming the argument."""
import pytest
import torch

import fastcl

from .conftest import DEVICE


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
        with pytest.raises(ValueError, match=r"positives must lie in \[0, 6\)"):
            fastcl.info_nce(f(4, 8), f(6, 8), positives=torch.tensor([0, 1, 2, 6], device=DEVICE),
                            backend=backend)
        with pytest.raises(ValueError, match="positives must lie"):
            fastcl.info_nce(f(4, 8), f(6, 8), positives=torch.tensor([0, -1, 2, 3], device=DEVICE),
                            backend=backend)

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
