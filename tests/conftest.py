"""Test configuration. Without a GPU, Triton kernels run on CPU tensors under TRITON_INTERPRET=1,
which must be set before any kernel module is imported; nothing here touches CUDA at import."""
import os
import time
import zlib

import pytest
import torch


def _gpu_present() -> bool:
    # Checked through the driver only when torch was built with CUDA; no CUDA context is created.
    return torch.cuda.is_available()


GPU = _gpu_present()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the device the Triton tests run on: CUDA when present, else CPU under the interpreter
DEVICE = torch.device("cuda") if GPU else torch.device("cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long-running")
    config.addinivalue_line("markers", "interpreter: runs the Triton backend on CPU tensors, which "
                            "only the interpreter does (skipped on a GPU machine, where the Triton "
                            "tests run the kernels on CUDA tensors)")
    # pytest-xdist (--dist loadgroup): tests of one group run on one worker, one after another
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker")


# FASTCL_TEST_DEADLINE (seconds since the epoch): tests not started by then are skipped, so a
# time-limited run still ends on its own with a complete report
_DEADLINE = float(os.environ.get("FASTCL_TEST_DEADLINE") or 0)


@pytest.fixture(autouse=True)
def _seeded_inputs(request):
    """Each test draws its random inputs from the global generator seeded by its own id: its data
    does not depend on which tests ran before it (a tolerance met by one draw and not another
    would otherwise come and go as tests are added)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_runtest_setup(item):
    if _DEADLINE and time.time() > _DEADLINE:
        pytest.skip("FASTCL_TEST_DEADLINE passed before this test started")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interpreter = pytest.mark.skip(reason="the Triton backend on CPU tensors needs TRITON_INTERPRET=1")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not GPU:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("interpreter") is not None and not interpreting:
            item.add_marker(skip_interpreter)


# FASTCL_INTERPRET_TF32=1: the interpreter's float32 products that ask for TF32 take their
# operands as the tensor cores do (the low 13 bits of each mantissa dropped), so the suite shows
# without a GPU which float32 checks the default (TF32) mode would fail there
_TF32 = os.environ.get("FASTCL_INTERPRET_TF32", "0") not in ("", "0")


@pytest.fixture(autouse=True, scope="session")
def _interpreter_tf32_products():
    if not _TF32 or GPU:
        yield
        return
    import numpy as np
    from triton.runtime import interpreter
    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def tf32(x):
        return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)

    def dot(self, a, b, d, input_precision, *args, **kwargs):
        if (a.data.dtype == np.float32 and b.data.dtype == np.float32
                and "TF32" in str(input_precision) and "x3" not in str(input_precision)):
            a = interpreter.TensorHandle(tf32(a.data), a.dtype.scalar)
            b = interpreter.TensorHandle(tf32(b.data), b.dtype.scalar)
        return create_dot(self, a, b, d, input_precision, *args, **kwargs)

    builder.create_dot = dot
    try:
        yield
    finally:
        builder.create_dot = create_dot


@pytest.fixture
def ieee_default_products(monkeypatch):
    """The default mode's float32 kernels with IEEE products instead of TF32 ones: on a GPU the
    tests that hold the default mode's arithmetic to float32 bounds (set by the interpreter's IEEE
    products) check the same kernels there; its TF32 rounding is checked apart at TF32 bounds
    (tests/test_gpu.py, test_triton.py::test_tf32_default_close_to_exact)."""
    from fastcl.ops.triton import engine
    monkeypatch.setattr(engine, "TF32_PRODUCTS", False)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def position_independent_interpreter_dots(monkeypatch):
    """Under the Triton interpreter, float32 tile products in float64, rounded once.

    The symmetric sweep of a self-similarity (NT-Xent) uses S_ij from tile (i, j) for row j too,
    whose LSE the forward took from tile (j, i). On the GPU the two are expected to be the same
    number (each entry's products accumulated in the same order wherever it sits in a tile), and
    these tests run there with the real products. The interpreter's ``numpy.matmul`` does not
    promise that: with some CPUs' BLAS kernels (AVX2 OpenBLAS) S_ij and S_ji differ by an ulp,
    and a row whose target dominates carries that ulp (~1e-6 at |S| = 20) next to 1 - P ~ 1e-3
    into its gradient. Products rounded once from float64 are the same number on every CPU and
    in both places; what is tested is the kernels' and the correction's own arithmetic."""
    if DEVICE.type != "cpu":
        return
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    create_dot = getattr(builder, "create_dot", None)
    if create_dot is None:
        return

    def dot(self, a, b, d, *args, **kwargs):
        if a.data.dtype == np.float32 and b.data.dtype == np.float32 and d.data.dtype == np.float32:
            product = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)).astype(np.float32)
            return interpreter.TensorHandle(product + d.data, d.dtype.scalar)
        return create_dot(self, a, b, d, *args, **kwargs)

    monkeypatch.setattr(builder, "create_dot", dot)
