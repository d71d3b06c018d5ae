"""What the Triton backend does on a GPU, checked without one (bench/launch_plan.py): every public
loss forward and backward on fake CUDA tensors of an H100 (and an A100), its launches recorded.
Per call: no host read of a tensor's values (no synchronisation), launch grids within CUDA's
limits, power-of-two blocks; at the headline shapes, the backward path each feature width takes
and the peak bytes against the issue's memory target (1/20 of torch.compile's), and the scaling to
N = 2^20; torch.compile of each loss as one graph, its Triton kernels in it (tests/fake_compile.py)."""
import pytest
import torch

pytest.importorskip("triton")

import fastcl  # noqa: E402
from fastcl.ops.triton import engine as E  # noqa: E402

from bench.launch_plan import FakeGPU  # noqa: E402
from ._utils import LOSSES, METRICS, loss_inputs, module_report  # noqa: E402

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
MiB = 1 << 20
_ROWS_GRID_MAX = (1 << 31) - 1  # CUDA grid limits: x, then y and z
_COLS_GRID_MAX = 65535


def _check_launches(plan):
    assert not plan.transfers, plan.transfers
    assert plan.launches, "no kernel launched"
    for launch in plan.launches:
        x, y, z = launch.grid
        assert 1 <= x <= _ROWS_GRID_MAX and 1 <= y <= _COLS_GRID_MAX and 1 <= z <= _COLS_GRID_MAX, launch
        for name, value in launch.constants.items():
            if name.startswith("BLOCK_") or name == "num_warps":
                assert isinstance(value, int) and value >= 1 and value & (value - 1) == 0, launch


# losses whose gradients the forward forms (E.step): every launch is the forward's, none a sweep
# of E.forward
_STEPS = ("siglip",)


def _gradient_kernels(plan, loss):
    """The kernels that form the gradients: the backward's, or a step's (the forward's)."""
    if loss.startswith(_STEPS):
        assert plan.forward_launches == len(plan.launches), plan.kernels()
        assert "_forward_kernel" not in plan.kernels(), plan.kernels()
        return plan.kernels()
    assert plan.forward_launches >= 1 and len(plan.launches) > plan.forward_launches
    return plan.kernels("backward")


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_losses_run_without_host_reads(monkeypatch, loss, dtype, arch):
    """Forward and backward at an awkward shape (N not a multiple of any block; D = 200 takes the
    fused backward for 16-bit features on Hopper, the wide-feature one otherwise): a host read of
    any tensor's values (a synchronisation) raises on fake tensors."""
    gpu = FakeGPU(monkeypatch, arch)
    x = loss_inputs(gpu.tensor, 1004, 200, dtype)
    plan = gpu.plan(lambda: LOSSES[loss](x))
    _check_launches(plan)
    kernels = _gradient_kernels(plan, loss)
    wide = "_grad_tiles_kernel" in kernels
    assert wide == (dtype == F32 or arch < 90), kernels


# Peak bytes above the inputs, bf16, N = 32768, D = 512, in units of the features' bytes (both
# N x D sets), by the first matching prefix: the lean losses hold the gradients and the
# backward's buffers alone; SupCon against keys holds normalised copies of both sets, CWCL its
# frozen modality's normalised rows in float32 (here 0.2x); the self-similarities hold their
# stacked, normalised rows (two N x D sets for NT-Xent, DCL and HCL; one for SupCon, uniformity
# and MV-InfoNCE's four views of N / 4; half of one for two of those views), their gradient and
# a dS block of their bytes counted once (MV-DHEL: one view's, 1.26x).
_MEMORY = (("supcon_keys", 3.1), ("cwcl", 2.3), (("nt_xent", "dcl", "hcl"), 3.1),
           (("supcon", "mv_infonce_4", "uniformity", "mv_dhel"), 1.6), ("mv_infonce_2", 0.8),
           (("info_nce", "clip", "siglip", "soft_info_nce", "distill", "softclip"), 2.1))


