"""Every Triton kernel variant compiles for real GPU targets (sm_90, sm_80) on a machine without
a GPU, with 64-bit strides; the default configurations of the hot closures do not spill registers
on sm_90. The interpreter tests check the numerics; this checks the GPU lowering."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
except ImportError:  # pragma: no cover
    pytest.skip("this Triton has no ASTSource/GPUTarget compile API", allow_module_level=True)

from . import triton_aot
from ._utils import module_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    return module_report("tests.triton_aot")


@pytest.mark.parametrize("variant", [triton_aot.variant_name(*v) for v in triton_aot.VARIANTS]
                         + ["merge-sm90", "merge-sm80", "merge_lo-sm90"])
def test_compiles(report, variant):
    assert report[variant]["ok"], report[variant]["error"]


_HOT = [("fwd", "clip"), ("fwd_plain", "clip"), ("fwd_resident", "clip"), ("fwd", "info_nce"),
        ("bwd_rows", "clip"), ("bwd_cols", "clip"), ("bwd_gram", "supcon"), ("grad_tiles", "clip"),
        ("grad_tiles_in", "clip"), ("fwd_plain", "self_lse"), ("bwd_rows", "self_lse_sym"),
        ("bwd_rows", "nt_xent_sym"), ("bwd_rows", "supcon_sym"), ("bwd_rows", "info_nce_lean"),
        ("grad_tiles_gram", "hcl"), ("grad_tiles_gram", "supcon_in")]


@pytest.mark.parametrize("kernel,closure,dtype",
                         [(k, c, d) for k, c in _HOT for d in ("bfloat16", "float32")
                          if (k, d) != ("fwd_resident", "float32")]  # (resident: 16-bit only)
                         + [("bwd_cols_in", "clip", "bfloat16")])
def test_default_configs_do_not_spill(report, kernel, closure, dtype):
    usage = report[triton_aot.variant_name(kernel, closure, dtype, 90)]["usage"]
    if usage is None:
        pytest.skip("cuobjdump is not shipped with this Triton")
    assert int(usage["STACK"]) == 0 and int(usage["LOCAL"]) == 0, usage


@pytest.mark.parametrize("variant", [triton_aot.variant_name(*v) for v in triton_aot.VARIANTS])
def test_no_spill_traffic_inside_the_tile_loop(report, variant):
    """Every compiled variant keeps its loop over tiles (or over D chunks, for the one-tile dS
    kernel) free of local-memory loads and stores: what a configuration spills beyond the hot
    list's zero is kept for before and after the loop, once per program. (Triton 3.6, the GPU
    image's, spills up to 168 bytes in the self-similarities' dS tiles and 72 in their interior
    dQ launch, all of it outside the loop; in the loop only their float32 row kernel's 4-5
    instructions per tile, bench/ANALYSIS.md.)"""
    entry = report[variant]
    if not entry["ok"]:
        pytest.skip("did not compile (test_compiles fails)")
    if entry["loop_local"] is None:
        pytest.skip("cuobjdump is not shipped with this Triton")
    kernel, closure = variant.split("-")[:2]
    if kernel.startswith("bwd_") and kernel.endswith("_lines") and triton_aot.CLOSURES[closure]["SYMMETRIC"]:
        # IEEE float32 products (exact=True) lower to FMA loops: the symmetric closures' fused
        # backward spills with them, line sums or not (1.8 KB in the rows kernel at D = 128), so
        # on a GPU they take the wide-feature backward, whose dS tiles do not (grad_tiles_lines)
        pytest.skip("exact float32, symmetric closure: not the GPU's path (E._dense_backward)")
    assert entry["loop_local"] == 0, (entry["loop_local"], entry["usage"])


# the most shared memory one block may take (opt-in): H100 227 KiB, A100 163 KiB
_SHARED_MAX = {90: 227 * 1024, 80: 163 * 1024}


@pytest.mark.parametrize("variant", [v for v in triton_aot.VARIANTS])
def test_fits_shared_memory(report, variant):
    """Every compiled variant's shared memory (pipeline stages, resident blocks, layout staging)
    fits one block of its GPU: a kernel over the limit fails only at launch, on the GPU."""
    entry = report[triton_aot.variant_name(*variant)]
    if not entry["ok"]:
        pytest.skip("did not compile (test_compiles fails)")
    assert entry["shared"] <= _SHARED_MAX[variant[3]], (entry["shared"], _SHARED_MAX[variant[3]])


_FLOOR = os.environ.get("FASTCL_TRITON_FLOOR_PYTHON")


@pytest.mark.skipif(not _FLOOR, reason="FASTCL_TRITON_FLOOR_PYTHON (a Python with Triton 3.0, set by "
                                        "make test) is not set")
def test_every_variant_compiles_with_the_oldest_supported_triton():
    """The same variants compile with Triton 3.0, the oldest Triton fastcl supports (its compiler
    crashes on some constructs newer ones accept: a reduction of a loop-carried tensor)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    version = subprocess.run([_FLOOR, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith("3.0."), version
    proc = subprocess.run([_FLOOR, "-m", "tests.triton_aot"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]  # a compiler crash is a nonzero exit
    report = json.loads(proc.stdout)
    expected = [triton_aot.variant_name(*v) for v in triton_aot.VARIANTS if not v[0].endswith("_tma")]
    expected += ["merge-sm90", "merge-sm80", "merge_lo-sm90"]  # (3.0 has no tensor descriptors: no TMA variants)
    failed = {name: report[name]["error"][:300] for name in expected if not report[name]["ok"]}
    assert not failed, failed


def _cost(path, loss="clip"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tests.triton_aot", "--cost", path, "128", loss], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_interior_tiles_take_the_lean_path():
    """Tiles inside the matrix and off the target band issue well under half the instructions of
    the general path in the forward (one exponential per entry instead of two, no masks, no
    per-tile logarithms) and clearly fewer in the backward (SASS of the sm_90 kernels)."""
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                       "cuobjdump")):
        pytest.skip("cuobjdump is not shipped with this Triton")
    general, plain = _cost("general"), _cost("plain")
    # per similarity entry: the interior launch has larger tiles
    assert plain["fwd"]["per_entry"] < 0.5 * general["fwd"]["per_entry"], (plain["fwd"], general["fwd"])
    assert (plain["fwd"]["mufu_ex2"] / plain["fwd"]["entries"]
            < 0.7 * general["fwd"]["mufu_ex2"] / general["fwd"]["entries"])
    for kernel in ("bwd_rows", "bwd_cols"):
        assert plain[kernel]["per_entry"] < 0.7 * general[kernel]["per_entry"], (plain[kernel],
                                                                                  general[kernel])


def test_siglip_interior_tiles_take_the_lean_path():
    """SigLIP's interior tiles (negatives only: softplus(S) forward, a_i sigmoid(S) backward, no
    masks) issue well under the general path's instructions per clock of tensor-core work, at the
    interior launches' own (wider) tiles, D = 128."""
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                       "cuobjdump")):
        pytest.skip("cuobjdump is not shipped with this Triton")
    general, plain = _cost("general", "siglip"), _cost("plain", "siglip")
    for kernel in ("fwd", "bwd_rows", "bwd_cols"):
        assert plain[kernel]["ratio"] < 0.6 * general[kernel]["ratio"], (plain[kernel], general[kernel])
