"""pytest-benchmark set: ``pytest bench/ --benchmark-only``.

Tiny CPU shapes everywhere (naive reference vs fastcl's torch backend, and the C++ CPU kernels
when built); on a GPU also a mid-size bf16 CLIP step per GPU provider. Each benchmarked call is
one training step (loss + backward, gradients cleared first) or one forward under no_grad, with a
device synchronisation so the wall clock measures the work.
"""
import pytest
import torch

from bench import providers as P

GPU = torch.cuda.is_available()

CPU_CASES = [(loss, prov, mode)
             for loss in ("clip", "siglip")
             for prov in ("naive", "fastcl-torch", "fastcl-cpu")
             for mode in ("fwd", "fwdbwd")]
GPU_CASES = [(loss, prov, mode)
             for loss in ("clip",)
             for prov in ("naive", "compiled", "fastcl-triton", "fastcl-cuda")
             for mode in ("fwd", "fwdbwd")]


def _step(fn, x, mode, device):
    def fwd():
        with torch.no_grad():
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fwdbwd():
        for t in P.leaves(x):
            t.grad = None
        fn(x).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return fwd if mode == "fwd" else fwdbwd


def _run(benchmark, loss, provider, mode, N, D, dtype, device):
    try:
        fn = P.build(loss, provider, device, dtype)
    except P.Unavailable as e:
        pytest.skip(str(e))
    x = P.make_inputs(loss, N, N, D, dtype, device, torch.Generator(device=device).manual_seed(0))
    step = _step(fn, x, mode, device)
    step()  # compile / warm up outside the statistics
    benchmark.group = f"{loss}-{mode}-N{N}-D{D}-{str(dtype).split('.')[-1]}-{device.type}"
    benchmark.extra_info.update(loss=loss, provider=provider, mode=mode, N=N, M=N, D=D,
                                flops={"fwd": 2, "fwdbwd": 8}[mode] * N * N * D)
    benchmark(step)
    if mode == "fwdbwd":
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in P.leaves(x))


@pytest.mark.benchmark(max_time=0.5, min_rounds=5)
@pytest.mark.parametrize("loss,provider,mode", CPU_CASES)
def test_cpu(benchmark, loss, provider, mode):
    _run(benchmark, loss, provider, mode, 256, 64, torch.float32, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.benchmark(max_time=1.0, min_rounds=10)
@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("loss,provider,mode", GPU_CASES)
def test_gpu(benchmark, loss, provider, mode):
    if provider == "compiled":
        P.reset_compiled()
    _run(benchmark, loss, provider, mode, 4096, 256, torch.bfloat16, torch.device("cuda"))