@pytest.mark.parametrize("loss", list(LOSSES))
def test_memory_at_the_headline_shape(monkeypatch, loss):
    """bf16, N = 32768, D = 512: the peak bytes above the inputs within _MEMORY's bound (the
    lean losses within 2.1x the features' bytes: the gradients, the dS block and the float32 dK
    sums; label smoothing and hard negatives included, their row products formed one row chunk
    at a time; the self-similarities' views stacked and normalised by unit_rows, which keeps
    only its output). Every one of them is O((N + M) D)."""
    gpu = FakeGPU(monkeypatch)
    x = loss_inputs(gpu.tensor, 32768, 512, BF16)
    plan = gpu.plan(lambda: LOSSES[loss](x))
    ratio = plan.peak_bytes / (2 * x["q"].numel() * x["q"].element_size())
    bound = next(b for prefix, b in _MEMORY if loss.startswith(prefix))
    assert ratio <= bound, ratio


EXACT = {  # IEEE float32 products (exact=True): the line sums' kernels and their correction
    "clip": lambda x: fastcl.clip_loss(x["q"], x["k"], x["s"], x["b"], exact=True),
    "info_nce": lambda x: fastcl.info_nce(x["q"], x["k"], positives=x["pos"], scale=x["s"], exact=True),
    "info_nce_smoothing": lambda x: fastcl.info_nce(x["q"], x["k"], scale=x["s"], label_smoothing=0.1, exact=True),
    "siglip": lambda x: fastcl.siglip_loss(x["q"], x["k"], x["s"], x["b"], exact=True),
    "nt_xent": lambda x: fastcl.nt_xent(x["q"], x["k"], 0.3, exact=True),
    "supcon_in": lambda x: fastcl.supcon(x["q"], x["labels"], 0.1, variant="in", exact=True),
    "distill": lambda x: fastcl.distill(x["q"], x["k"], x["u"], x["v"], x["s"], 10.0, exact=True),
}


@pytest.mark.parametrize("D", [64, 200])
@pytest.mark.parametrize("loss", list(EXACT))
def test_exact_float32_runs_without_host_reads(monkeypatch, loss, D):
    """exact=True on an H100: no host reads either; the symmetric closure (CLIP) takes the
    wide-feature backward at every D (its fused kernels spill with IEEE products), the others
    the fused one where D fits it (128 for float32)."""
    gpu = FakeGPU(monkeypatch)
    x = loss_inputs(gpu.tensor, 1004, D, F32)
    plan = gpu.plan(lambda: EXACT[loss](x))
    _check_launches(plan)
    kernels = _gradient_kernels(plan, loss)
    wide = "_grad_tiles_kernel" in kernels
    assert wide == (loss == "clip" or D > 128), kernels


@pytest.mark.parametrize("metric", list(METRICS))
def test_metrics_run_without_host_reads(monkeypatch, metric):
    gpu = FakeGPU(monkeypatch)
    x = loss_inputs(gpu.tensor, 1004, 200, BF16)
    _check_launches(gpu.plan(lambda: METRICS[metric](x), backward=False))


# torch.compile's extra memory for symmetric CLIP, bf16, fwd + bwd, N = 32768 on the H100
# (the peer measurement of 2026-11-22; extra = peak above the inputs, gradients included)
COMPILE_EXTRA_MIB = {256: 4080.6, 512: 4064.6, 768: 4048.6, 1024: 4032.6}


@pytest.mark.parametrize("D", sorted(COMPILE_EXTRA_MIB))
def test_headline_plan(monkeypatch, D):
    """Symmetric CLIP, bf16, N = 32768 on an H100: the forward's masked band launch, interior
    launch and column merge; the fused backward (rows and columns kernels, no dS tiles) up to
    D = 256, the wide-feature backward (dS tiles + GEMMs) beyond; and at most 1/20 of the bytes
    torch.compile takes above the inputs (issue target), gradients included."""
    gpu = FakeGPU(monkeypatch)
    N = 32768
    q, k, s = gpu.tensor(N, D, dtype=BF16), gpu.tensor(N, D, dtype=BF16), gpu.tensor()
    plan = gpu.plan(lambda: fastcl.clip_loss(q, k, s))
    _check_launches(plan)
    fwd, bwd = plan.kernels("forward"), set(plan.kernels("backward"))
    assert fwd.count("_forward_kernel") >= 2 and fwd[-1] == "_merge_column_partials_kernel", fwd
    if D <= 256:
        assert bwd == {"_backward_rows_kernel", "_backward_cols_kernel"}, bwd
    else:
        assert bwd == {"_grad_tiles_kernel"}, bwd
        # per dS block the plain spans' launch, and the band launch only in blocks the band
        # crosses (N is a multiple of the spans: no edges)
        tiles = [x.constants["TILES"] for x in plan.part("backward")]
        blocks = tiles.count(2)
        R, W = E.dense_plan(N, N, D, 2, 128, 128, True)
        assert blocks == -(-N // R) * -(-N // W), (blocks, R, W)
        band = sum(1 for r0 in range(0, N, R) for c0 in range(0, N, W)
                   if r0 < c0 + W and c0 < r0 + R)
        assert tiles.count(1) == band < blocks / 2, (tiles.count(1), band, blocks)
    assert plan.peak_bytes <= COMPILE_EXTRA_MIB[D] * MiB / 20, plan.peak_bytes / MiB


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_huge_batch_plan(monkeypatch, dtype):
    """Symmetric CLIP at N = 2^20, D = 512 (the issue's huge-batch target, its inputs 2 GiB in
    bf16): within CUDA's grid limits, and at most ~2x the inputs' bytes above them (gradients,
    the dS block and the forward's partial column LSEs are each bounded by the inputs' bytes)."""
    gpu = FakeGPU(monkeypatch)
    N, D = 1 << 20, 512
    q, k, s = gpu.tensor(N, D, dtype=dtype), gpu.tensor(N, D, dtype=dtype), gpu.tensor()
    plan = gpu.plan(lambda: fastcl.clip_loss(q, k, s))
    _check_launches(plan)
    inputs = 2 * N * D * q.element_size()
    assert plan.peak_bytes <= 2.1 * inputs, plan.peak_bytes / inputs
    assert plan.forward_peak_bytes <= 1.1 * inputs, plan.forward_peak_bytes / inputs


def test_fused_width_boundary(monkeypatch):
    """The first width past the fused backward's (256 for 16-bit features on Hopper, 128
    otherwise) takes the wide-feature one; 16-bit symmetric closures stay fused up to it."""
    for arch, dtype in ((90, BF16), (90, F16), (80, BF16), (90, F32)):
        width = E._fused_width(dtype, arch)
        for D, wide in ((width, False), (width + 1, True)):
            gpu = FakeGPU(monkeypatch, arch)
            q, k, s = gpu.tensor(640, D, dtype=dtype), gpu.tensor(640, D, dtype=dtype), gpu.tensor()
            plan = gpu.plan(lambda: fastcl.clip_loss(q, k, s))
            assert ("_grad_tiles_kernel" in plan.kernels("backward")) == wide, (arch, dtype, D)


@pytest.fixture(scope="module")
def compile_reports():
    return {}


@pytest.mark.parametrize("dynamic,dtype", [(False, "bfloat16"), (True, "bfloat16"), (True, "float32")])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_torch_compile_traces_one_graph(compile_reports, loss, dynamic, dtype):
    """torch.compile(fullgraph=True) of each loss with the Triton backend on an H100, with static
    and with symbolic sizes (dynamic=True): one graph, the forward's and the backward's Triton
    kernels in it (as torch's user-kernel operators; a step's alone, _STEPS). Float32 features
    too, whose backward at D = 200 is the wide-feature one: dynamo could not read the strides of
    the views that DCL and MV-InfoNCE sweep, specialised sizes beside symbolic strides."""
    key = (dynamic, dtype)
    if key not in compile_reports:
        compile_reports[key] = module_report("tests.fake_compile", *(["--dynamic"] if dynamic else []),
                                             *(["--float32"] if dtype == "float32" else []))
    entry = compile_reports[key][loss]
    assert entry["ok"], entry["error"]
    # (a step's gradients: one dS-tile kernel and GEMMs, float32 SigLIP with labels)
    assert entry["graphs"] == 1 and entry["kernels"] >= (1 if loss.startswith(_STEPS) else 2), entry
